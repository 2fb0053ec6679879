"""Trainer: determinism, lazy updates, the rehash/rebuild schedule, drift-based rehash, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import lsh
from engine._numba import set_threads
from engine.config import (
    ModelConfig,
    OptimizerConfig,
    PredictConfig,
    SamplingConfig,
    ScheduleConfig,
    SlideConfig,
    with_settings,
)
from engine.network import SlideModel
from engine.sparse import load_dataset, save_dataset
from engine.trainer import Trainer

from . import naive


@pytest.fixture(scope="module")
def data():
    return naive.planted_dataset(160, 80, 150, seed=4, vocab=6, noise=3, max_labels=3, unlabelled=0.05)


SAMPLED = SlideConfig(
    model=ModelConfig(hidden=(16,), sample_output=True, init_std=0.05),
    sampling=SamplingConfig(
        hash_family="simhash",
        hash_k=4,
        hash_l=5,
        bucket_size=16,
        min_active=8,
        rehash_n0=3,
        rehash_lambda=0.3,
        rebuild_every=2,
    ),
    optimizer=OptimizerConfig(batch_size=16, lr=5e-3),
    schedule=ScheduleConfig(epochs=1),
    seed=17,
)


def all_arrays(trainer):
    return {k: np.array(v) for k, v in trainer.arrays().items()}


def assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---- determinism ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        SAMPLED,
        SAMPLED.replace(
            model=SAMPLED.model.replace(hidden=(16, 12), sample_hidden=True),
            sampling=SAMPLED.sampling.replace(hash_family="dwta", hash_k=2, bin_size=4),
        ),
        SAMPLED.replace(
            model=SAMPLED.model.replace(sample_output=False), sampling=SAMPLED.sampling.replace(insertion="reservoir")
        ),
    ],
    ids=["sampled", "sampled-hidden-dwta", "dense"],
)
def test_same_seed_one_thread_is_bit_identical(data, config):
    a = Trainer(config.replace(threads=1), data)
    b = Trainer(config.replace(threads=1), data)
    ra, rb = a.run(), b.run()
    assert a.step == b.step == 10 and a.rehash_round >= 2  # rehashes and a rebuild happened
    assert ra["loss"] == rb["loss"]
    assert_same_arrays(all_arrays(a), all_arrays(b))
    # A different seed gives a different model.
    c = Trainer(config.replace(threads=1, seed=18), data)
    c.run()
    assert not np.array_equal(c.model.weights[-1], a.model.weights[-1])


@pytest.mark.parametrize(
    "config",
    [
        SAMPLED,
        SAMPLED.replace(
            model=SAMPLED.model.replace(hidden=(16, 12), sample_hidden=True),
            sampling=SAMPLED.sampling.replace(insertion="reservoir"),
        ),
    ],
    ids=["sampled", "sampled-hidden"],
)
def test_one_and_two_threads_are_bit_identical(data, config):
    """Updates are row-owned and summed in point order, the fused backward pass through the output
    layer keeps its partial sums per row chunk (a fixed number) and adds them in order, and per-point
    randomness is keyed by the point's stream, so the thread count must not change a single bit."""
    one = Trainer(config.replace(threads=1), data)
    two = Trainer(config.replace(threads=2), data)
    one.run()
    two.run()
    assert_same_arrays(all_arrays(one), all_arrays(two))


def test_a_memory_mapped_training_set_trains_bit_identically(data, tmp_path):
    """Batches of a memory-mapped dataset are read with pread (sparse.RowReader), not through the map:
    the model must be the same bits as one trained from the arrays in memory."""
    save_dataset(data, tmp_path / "train")
    mapped = load_dataset(tmp_path / "train")
    assert mapped.x_values._mmap is not None
    a = Trainer(SAMPLED.replace(threads=2), data)
    b = Trainer(SAMPLED.replace(threads=2), mapped, mapped)
    a.run()
    b.run()
    assert_same_arrays(all_arrays(a), all_arrays(b))


