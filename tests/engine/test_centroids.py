"""Output rows started at their labels' centroids (engine.centroids, `model.output_init`): the kernel and the rows
against numpy twins, the auto rule, the trainer's use of its training split only, and what it buys on a planted
set (a statistical check with fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import ModelConfig, ScheduleConfig, SlideConfig, Trainer
from engine.centroids import CENTROID_SCALE, add_label_sums, init_output_from_centroids, label_centroids
from engine.config import CENTROID_INIT_MAX_LABELS, ConfigError
from engine.kernels.optimizer import from_bfloat16
from engine.lsh import hash_matrix
from engine.metrics import precision_at_k
from engine.network import SlideModel
from engine.resolve import output_init, resolve
from engine.sparse import RowReader

from . import naive


def _float_rows(w: np.ndarray) -> np.ndarray:
    return from_bfloat16(np.ascontiguousarray(w)) if w.dtype == np.uint16 else np.asarray(w, np.float32)


def _reference_centroids(model, data, points):
    """Numpy twin of label_centroids: float64 means of the last hidden activations, centred on the points' mean."""
    sub = RowReader(data).take(np.asarray(points))
    hidden = model.last_hidden(sub.x_indptr, sub.x_indices, sub.x_values).astype(np.float64)
    sums = np.zeros((model.num_labels, hidden.shape[1]))
    counts = np.zeros(model.num_labels, np.int64)
    for i in range(sub.num_points):
        for j in sub.y_indices[sub.y_indptr[i] : sub.y_indptr[i + 1]]:
            sums[j] += hidden[i]
            counts[j] += 1
    carried = counts > 0
    sums[carried] = sums[carried] / counts[carried, None] - hidden.mean(axis=0)
    return sums, counts


def test_add_label_sums_matches_a_loop():
    rng = np.random.default_rng(0)
    hidden = rng.random((30, 7), dtype=np.float32)
    y_indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 4, 30))]).astype(np.int64)
    y_indices = rng.integers(0, 11, y_indptr[-1]).astype(np.int64)
    sums, counts = np.zeros((11, 7), np.float32), np.zeros(11, np.int64)
    add_label_sums(y_indptr, y_indices, hidden, sums, counts)
    want, want_counts = np.zeros((11, 7)), np.zeros(11, np.int64)
    for i in range(30):
        for j in y_indices[y_indptr[i] : y_indptr[i + 1]]:
            want[j] += hidden[i]
            want_counts[j] += 1
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(sums, want, rtol=1e-5)


@pytest.mark.parametrize("sample_output", [False, True])
def test_rows_point_along_the_centred_centroids_at_the_scaled_length(sample_output, monkeypatch):
    """Carried labels' rows are their centred centroids (in chunks, as the twin computes them at once) at
    CENTROID_SCALE times the random rows' median length; other rows and every bias stay; a sampled layer's buckets
    hold the new rows' codes."""
    import engine.centroids as centroids

    monkeypatch.setattr(centroids, "CENTROID_CHUNK", 16)  # several chunks
    monkeypatch.setattr(centroids, "CENTROID_WRITE_ROWS", 7)
    data = naive.planted_dataset(120, 50, 40, seed=4, vocab=5, noise=2)
    cfg = SlideConfig(model=ModelConfig(hidden=(12,), sample_output=sample_output), seed=3)
    model = SlideModel.initialize(cfg, data.num_features, data.num_labels)
    before = _float_rows(model.weights[-1]).copy()
    length = float(np.median(model.row_norms(model.depth - 1))) * CENTROID_SCALE
    points = np.arange(0, 120, 2)  # half the points: labels carried only by the others keep their rows
    want, counts = _reference_centroids(model, data, points)
    got_centroids, got_counts = label_centroids(model, RowReader(data), points)
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_allclose(got_centroids, want, atol=1e-5)
    assert 0 < (counts == 0).sum() < data.num_labels

    set_rows = init_output_from_centroids(model, RowReader(data), points)
    after = _float_rows(model.weights[-1])
    carried = counts > 0
    assert set_rows == carried.sum()
    unit = want[carried] / np.linalg.norm(want[carried], axis=1, keepdims=True)
    np.testing.assert_allclose(after[carried, :-1], unit * length, rtol=1e-2, atol=1e-2 * length)
    np.testing.assert_array_equal(after[~carried], before[~carried])
    np.testing.assert_array_equal(after[:, -1], before[:, -1])
    if sample_output:
        slot = int(model.layer_slot[-1])
        tb = model.tables[slot]
        codes = hash_matrix(model.weights[-1], model.hashes[slot], center=tb.center)
        np.testing.assert_array_equal(tb.codes, codes)
        for t in range(tb.offsets.shape[0]):  # every row sits in the bucket of its code (buckets are not full here)
            for j in range(model.num_labels):
                b = codes[t, j]
                assert j in tb.ids[t, tb.offsets[t, b] : tb.offsets[t, b + 1]]


