"""Bucket tables: CSR build against a naive grouping, capacity, FIFO and reservoir policies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import tables
from engine.config import ModelConfig, SamplingConfig, SlideConfig
from engine.network import SlideModel

from . import naive


def build(codes, num_buckets, capacity, policy="fifo", inserted=None, seed=0, round_id=0):
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    n_tables, n = codes.shape
    tb = tables.empty_tables(n_tables, n, num_buckets, 4)
    tb.codes[:] = codes
    if inserted is not None:
        tb.inserted[:] = inserted
    tables.rebuild(tb, num_buckets, capacity, policy, seed, round_id)
    return tb


def members(tb, t, b):
    return tb.ids[t, tb.offsets[t, b] : tb.offsets[t, b + 1]]


@pytest.mark.parametrize("policy", ["fifo", "reservoir"])
def test_build_matches_naive_grouping_when_buckets_fit(policy):
    rng = np.random.default_rng(0)
    n_tables, n, nb = 6, 300, 16
    codes = rng.integers(0, nb, size=(n_tables, n))
    tb = build(codes, nb, capacity=n, policy=policy, inserted=rng.integers(0, 5, n))
    groups = naive.group_buckets(codes, nb)
    for t in range(n_tables):
        np.testing.assert_array_equal(
            tb.offsets[t], np.concatenate([[0], np.cumsum(np.bincount(codes[t], minlength=nb))])
        )
        for b in range(nb):
            np.testing.assert_array_equal(members(tb, t, b), groups[t][b])
        # Every neuron in exactly one bucket per table.
        np.testing.assert_array_equal(np.sort(tb.ids[t]), np.arange(n))
    found = np.concatenate([tables.query(tb, np.full(n_tables, b)) for b in range(nb)])
    np.testing.assert_array_equal(np.bincount(found, minlength=n), np.full(n, n_tables))
    # query() returns the union of the asked buckets, with repeats.
    ask = codes[:, 17]
    got = tables.query(tb, ask)
    assert np.count_nonzero(got == 17) == n_tables
    assert sorted(got.tolist()) == sorted(np.concatenate([groups[t][ask[t]] for t in range(n_tables)]).tolist())


def test_capacity_is_respected_and_kept_ids_come_from_the_bucket():
    rng = np.random.default_rng(1)
    n_tables, n, nb, cap = 4, 500, 8, 20  # ~62 per bucket, so every bucket overflows
    codes = rng.integers(0, nb, size=(n_tables, n))
    for policy in ("fifo", "reservoir"):
        tb = build(codes, nb, cap, policy=policy, seed=3)
        groups = naive.group_buckets(codes, nb)
        for t in range(n_tables):
            for b in range(nb):
                kept = members(tb, t, b)
                assert len(kept) == min(cap, len(groups[t][b]))
                assert set(kept.tolist()) <= set(groups[t][b].tolist())
                assert len(np.unique(kept)) == len(kept)
                assert np.all(np.diff(kept) > 0)  # ids inside a bucket are sorted
            assert tb.offsets[t, -1] == sum(min(cap, len(g)) for g in groups[t])


def test_skewed_buckets_keep_small_ones_whole():
    codes = np.zeros((2, 100), dtype=np.int32)
    codes[:, 90:] = 3  # bucket 0 has 90 ids, bucket 3 has 10, buckets 1, 2 are empty
    tb = build(codes, 4, 25)
    for t in range(2):
        assert len(members(tb, t, 0)) == 25
        assert len(members(tb, t, 1)) == len(members(tb, t, 2)) == 0
        np.testing.assert_array_equal(members(tb, t, 3), np.arange(90, 100))


def test_fifo_keeps_the_most_recently_inserted():
    rng = np.random.default_rng(2)
    n_tables, n, nb, cap = 8, 400, 4, 30
    codes = rng.integers(0, nb, size=(n_tables, n))
    inserted = rng.integers(0, 40, size=n)  # rehash round of each neuron's last insertion
    tb = build(codes, nb, cap, policy="fifo", inserted=inserted, seed=5, round_id=40)
    groups = naive.group_buckets(codes, nb)
    for t in range(n_tables):
        for b in range(nb):
            kept = members(tb, t, b)
            dropped = np.setdiff1d(groups[t][b], kept)
            assert len(kept) == cap and len(dropped) > 0
            # Nothing dropped is newer than anything kept ...
            assert inserted[kept].min() >= inserted[dropped].max()
            # ... and every neuron of a strictly newer round than the oldest kept one is kept.
            newest_rounds = groups[t][b][inserted[groups[t][b]] > inserted[kept].min()]
            assert set(newest_rounds.tolist()) <= set(kept.tolist())


def test_fifo_ties_inside_one_round_favour_no_id_range():
    """All neurons inserted in the same round: which of a full bucket's ids stay is random, not the
    lowest (or highest) ids. Many tables with the same codes are independent draws."""
    n_tables, n, cap = 400, 40, 10
    codes = np.zeros((n_tables, n), dtype=np.int32)
    tb = build(codes, 1, cap, policy="fifo", seed=9, round_id=1)
    freq = np.bincount(tb.ids[:, :cap].ravel(), minlength=n) / n_tables
    expected = cap / n  # 0.25
    sd = math.sqrt(expected * (1 - expected) / n_tables)
    assert np.all(np.abs(freq - expected) < 5 * sd), freq
    assert freq[: n // 2].mean() == pytest.approx(expected, abs=0.03)


def test_reservoir_keeps_a_uniform_sample():
    """Each member of an over-full bucket is kept with probability capacity / size, whatever its id
    or insertion round, across tables, seeds and rounds."""
    n_tables, n, cap = 200, 30, 6
    codes = np.zeros((n_tables, n), dtype=np.int32)
    inserted = np.arange(n)  # FIFO would keep exactly the 6 newest: reservoir must not care
    counts = np.zeros(n)
    draws = 0
    for seed in range(5):
        tb = build(codes, 1, cap, policy="reservoir", inserted=inserted, seed=seed, round_id=seed)
        counts += np.bincount(tb.ids[:, :cap].ravel(), minlength=n)
        draws += n_tables
    freq = counts / draws
    expected = cap / n  # 0.2
    sd = math.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) < 5 * sd), freq
    assert freq[-cap:].mean() == pytest.approx(expected, abs=0.03)
    # Different seeds give different samples.
    a = build(codes[:1], 1, cap, "reservoir", inserted, seed=0).ids[0, :cap]
    b = build(codes[:1], 1, cap, "reservoir", inserted, seed=1).ids[0, :cap]
    assert not np.array_equal(a, b)
    # FIFO on the same bucket keeps exactly the newest.
    fifo = build(codes[:1], 1, cap, "fifo", inserted, seed=0).ids[0, :cap]
    np.testing.assert_array_equal(fifo, np.arange(n - cap, n))


def test_rebuild_is_deterministic():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 4, size=(5, 200))
    for policy in ("fifo", "reservoir"):
        a = build(codes, 4, 15, policy, seed=7, round_id=2)
        b = build(codes, 4, 15, policy, seed=7, round_id=2)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.offsets, b.offsets)


@pytest.mark.parametrize("family", ["simhash", "wta", "dwta"])
def test_model_tables_hold_every_neuron_once_per_table(family):
    """With room in every bucket, a freshly built model has each output neuron in exactly the bucket
    its centred weight row hashes to, in every table."""
    from engine import lsh

    cfg = SlideConfig(
        model=ModelConfig(hidden=(16,), sample_output=True),
        sampling=SamplingConfig(
            hash_family=family, hash_k=2, hash_l=6, bin_size=4, bucket_size=8192, simhash_density=0.33
        ),
        seed=3,
    )
    model = SlideModel.initialize(cfg, num_features=50, num_labels=300)
    hf, tb = model.hashes[0], model.tables[0]
    w = model.weights[1]
    np.testing.assert_allclose(tb.center, model.float_weights(1)[:, :-1].mean(axis=0), rtol=1e-5, atol=1e-7)
    codes = lsh.hash_matrix(w, hf, center=tb.center)
    np.testing.assert_array_equal(tb.codes, codes)
    for t in range(hf.n_tables):
        np.testing.assert_array_equal(np.sort(tb.ids[t]), np.arange(300))
        for b in range(hf.num_buckets):
            np.testing.assert_array_equal(members(tb, t, b), np.flatnonzero(codes[t] == b))
    # Centring spreads the neurons: no table puts more than half of them in one bucket.
    for t in range(hf.n_tables):
        assert np.bincount(tb.codes[t]).max() < 150


@pytest.mark.parametrize("capacity", [1, 7, 50, 99])
def test_full_bucket_keeps_what_a_stable_sort_would(capacity):
    """The linear-time selection of a full bucket's members equals a stable argsort's first `capacity`,
    sorted by id, including ties at the cut (keys drawn from a small range: many equal keys)."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        members = rng.permutation(10_000)[:100].astype(np.int32)
        keys = rng.integers(-6, 6, size=100).astype(np.int64)
        expected = np.sort(members[np.argsort(keys, kind="mergesort")[:capacity]])
        np.testing.assert_array_equal(tables._best_members(members, keys.copy(), capacity), expected)


@pytest.mark.parametrize("size, capacity", [(2, 1), (30, 6), (97, 40), (564, 128)])
def test_sample_members_keeps_each_member_equally_often_and_varies_the_sets(size, capacity):
    """A full bucket of one insertion round keeps capacity distinct members in ascending order, each
    with probability capacity / size over random keys, and not always the same few sets."""
    rng = np.random.default_rng(size)
    members = np.sort(rng.permutation(10 * size)[:size]).astype(np.int32)
    draws = 4000
    freq = np.zeros(size)
    sets = set()
    out = np.empty(capacity, dtype=np.int32)
    for key in rng.integers(0, 2**63, size=draws, dtype=np.uint64):
        tables._sample_members(members, capacity, key, out)
        assert np.all(np.diff(out) > 0) and np.isin(out, members).all()
        freq += np.isin(members, out)
        sets.add(out.tobytes())
    expected = capacity / size
    sd = math.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq / draws - expected) < 5 * sd + 1e-12), freq / draws
    assert len(sets) >= min(math.comb(size, capacity), 50)