# ---- lazy updates ----------------------------------------------------------------------------------------
def test_lazy_adam_touches_only_active_rows_and_present_features(data):
    set_threads(1)
    cfg = SAMPLED.replace(sampling=SAMPLED.sampling.replace(rehash_n0=1000, min_active=0))
    trainer = Trainer(cfg, data)
    model = trainer.model
    out = model.depth - 1
    active_count = np.zeros(model.num_labels, dtype=np.int64)
    feature_count = np.zeros(model.num_features, dtype=np.int64)
    for points in (np.arange(0, 16), np.arange(16, 32), np.arange(8, 24)):
        before = [w.copy() for w in model.weights]
        b0_before = model.b0.copy()
        trainer.train_step(points)
        act_ids, nact = trainer._bufs.act.act_ids, trainer._bufs.act.nact
        active = np.unique(np.concatenate([act_ids[out - 1][i, : nact[i, out]] for i in range(len(points))]))
        present = np.unique(np.concatenate([data.x_indices[data.x_indptr[p] : data.x_indptr[p + 1]] for p in points]))
        assert 0 < len(active) < model.num_labels and 0 < len(present) < model.num_features
        active_count[active] += 1
        feature_count[present] += 1
        idle = np.setdiff1d(np.arange(model.num_labels), active)
        absent = np.setdiff1d(np.arange(model.num_features), present)
        # Untouched rows: bit-identical weights.
        np.testing.assert_array_equal(model.weights[out][idle], before[out][idle])
        np.testing.assert_array_equal(model.weights[0][absent], before[0][absent])
        # Touched rows moved (all but those only an unlabelled point or a dead ReLU touched).
        assert np.mean(np.any(model.weights[out][active] != before[out][active], axis=1)) > 0.9
        assert np.mean(np.any(model.weights[0][present] != before[0][present], axis=1)) > 0.8
        assert not np.array_equal(model.b0, b0_before)
    # Per-row step counts = batches in which the row was touched; never-touched rows have no state.
    np.testing.assert_array_equal(trainer.adam.steps[out], active_count)
    np.testing.assert_array_equal(trainer.adam.steps[0], feature_count)
    never = active_count == 0
    assert never.any()
    assert np.all(trainer.adam.m[out][never] == 0) and np.all(trainer.adam.v[out][never] == 0)
    assert np.all(trainer.adam.m[0][feature_count == 0] == 0)


# ---- rehash schedule -------------------------------------------------------------------------------------
def expected_rehash_steps(n0, lam, cap, total):
    steps, at, i = [], n0, 0
    while at <= total:
        steps.append(at)
        i += 1
        at += max(1, int(round(min(cap, n0 * math.exp(lam * i)))))
    return steps


@pytest.mark.parametrize("n0, lam, cap", [(3, 0.5, 20), (5, 0.0, 100), (2, 1.0, 7)])
def test_rehash_intervals_follow_the_decaying_schedule(data, n0, lam, cap):
    set_threads(1)
    cfg = SAMPLED.replace(
        sampling=SAMPLED.sampling.replace(
            rehash_n0=n0, rehash_lambda=lam, rehash_max_interval=cap, rebuild_every="never"
        ),
        optimizer=SAMPLED.optimizer.replace(batch_size=2),
    )
    trainer = Trainer(cfg, data)
    fired = []
    original = trainer.rehash

    def record():
        fired.append(trainer.step)
        return original()

    trainer.rehash = record
    total = 75
    for s in range(total):
        trainer.train_step(np.arange(2 * (s % 80), 2 * (s % 80) + 2))
    want = expected_rehash_steps(n0, lam, cap, total)
    assert fired == want
    intervals = np.diff([0] + fired)
    assert intervals[0] == n0 and intervals.max() <= cap
    assert trainer.rehash_round == len(want)
    if lam == 0.5:
        assert list(intervals[:5]) == [3, 5, 8, 13, 20]  # 3 e^(0.5 i), rounded, capped at 20


