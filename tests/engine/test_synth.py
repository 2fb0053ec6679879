"""Synthetic data: determinism, file streaming, realistic statistics and a learnable signal."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from engine.data import read_xmc
from engine.metrics import precision_at_k
from engine.sparse import Dataset
from engine.synth import PRESETS, SynthParams, generate, generate_split, generate_to_files

ARRAYS = ("x_indptr", "x_indices", "x_values", "y_indptr", "y_indices")


def assert_same(a: Dataset, b: Dataset) -> None:
    assert (a.num_features, a.num_labels) == (b.num_features, b.num_labels)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.fixture(scope="module")
def tiny():
    return generate("tiny", seed=0)


def test_presets_have_the_benchmark_shapes():
    a = PRESETS["amazon670k"]
    assert (a.num_train, a.num_test, a.num_features, a.num_labels) == (490_449, 153_025, 135_909, 670_091)
    assert (a.avg_features, a.avg_labels) == (75, 5.4)
    d = PRESETS["delicious200k"]
    assert (d.num_train, d.num_test, d.num_features, d.num_labels) == (196_606, 100_095, 782_585, 205_443)
    assert (d.avg_features, d.avg_labels) == (300, 75)
    t = PRESETS["tiny"]
    assert t.num_train + t.num_test <= 5_000 and t.num_labels <= 1_000


def test_same_seed_same_data_other_seed_other_data(tiny):
    train, test = tiny
    again_train, again_test = generate("tiny", seed=0)
    assert_same(train, again_train)
    assert_same(test, again_test)
    other, _ = generate("tiny", seed=1)
    assert not np.array_equal(other.x_indices[:1000], train.x_indices[:1000])
    assert train.num_points == 2_000 and test.num_points == 500


def test_files_are_byte_identical_and_equal_to_memory(tmp_path):
    params = PRESETS["tiny"].scaled(num_train=700, num_test=300, chunk_points=256)
    a_train, a_test = generate_to_files(params, tmp_path / "a", seed=7)
    b_train, b_test = generate_to_files(params, tmp_path / "b", seed=7)
    assert a_train.read_bytes() == b_train.read_bytes()
    assert a_test.read_bytes() == b_test.read_bytes()
    assert a_train.name == "tiny_train.txt" and a_train.read_bytes().startswith(b"700 2000 500\n")
    train, test = generate(params, seed=7)
    assert_same(read_xmc(a_train), train)
    assert_same(read_xmc(a_test), test)
    g_train, _ = generate_to_files(params, tmp_path / "g", seed=7, gzip=True)
    h_train, _ = generate_to_files(params, tmp_path / "h", seed=7, gzip=True)
    assert g_train.name.endswith(".txt.gz") and g_train.read_bytes() == h_train.read_bytes()
    assert gzip.decompress(g_train.read_bytes()) == a_train.read_bytes()
    assert not list((tmp_path / "a").glob(".*tmp*"))  # written under a temporary name, then renamed


def test_chunks_of_generate_split_match_generate():
    params = PRESETS["tiny"].scaled(num_train=500, num_test=50, chunk_points=128)
    train, _ = generate(params, seed=3)
    chunks = list(generate_split(params, "train", seed=3))
    assert [c.num_points for c in chunks] == [128, 128, 128, 116]
    assert_same(chunks[1], train.row_slice(128, 256))


def test_rows_are_valid_sparse_points(tiny):
    for ds in tiny:
        assert ds.x_indices.dtype == np.int32 and ds.x_values.dtype == np.float32
        assert ds.x_indptr.dtype == np.int64 and ds.y_indices.dtype == np.int32
        assert ds.x_indices.min() >= 0 and ds.x_indices.max() < ds.num_features
        assert ds.y_indices.min() >= 0 and ds.y_indices.max() < ds.num_labels
        assert np.all(np.diff(ds.y_indptr) >= 1), "every point has at least one label"
        assert np.all(np.diff(ds.x_indptr) >= 1)
        for indptr, idx in ((ds.x_indptr, ds.x_indices), (ds.y_indptr, ds.y_indices)):
            rows = np.repeat(np.arange(ds.num_points), np.diff(indptr))
            inside = rows[1:] == rows[:-1]
            assert np.all(np.diff(idx)[inside] > 0), "ids strictly increasing within each row"
        assert np.all(ds.x_values > 0) and np.all(np.isfinite(ds.x_values))
        rows = np.repeat(np.arange(ds.num_points), np.diff(ds.x_indptr))
        norms = np.sqrt(np.bincount(rows, weights=ds.x_values.astype(np.float64) ** 2))
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # L2-normalised, then rounded to 4 digits
        assert len(np.unique(ds.x_values)) > 100  # tf-idf weights, not binary


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_means_match_the_preset(name):
    p = PRESETS[name].scaled(num_train=4_000, num_test=10)
    train, _ = generate(p, seed=2)
    s = train.summary()
    assert s["avg_labels_per_point"] == pytest.approx(p.avg_labels, rel=0.05)
    assert s["avg_features_per_point"] == pytest.approx(p.avg_features, rel=0.05)
    nl = np.diff(train.y_indptr)
    assert nl.std() > 0.5 and nl.max() <= p.max_labels  # spread around the mean, not constant


def test_amazon_statistics_at_reduced_point_count():
    train, test = generate("amazon670k", num_train=3_000, num_test=100, seed=1)
    assert (train.num_features, train.num_labels) == (135_909, 670_091)
    assert train.num_points == 3_000 and test.num_points == 100
    s = train.summary()
    assert s["avg_labels_per_point"] == pytest.approx(5.4, rel=0.05)
    assert s["avg_features_per_point"] == pytest.approx(75, rel=0.05)


def test_label_popularity_is_zipf_like():
    train, _ = generate("small", num_train=20_000, num_test=10, seed=0)
    counts = np.sort(train.label_counts())[::-1].astype(np.float64)
    ranks = np.arange(1, len(counts) + 1)
    mid = (ranks >= 20) & (ranks <= 1_000)
    slope = np.polyfit(np.log(ranks[mid]), np.log(counts[mid]), 1)[0]
    assert -1.3 < slope < -0.5, slope
    share_top_1pct = counts[: len(counts) // 100].sum() / counts.sum()
    assert share_top_1pct > 0.08  # 8x the uniform share
    assert counts[0] < 0.1 * train.num_points  # but no label is on almost every point


def _dense(ds: Dataset, width: int, indptr, indices, values=None) -> np.ndarray:
    out = np.zeros((ds.num_points, width), dtype=np.float32)
    rows = np.repeat(np.arange(ds.num_points), np.diff(indptr))
    out[rows, indices] = 1.0 if values is None else values
    return out


def test_tiny_is_learnable_but_not_trivial(tiny):
    """A centroid scorer (per-label sum of training feature vectors) beats popularity by far, not perfectly."""
    train, test = tiny
    x_train = _dense(train, train.num_features, train.x_indptr, train.x_indices, train.x_values)
    y_train = _dense(train, train.num_labels, train.y_indptr, train.y_indices)
    x_test = _dense(test, test.num_features, test.x_indptr, test.x_indices, test.x_values)
    centroids = y_train.T @ x_train
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-9
    pred = np.argsort(-(x_test @ centroids.T), axis=1)[:, :5]
    p1 = precision_at_k(pred, test.y_indptr, test.y_indices, 1)
    popular = np.argsort(-train.label_counts(), kind="stable")[:5]
    baseline = precision_at_k(np.tile(popular, (test.num_points, 1)), test.y_indptr, test.y_indices, 1)
    assert 0.02 < baseline < 0.2
    assert p1 > 3 * baseline, (p1, baseline)
    assert p1 < 0.95, p1
    # the planted structure, not label frequency, is what the scorer finds: shuffled labels kill it
    rng = np.random.default_rng(0)
    shuffled = y_train[rng.permutation(train.num_points)]
    c2 = shuffled.T @ x_train
    c2 /= np.linalg.norm(c2, axis=1, keepdims=True) + 1e-9
    p1_shuffled = precision_at_k(np.argsort(-(x_test @ c2.T), axis=1)[:, :1], test.y_indptr, test.y_indices, 1)
    assert p1_shuffled < p1 / 3


def test_scaled_and_overrides():
    p = PRESETS["amazon670k"].scaled(0.01)
    assert p.num_train == round(490_449 * 0.01) and p.num_labels == round(670_091 * 0.01)
    assert p.avg_features == 75 and p.avg_labels == 5.4
    q = PRESETS["tiny"].scaled(num_train=10)
    assert q.num_train == 10 and q.num_test == PRESETS["tiny"].num_test
    assert PRESETS["tiny"].scaled(0.001).num_features >= 4 * PRESETS["tiny"].avg_features


def test_bad_parameters_say_how_to_fix():
    with pytest.raises(ValueError, match="unknown preset 'amazon'; choose one of"):
        generate("amazon")
    with pytest.raises(ValueError, match="unknown SynthParams field 'num_point'"):
        PRESETS["tiny"].scaled(num_point=5)
    with pytest.raises(ValueError, match="avg_features: must be in"):
        SynthParams(10, 10, 100, 10, avg_features=50, avg_labels=2)
    with pytest.raises(ValueError, match="avg_labels"):
        SynthParams(10, 10, 1000, 10, avg_features=5, avg_labels=20)
    with pytest.raises(ValueError, match="seed"):
        generate("tiny", seed=-1)
    with pytest.raises(ValueError, match="split must be"):
        generate_split("tiny", "valid")