def test_the_auto_rule_and_the_setting():
    cfg = SlideConfig()
    assert output_init(cfg, CENTROID_INIT_MAX_LABELS) == "centroids"
    assert output_init(cfg, CENTROID_INIT_MAX_LABELS + 1) == "random"
    assert resolve(cfg, 100, 500).output_init == "centroids"
    assert resolve(cfg, 100, 500).to_dict()["output_init"] == "centroids"  # what auto resolved to is shown
    random = SlideConfig(model=ModelConfig(output_init="random"))
    assert output_init(random, 10) == "random"
    assert SlideConfig.from_dict({"model": {"output_init": None}}).model.output_init is None
    with pytest.raises(ConfigError, match="model.output_init") as err:
        SlideConfig.from_dict({"model": {"output_init": "pifa"}})
    assert "random or centroids" in str(err.value)


def test_a_fresh_trainer_starts_from_centroids_of_its_training_split_only():
    data = naive.planted_dataset(1200, 60, 30, seed=5, vocab=5, noise=2)
    cfg = SlideConfig(model=ModelConfig(hidden=(16,)), schedule=ScheduleConfig(epochs=1), seed=2, threads=1)
    trainer = Trainer(cfg, data)
    assert trainer._val_idx.size > 0  # a validation split, which the centroids must not see
    fresh = SlideModel.initialize(trainer.config, data.num_features, data.num_labels)
    want = fresh.weights[-1].copy()
    assert init_output_from_centroids(fresh, RowReader(data), trainer._train_idx) > 0
    np.testing.assert_array_equal(trainer.model.weights[-1], fresh.weights[-1])
    assert not np.array_equal(trainer.model.weights[-1], want)
    np.testing.assert_array_equal(trainer.model.weights[0], fresh.weights[0])  # only the output layer moves

    plain = Trainer(cfg.replace(model=cfg.model.replace(output_init="random")), data)
    np.testing.assert_array_equal(plain.model.weights[-1], want)


def test_centroid_rows_learn_more_in_one_epoch_than_random_ones():
    """Planted data with Zipf-popular labels (3,000 training and 600 test points of one set), one epoch, three
    seeds: starting from the centroids reaches a higher test P@1 on every seed than random rows."""
    data = naive.planted_dataset(3600, 300, 200, seed=11, vocab=4, noise=3)
    train, test = data.row_slice(0, 3000), data.row_slice(3000, 3600)
    wins = []
    for seed in (0, 1, 2):
        p1 = {}
        for init in ("centroids", "random"):
            cfg = SlideConfig(
                model=ModelConfig(hidden=(32,), output_init=init),
                schedule=ScheduleConfig(epochs=1),
                seed=seed,
                threads=1,
            )
            trainer = Trainer(cfg, train)
            trainer.run()
            pred, _ = trainer.model.predict(test.x_indptr, test.x_indices, test.x_values, k=1)
            p1[init] = precision_at_k(pred, test.y_indptr, test.y_indices, 1)
        wins.append(p1["centroids"] - p1["random"])
    assert min(wins) > 0, wins
