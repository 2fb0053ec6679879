"""Hash families against their naive twins, the bucket index, collision statistics and K/L maths."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from engine import lsh
from engine.config import SamplingConfig, SlideConfig
from engine.kernels import hashing

from . import naive

FAMILIES = ("simhash", "wta", "dwta")


def draw(family, k, n_tables, dim=64, bin_size=8, table_bits=None, seed=0, density=0.33, n_neurons=1000):
    cfg = SlideConfig(
        sampling=SamplingConfig(
            hash_family=family,
            hash_k=k,
            hash_l=n_tables,
            bin_size=bin_size,
            table_bits=table_bits,
            simhash_density=density,
        )
    )
    return lsh.draw_hash_functions(cfg, dim, n_neurons, np.random.default_rng(seed))


def unit(v):
    return v / np.linalg.norm(v)


def pair_at_cosine(rng, dim, c):
    """Two unit vectors with cosine similarity exactly c (up to rounding)."""
    x = unit(rng.standard_normal(dim))
    z = rng.standard_normal(dim)
    z = unit(z - (z @ x) * x)
    return x, c * x + math.sqrt(1 - c * c) * z


def sparse_pair(rng, dim, nnz, overlap):
    """Non-negative sparse vectors with `nnz` non-zeros each, sharing round(overlap * nnz) of them
    (same values on the shared ones): cosine ~= overlap, as for bags of words."""
    support = rng.choice(dim, size=2 * nnz, replace=False)
    shared = int(round(overlap * nnz))
    x = np.zeros(dim)
    y = np.zeros(dim)
    x[support[:nnz]] = rng.uniform(0.5, 1.5, nnz)
    y[support[:shared]] = x[support[:shared]]
    y[support[nnz : 2 * nnz - shared]] = rng.uniform(0.5, 1.5, nnz - shared)
    return x, y


def collision_rate(hf, pairs):
    """Mean fraction of the L tables in which the two vectors of a pair share a bucket."""
    return float(np.mean([np.mean(lsh.hash_dense(x, hf) == lsh.hash_dense(y, hf)) for x, y in pairs]))


# ---- twins ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k, table_bits", [(3, None), (6, 5)])  # exact mixed radix, then folded
def test_bucket_ids_equal_naive_twin(family, k, table_bits):
    hf = draw(family, k, 12, dim=40, table_bits=table_bits, seed=3)
    assert bool(hf.params[5]) == (table_bits is not None)
    rng = np.random.default_rng(1)
    vectors = [rng.standard_normal(40)]
    vectors += [np.where(rng.random(40) < 0.15, rng.random(40), 0.0) for _ in range(20)]  # empty bins
    vectors += [rng.standard_normal(40) for _ in range(20)]
    vectors += [np.zeros(40)]
    for x in vectors:
        x = x.astype(np.float32)
        got = lsh.hash_dense(x, hf)
        want = naive.bucket_ids(x, hf.idx, hf.sign, hf.params)
        np.testing.assert_array_equal(got, want)
        assert got.min() >= 0 and got.max() < hf.num_buckets


@pytest.mark.parametrize("family", FAMILIES)
def test_hash_matrix_hashes_centred_rows(family):
    hf = draw(family, 2, 6, dim=16, seed=5)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((30, 17)).astype(np.float32)  # last column is a bias, never hashed
    center = w[:, :-1].mean(axis=0).astype(np.float32)
    rows = np.array([29, 0, 7, 7, 3])
    got = lsh.hash_matrix(w, hf, rows, center=center)
    assert got.shape == (6, len(rows))
    for r, j in enumerate(rows):
        want = naive.bucket_ids(w[j, :-1] - center, hf.idx, hf.sign, hf.params)
        np.testing.assert_array_equal(got[:, r], want)
    # No centre: the raw row (its first dim entries).
    plain = lsh.hash_matrix(w, hf)
    for j in (0, 11, 29):
        np.testing.assert_array_equal(plain[:, j], naive.bucket_ids(w[j, :16], hf.idx, hf.sign, hf.params))


@pytest.mark.parametrize("table_bits", [None, 5])
def test_multi_probe_flips_the_least_confident_bits(table_bits):
    hf = draw("simhash", 6, 8, dim=32, table_bits=table_bits, seed=4)
    k, n_tables = hf.k, hf.n_tables
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.standard_normal(32).astype(np.float32)
        got = lsh.probe_dense(x, hf, probes=3)
        np.testing.assert_array_equal(got[:, 0], lsh.hash_dense(x, hf))
        margins = np.abs((hf.sign.astype(np.float64) * x[hf.idx]).sum(axis=1))
        codes = naive.simhash_codes(x, hf.idx, hf.sign)
        for t in range(n_tables):
            order = t * k + np.argsort(margins[t * k : (t + 1) * k], kind="stable")
            for p in range(1, 4):
                flipped = codes.copy()
                flipped[order[p - 1]] ^= 1
                want = naive.combine(
                    flipped, k, n_tables, 2, int(hf.params[hashing.FOLD]), int(hf.params[hashing.TABLE_BITS]), hf.seed
                )
                assert got[t, p] == want[t]


def test_multi_probe_finds_near_neighbours_more_often():
    hf = draw("simhash", 8, 16, dim=64, density=0.2, seed=6)
    rng = np.random.default_rng(8)
    pairs = [pair_at_cosine(rng, 64, 0.8) for _ in range(300)]

    def found(probes):
        hits = []
        for x, y in pairs:
            probed = lsh.probe_dense(x.astype(np.float32), hf, probes)
            own = lsh.hash_dense(y.astype(np.float32), hf)
            hits.append(np.mean([own[t] in probed[t] for t in range(hf.n_tables)]))
        return float(np.mean(hits))

    none, one, three = found(0), found(1), found(3)
    assert none < one < three
    assert one > 1.3 * none  # the flipped bit is the one most likely to differ


def test_dwta_equals_wta_without_empty_bins():
    wta = draw("wta", 3, 10, dim=48, seed=9)
    dwta = draw("dwta", 3, 10, dim=48, seed=9)
    np.testing.assert_array_equal(wta.idx, dwta.idx)
    rng = np.random.default_rng(0)
    for _ in range(30):
        x = rng.standard_normal(48).astype(np.float32)
        np.testing.assert_array_equal(lsh.hash_dense(x, wta), lsh.hash_dense(x, dwta))


def test_drawn_functions_have_the_documented_shape():
    dim = 50
    for family in FAMILIES:
        hf = draw(family, 4, 7, dim=dim, seed=1)
        assert hf.idx.shape[0] == 4 * 7 and hf.sign.shape == hf.idx.shape
        assert (hf.k, hf.n_tables) == (4, 7)
        assert hf.idx.min() >= 0 and hf.idx.max() < dim
        if family == "simhash":
            assert set(np.unique(hf.sign)) <= {-1.0, 1.0}
            assert hf.idx.shape[1] == round(0.33 * dim)
            assert all(len(set(row)) == len(row) for row in hf.idx)
        else:
            assert hf.idx.shape[1] == 8 and np.all(hf.sign == 1.0)
            # Bins of one permutation are disjoint: the first dim // bin codes cover distinct dims.
            first = hf.idx[: dim // 8].ravel()
            assert len(set(first)) == len(first)
    with pytest.raises(ValueError, match="bin_size"):
        draw("wta", 2, 2, dim=4, bin_size=8)


# ---- the bucket index ------------------------------------------------------------------------------
@pytest.mark.parametrize("radix, k", [(2, 6), (8, 3), (5, 2), (4, 4)])
def test_mixed_radix_index_is_a_bijection(radix, k):
    """Every combination of K codes has its own bucket and every bucket is reachable (the reference's
    log-shift combination reached ~3.6% of buckets)."""
    combos = np.array(list(itertools.product(range(radix), repeat=k)), dtype=np.int32)
    n = len(combos)
    params = np.array([hashing.WTA, k, n, radix, radix**k, 0, math.ceil(math.log2(radix**k)), 123], np.int64)
    buckets = np.empty(n, dtype=np.int32)
    hashing.combine_codes(combos.ravel(), params, buckets)
    assert sorted(buckets.tolist()) == list(range(radix**k))
    # ... and the id is the mixed-radix number with code j as digit j.
    np.testing.assert_array_equal(buckets, combos @ (radix ** np.arange(k)))


def test_geometry_folds_only_when_the_code_space_does_not_fit():
    cfg = SlideConfig(sampling=SamplingConfig(hash_family="wta", bin_size=8, hash_k=3))
    assert lsh.table_geometry(cfg, 3) == (8, 512, False, 9)
    cfg = SlideConfig(sampling=SamplingConfig(hash_family="simhash", hash_k=12, table_bits=8))
    assert lsh.table_geometry(cfg, 12) == (2, 256, True, 8)
    cfg = SlideConfig(sampling=SamplingConfig(hash_family="wta", bin_size=8))
    assert lsh.table_geometry(cfg, 8) == (8, 2**20, True, 20)  # 2^24 codes, capped at 20 bits
    cfg = SlideConfig(sampling=SamplingConfig(hash_family="wta", bin_size=6))
    assert lsh.table_geometry(cfg, 2) == (6, 36, False, 6)  # non power of two radix: 36 buckets exactly


def test_auto_k_keeps_the_expected_active_set_a_small_fraction():
    """hash_k None (auto) picks K from the layer width: more neurons, more bits, and an input's L buckets
    (L * n / buckets neurons on average) stay a small share of a wide layer."""
    for family, radix in (("simhash", 2), ("dwta", 8)):
        cfg = SlideConfig(sampling=SamplingConfig(hash_family=family, hash_k=None, hash_l=50, bin_size=8))
        ks = [lsh.resolve_k(cfg, n) for n in (10, 1000, 10_000, 100_000, 670_091)]
        assert ks[0] >= 1 and all(b >= a for a, b in itertools.pairwise(ks)), ks
        for n, k in zip((10_000, 100_000, 670_091), ks[2:], strict=True):
            assert 50 * n / radix**k <= 0.1 * n, (family, n, k)
        assert lsh.resolve_k(cfg.replace(sampling=cfg.sampling.replace(hash_k=5)), 65536) == 5


def test_auto_tables_are_16_for_wide_layers_and_50_for_small_ones():
    """hash_l None (auto): a layer past 20,000 neurons (target active size < 5% of it) gets 16 tables, a
    smaller one 50; an explicit hash_l wins; the drawn functions and auto K follow the resolved L."""
    cfg = SlideConfig()
    assert [lsh.resolve_l(cfg, n) for n in (100, 5_000, 20_000, 20_001, 670_091)] == [50, 50, 50, 16, 16]
    assert lsh.resolve_l(cfg.replace(sampling=cfg.sampling.replace(hash_l=7)), 670_091) == 7
    rng = np.random.default_rng(0)
    wide, small = lsh.draw_hash_functions(cfg, 32, 100_000, rng), lsh.draw_hash_functions(cfg, 32, 5_000, rng)
    assert (wide.n_tables, small.n_tables) == (16, 50)
    assert wide.idx.shape[0] == 16 * lsh.resolve_k(cfg, 100_000)
    assert lsh.resolve_k(cfg, 100_000) == lsh.resolve_k(cfg.replace(sampling=cfg.sampling.replace(hash_l=16)), 100_000)


def test_folded_index_reaches_every_bucket_with_uniform_load():
    k, bits = 16, 8
    combos = ((np.arange(2**k)[:, None] >> np.arange(k)) & 1).astype(np.int32)
    n = len(combos)
    params = np.array([hashing.SIMHASH, k, n, 2, 2**bits, 1, bits, 77], np.int64)
    buckets = np.empty(n, dtype=np.int32)
    hashing.combine_codes(combos.ravel(), params, buckets)
    counts = np.bincount(buckets, minlength=2**bits)
    assert len(counts) == 2**bits and counts.min() > 0
    expected = n / 2**bits  # 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = 2**bits - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof), chi2
    assert counts.max() < 1.5 * expected and counts.min() > 0.5 * expected
    # The same through the hash of real vectors: every bucket of every table is used.
    hf = draw("simhash", 12, 4, dim=32, table_bits=4, seed=2, density=1.0)
    rng = np.random.default_rng(0)
    ids = lsh.hash_matrix(rng.standard_normal((3000, 32)).astype(np.float32), hf)
    for t in range(4):
        c = np.bincount(ids[t], minlength=16)
        assert len(c) == 16 and c.min() > 0.4 * 3000 / 16


# ---- collision statistics --------------------------------------------------------------------------
COSINES = (0.2, 0.5, 0.8, 0.95)


@pytest.mark.parametrize("family, k", [("simhash", 2), ("wta", 2), ("dwta", 2)])
def test_collision_probability_rises_with_cosine(family, k):
    hf = draw(family, k, 64, dim=64, seed=11)
    rng = np.random.default_rng(42)
    rates = [collision_rate(hf, [pair_at_cosine(rng, 64, c) for _ in range(60)]) for c in COSINES]
    assert all(b > a + 0.02 for a, b in itertools.pairwise(rates)), rates
    assert rates[-1] > 0.5 and rates[-1] > 2 * rates[0], rates


def test_simhash_collision_matches_theory():
    """Per-bit collision of signed random projections is 1 - angle / pi (dense +-1 projections)."""
    hf = draw("simhash", 1, 128, dim=64, seed=4, density=1.0)
    rng = np.random.default_rng(8)
    for c in COSINES:
        rate = collision_rate(hf, [pair_at_cosine(rng, 64, c) for _ in range(80)])
        assert rate == pytest.approx(naive.simhash_bit_collision(c), abs=0.035), c


def test_dwta_tracks_similarity_on_sparse_inputs_where_wta_collapses():
    """Sparse non-negative inputs leave most WTA bins empty. WTA gives an empty bin code 0, so unrelated
    vectors collide in most tables and crowd into bucket 0; DWTA borrows codes from non-empty bins and
    stays selective. This is why DWTA exists."""
    dim, nnz, k, n_tables = 256, 10, 2, 64
    wta = draw("wta", k, n_tables, dim=dim, seed=21)
    dwta = draw("dwta", k, n_tables, dim=dim, seed=21)
    rng = np.random.default_rng(5)
    levels = (0.0, 0.2, 0.5, 0.8, 1.0)
    pairs = {o: [sparse_pair(rng, dim, nnz, o) for _ in range(60)] for o in levels}
    wta_rates = [collision_rate(wta, pairs[o]) for o in levels]
    dwta_rates = [collision_rate(dwta, pairs[o]) for o in levels]
    # DWTA: rare collisions between unrelated vectors, rising with overlap, certain for equal vectors.
    assert dwta_rates[0] < 0.1, dwta_rates
    assert all(b > 1.5 * a + 0.01 for a, b in itertools.pairwise(dwta_rates)), dwta_rates
    assert dwta_rates[-1] == 1.0
    # WTA: unrelated vectors already collide in a large share of the tables.
    assert wta_rates[0] > 0.2 and wta_rates[0] > 10 * dwta_rates[0], (wta_rates, dwta_rates)
    # Degenerate codes: WTA puts sparse vectors in the all-zero-code bucket, DWTA spreads them out.
    xs = [sparse_pair(rng, dim, nnz, 0.0)[0] for _ in range(200)]
    wta_ids = np.array([lsh.hash_dense(x, wta) for x in xs])
    dwta_ids = np.array([lsh.hash_dense(x, dwta) for x in xs])
    assert np.mean(wta_ids == 0) > 0.4
    assert np.mean(dwta_ids == 0) < 0.05
    distinct = np.mean([len(np.unique(dwta_ids[:, t])) for t in range(n_tables)])
    assert distinct > 0.8 * wta.num_buckets, distinct  # 64 buckets, 200 vectors: nearly all used


def test_dwta_all_zero_vector_is_well_defined():
    hf = draw("dwta", 3, 5, dim=32, seed=0)
    np.testing.assert_array_equal(lsh.hash_dense(np.zeros(32, np.float32), hf), np.zeros(5))


def test_hash_dense_checks_its_input():
    hf = draw("simhash", 2, 3, dim=32, seed=0, density=1.0)
    with pytest.raises(ValueError):
        lsh.hash_dense(np.zeros(8, np.float32), hf)
    with pytest.raises(ValueError):
        lsh.hash_dense(np.zeros((2, 32), np.float32), hf)


# ---- K/L maths --------------------------------------------------------------------------------------
def test_collision_probability_formula():
    assert lsh.collision_probability(0.5, 1, 1) == pytest.approx(0.5)
    assert lsh.collision_probability(0.5, 2, 1) == pytest.approx(0.25)
    assert lsh.collision_probability(0.5, 2, 2) == pytest.approx(1 - 0.75**2)
    assert lsh.collision_probability(1.0, 7, 3) == 1.0
    assert lsh.collision_probability(0.0, 3, 50) == 0.0
    for p, k, n_tables in [(0.9, 6, 50), (0.3, 2, 10), (0.7, 10, 1)]:
        assert lsh.collision_probability(p, k, n_tables) == pytest.approx(naive.collision_probability(p, k, n_tables))
    # K cuts false positives, L cuts false negatives.
    assert lsh.collision_probability(0.8, 4, 10) < lsh.collision_probability(0.8, 3, 10)
    assert lsh.collision_probability(0.8, 4, 20) > lsh.collision_probability(0.8, 4, 10)
    # The S-curve: a higher-similarity pair always wins.
    ps = np.linspace(0.05, 0.95, 19)
    curve = np.array([lsh.collision_probability(p, 6, 50) for p in ps])
    assert np.all(np.diff(curve) >= 0) and np.all(np.diff(curve[:12]) > 0)


def test_simhash_bit_collision():
    assert lsh.simhash_bit_collision(1.0) == 1.0
    assert lsh.simhash_bit_collision(0.0) == pytest.approx(0.5)
    assert lsh.simhash_bit_collision(-1.0) == 0.0
    assert lsh.simhash_bit_collision(1.0000001) == 1.0  # rounding above 1 is clamped
    assert lsh.simhash_bit_collision(0.5) == pytest.approx(1 - 1 / 3)


@pytest.mark.parametrize("p, k, recall", [(0.9, 6, 0.95), (0.5, 4, 0.99), (0.8, 10, 0.5), (0.99, 1, 0.9)])
def test_tables_for_recall_is_the_smallest_sufficient_l(p, k, recall):
    n_tables = lsh.tables_for_recall(p, k, recall)
    assert n_tables >= 1
    assert lsh.collision_probability(p, k, n_tables) >= recall - 1e-12
    if n_tables > 1:
        assert lsh.collision_probability(p, k, n_tables - 1) < recall


def test_tables_for_recall_rejects_degenerate_inputs():
    for p, recall in [(0.0, 0.9), (1.0, 0.9), (0.5, 0.0), (0.5, 1.0), (-0.1, 0.5)]:
        with pytest.raises(ValueError):
            lsh.tables_for_recall(p, 3, recall)