def test_rehash_reinserts_every_neuron_at_its_current_bucket(data):
    set_threads(1)
    trainer = Trainer(SAMPLED.replace(sampling=SAMPLED.sampling.replace(rehash_n0=1000, rebuild_every="never")), data)
    model = trainer.model
    hf, tb = model.hashes[0], model.tables[0]
    for s in range(4):
        trainer.train_step(np.arange(16 * s, 16 * s + 16))
    w = model.weights[-1]
    stale = lsh.hash_matrix(w, hf, center=tb.center)
    assert not np.array_equal(stale, tb.codes), "weights moved, so some codes are stale"
    assert trainer.rehash() == model.num_labels
    np.testing.assert_allclose(tb.center, model.float_weights(-1)[:, :-1].mean(axis=0), rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(tb.codes, lsh.hash_matrix(w, hf, center=tb.center))
    assert np.all(tb.inserted == 1)
    assert np.all(trainer.adam.drift[-1] == 0)


def test_drift_threshold_rehashes_only_drifted_rows(data):
    set_threads(1)
    trainer = Trainer(
        SAMPLED.replace(
            sampling=SAMPLED.sampling.replace(
                rehash_n0=1000, rebuild_every="never", drift_threshold=0.05, bucket_size=1000
            )
        ),
        data,
    )
    model = trainer.model
    out = model.depth - 1
    hf, tb = model.hashes[0], model.tables[0]
    for s in range(6):
        trainer.train_step(np.arange(16 * s, 16 * s + 16))
    w = model.weights[out]
    norms = np.linalg.norm(model.float_weights(out)[:, :-1], axis=1)
    ratio = trainer.adam.drift[out] / norms
    # Pick the threshold so that about half of the touched rows count as drifted.
    threshold = float(np.median(ratio[ratio > 0]))
    trainer.config = trainer.config.replace(sampling=trainer.config.sampling.replace(drift_threshold=threshold))
    drifted = np.flatnonzero(trainer.adam.drift[out] > threshold * norms)
    steady = np.setdiff1d(np.arange(model.num_labels), drifted)
    assert 0 < len(drifted) < model.num_labels
    codes_before, inserted_before = tb.codes.copy(), tb.inserted.copy()
    drift_before = trainer.adam.drift[out].copy()
    center_before = tb.center.copy()
    fresh = lsh.hash_matrix(w, hf, center=tb.center)
    assert not np.array_equal(fresh[:, steady], codes_before[:, steady]), (
        "some steady rows would hash elsewhere now: the test can tell a full rehash from a partial one"
    )

    assert trainer.rehash() == len(drifted)
    np.testing.assert_array_equal(tb.center, center_before)  # a partial rehash keeps the key centre
    np.testing.assert_array_equal(tb.codes[:, drifted], fresh[:, drifted])
    np.testing.assert_array_equal(tb.codes[:, steady], codes_before[:, steady])
    assert np.all(tb.inserted[drifted] == 1)
    np.testing.assert_array_equal(tb.inserted[steady], inserted_before[steady])
    assert np.all(trainer.adam.drift[out][drifted] == 0)
    np.testing.assert_array_equal(trainer.adam.drift[out][steady], drift_before[steady])
    # The buckets hold what the codes say.
    for t in range(hf.n_tables):
        for b in np.unique(tb.codes[t]):
            got = tb.ids[t, tb.offsets[t, b] : tb.offsets[t, b + 1]]
            np.testing.assert_array_equal(got, np.flatnonzero(tb.codes[t] == b))


def test_rebuild_every_draws_new_functions(data):
    set_threads(1)
    trainer = Trainer(
        SAMPLED.replace(sampling=SAMPLED.sampling.replace(rehash_n0=1000, rebuild_every=2, drift_threshold=0.5)), data
    )
    model = trainer.model
    history = [model.hashes[0]]
    for r in range(1, 5):
        trainer.train_step(np.arange(16 * r, 16 * r + 16))
        hashed = trainer.rehash()
        hf, tb = model.hashes[0], model.tables[0]
        if r % 2 == 0:
            assert not np.array_equal(hf.idx, history[-1].idx) or not np.array_equal(hf.sign, history[-1].sign)
            assert hf.seed != history[-1].seed
            assert hashed == model.num_labels  # a rebuild rehashes every neuron
            assert np.all(tb.inserted == r)
            np.testing.assert_array_equal(tb.codes, lsh.hash_matrix(model.weights[-1], hf, center=tb.center))
        else:
            assert hf is history[-1]
        history.append(hf)
    # Rebuilds are seeded: a second trainer draws the same functions.
    other = Trainer(
        SAMPLED.replace(sampling=SAMPLED.sampling.replace(rehash_n0=1000, rebuild_every=2, drift_threshold=0.5)), data
    )
    for r in range(1, 3):
        other.train_step(np.arange(16 * r, 16 * r + 16))
        other.rehash()
    np.testing.assert_array_equal(other.model.hashes[0].idx, history[2].idx)


# ---- learning --------------------------------------------------------------------------------------------
def tiny_data():
    try:
        from engine.synth import generate
    except ImportError:  # the generator is optional for this test: fall back to a planted dataset
        return (
            naive.planted_dataset(2000, 2000, 500, seed=1, vocab=10, noise=20, max_labels=4),
            naive.planted_dataset(500, 2000, 500, seed=1, vocab=10, noise=20, max_labels=4),
        )
    return generate("tiny", seed=0)


def popularity_p_at_1(train, test):
    top = int(np.argmax(train.label_counts()))
    return float(
        np.mean([top in test.y_indices[test.y_indptr[i] : test.y_indptr[i + 1]] for i in range(test.num_points)])
    )


@pytest.fixture(scope="module")
def tiny():
    return tiny_data()


def train_tiny(tiny, changes=None):
    """Train on the tiny set with these settings changed, by path (`{"sampling.hash_k": 6}`)."""
    train, test = tiny
    cfg = SlideConfig(
        model=ModelConfig(hidden=(32,), sample_output=True),
        sampling=SamplingConfig(rehash_n0=10),
        optimizer=OptimizerConfig(batch_size=32, lr=1e-2),
        schedule=ScheduleConfig(epochs=3, eval_points=None),
        seed=0,
        threads=None,
    )
    trainer = Trainer(with_settings(cfg, changes or {}), train, test)
    history = []
    final = trainer.run(on_metrics=history.append)
    return trainer, history, final


def test_training_on_tiny_synthetic_data_learns(tiny):
    train, test = tiny
    baseline = popularity_p_at_1(train, test)
    assert baseline < 0.1
    trainer, history, final = train_tiny(
        tiny,
        {"sampling.hash_family": "simhash", "sampling.hash_k": 6, "sampling.hash_l": 8, "sampling.max_active": "none"},
    )
    assert [h.epoch for h in history] == [1, 2, 3] and not final["stopped"]
    assert history[-1].loss < history[0].loss
    assert history == trainer.history
    assert final["active_fraction"] < 0.3  # really sampled
    exact = trainer.evaluate(mode="exact")["p_at_1"]
    assert final["eval_mode"] == "exact"  # auto: a 500-label output layer is cheap to score exactly
    assert exact > max(0.25, 3 * baseline), (exact, baseline)
    sampled = trainer.evaluate(mode="lsh")
    assert sampled["eval_mode"] == "lsh"
    assert sampled["p_at_1"] > max(0.2, 2.5 * baseline), (sampled["p_at_1"], baseline)


@pytest.fixture(scope="module")
def default_trained(tiny):
    return train_tiny(tiny)


def test_default_hashing_learns_on_tiny_synthetic_data(tiny, default_trained):
    """What a user gets without tuning: auto K, default L, the automatic active-set cap."""
    train, test = tiny
    baseline = popularity_p_at_1(train, test)
    trainer, history, final = default_trained
    assert final["active_fraction"] <= 0.1
    exact = trainer.evaluate(mode="exact")["p_at_1"]
    assert exact > 3 * baseline, (exact, baseline)
    assert final["p_at_1"] > 3 * baseline, (final["p_at_1"], baseline)


def test_multi_probe_prediction_scores_more_candidates_and_recalls_more_of_exact(tiny, default_trained):
    _, test = tiny
    trained = default_trained[0].model
    # The same arrays without a serving cap, so that every probed candidate is scored.
    model = SlideModel(
        trained.config.replace(predict=trained.config.predict.replace(max_active="none")),
        trained.num_features,
        trained.num_labels,
        trained.weights,
        trained.b0,
        trained.hashes,
        trained.tables,
    )
    x = (test.x_indptr, test.x_indices, test.x_values)
    exact, _ = model.predict(*x, k=5, mode="exact")

    def recall(labels):
        return np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, labels, strict=True)])

    plain, plain_scores, plain_scored, _ = model.predict_with_stats(*x, k=5, mode="lsh", probes=0)
    np.testing.assert_array_equal(plain, model.predict(*x, k=5, mode="lsh")[0])  # the default: no probes
    probed, probed_scores, probed_scored, _ = model.predict_with_stats(*x, k=5, mode="lsh", probes=2)
    assert np.all(probed_scored >= plain_scored) and probed_scored.mean() > 1.2 * plain_scored.mean()
    assert recall(probed) >= recall(plain)
    assert np.all(probed_scores[:, 0] >= plain_scores[:, 0])  # a superset of candidates never scores lower
    with pytest.raises(ValueError, match="probes"):
        model.predict(*x, k=5, probes=65)


def test_training_with_multi_probe_learns(tiny):
    train, test = tiny
    trainer, _, final = train_tiny(tiny, {"sampling.probes": 1})
    assert trainer.model.predict_probes == 1
    assert final["p_at_1"] > 3 * popularity_p_at_1(train, test)


def test_serving_hubs_mix_top_scores_and_longest_rows_and_leave_training_alone(tiny):
    train, test = tiny
    trainer, _, _ = train_tiny(tiny, {"predict.hubs": 40, "schedule.epochs": 1})
    model = trainer.model
    tb = model.tables[0]
    assert tb.serve_hubs.shape == (40,) and len(set(tb.serve_hubs.tolist())) == 40
    w = model.float_weights(1)
    static = w[:, :-1] @ trainer.adam.input_mean[1] + w[:, -1]
    norms = np.linalg.norm(w[:, :-1], axis=1)
    serve = set(tb.serve_hubs.tolist())
    assert set(np.argsort(-static)[:20].tolist()) <= serve
    assert set(np.argsort(-norms)[:20].tolist()) <= serve  # at least the 20 longest rows

    # Every serving hub is scored for every query: the lsh top-1 beats each of them.
    x = (test.x_indptr[:51], test.x_indices[: test.x_indptr[50]], test.x_values[: test.x_indptr[50]])
    _, top, scored, _ = model.predict_with_stats(*x, k=1, mode="lsh")
    assert np.all(scored >= 40)
    dense = naive.dense_rows(*x, model.num_features, dtype=np.float32)
    hidden = np.maximum(dense @ model.float_weights(0) + model.b0, 0)
    hub_scores = hidden @ w[tb.serve_hubs, :-1].T + w[tb.serve_hubs, -1]
    assert np.all(top[:, 0] >= hub_scores.max(axis=1) - 1e-4)

    # Refreshing serving hubs between steps changes nothing else.
    cfg = SlideConfig(
        model=ModelConfig(hidden=(16,), sample_output=True),
        sampling=SamplingConfig(rehash_n0=4),
        optimizer=OptimizerConfig(batch_size=16),
        schedule=ScheduleConfig(epochs=1),
        predict=PredictConfig(hubs=30),
        seed=5,
        threads=1,
    )
    plain, refreshed = Trainer(cfg, train), Trainer(cfg, train)
    order = plain.epoch_order(0)
    for s in range(0, 160, 16):
        plain.train_step(order[s : s + 16])
        refreshed.train_step(order[s : s + 16])
        refreshed.refresh_serving_hubs()
    a, b = all_arrays(plain), all_arrays(refreshed)
    a.pop("table0_serve_hubs"), b.pop("table0_serve_hubs")
    assert_same_arrays(a, b)

    # A training rehash leaves the serving hubs to the refresh (which publishing and evaluating do).
    before = plain.model.tables[0].serve_hubs.copy()
    plain.rehash()
    np.testing.assert_array_equal(plain.model.tables[0].serve_hubs, before)
    plain.refresh_serving_hubs()
    assert not np.array_equal(plain.model.tables[0].serve_hubs, before)
    # A run with nowhere to publish refreshes them at its end.
    bare = Trainer(cfg.replace(schedule=cfg.schedule.replace(eval_points=None)), train)
    bare.run(time_budget_s=0.5)
    served = bare.model.tables[0].serve_hubs.copy()
    bare.model.update_hubs(1, training=False, center=bare.adam.input_mean[1])
    np.testing.assert_array_equal(bare.model.tables[0].serve_hubs, served)


def test_train_step_refuses_empty_and_oversized_batches():
    """An empty batch would average nothing into the running input mean (NaN); an oversized one would
    overrun the batch buffers."""
    data = naive.planted_dataset(40, 30, 20, seed=3)
    trainer = Trainer(
        SlideConfig(
            model=ModelConfig(hidden=(8,), sample_output=True),
            sampling=SamplingConfig(hub_neurons=2),
            optimizer=OptimizerConfig(batch_size=8),
        ),
        data,
    )
    with pytest.raises(ValueError, match="at least one point"):
        trainer.train_step(np.arange(0))
    with pytest.raises(ValueError, match="at most batch_size=8"):
        trainer.train_step(np.arange(9))
    trainer.train_step(np.arange(8))
    assert all(np.all(np.isfinite(m)) for m in trainer.adam.input_mean.values())
