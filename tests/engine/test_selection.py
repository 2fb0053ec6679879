"""Model selection on the validation split: best snapshot, early stopping, reduce-on-plateau, resume; and
`auto` serving (per layer: tables where they recall the exact top-5, every neuron elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import lsh, schedule
from engine.config import ModelConfig, OptimizerConfig, PredictConfig, SamplingConfig, ScheduleConfig, SlideConfig
from engine.network import SERVE_HUBS_MAX_SHARE, SlideModel, topk_recall
from engine.snapshot import SnapshotStore, load_arrays, load_model, model_arrays, model_from_arrays, read_manifest
from engine.sparse import unit_rows
from engine.trainer import TRAINING_ARRAYS, Trainer

from . import naive

CFG = SlideConfig(
    model=ModelConfig(hidden=(16,), sample_output=True, init_std=0.05),
    sampling=SamplingConfig(hash_k=4, hash_l=5, bucket_size=32, rehash_n0=3),
    optimizer=OptimizerConfig(batch_size=16, lr=5e-3, hidden_dropout=0.0),
    schedule=ScheduleConfig(
        epochs=8, val_points=40, early_stop_patience=3, lr_decay=0.5, lr_epoch_decay=1.0, lr_warmup_steps="none"
    ),
    seed=5,
    threads=1,
)


@pytest.fixture(scope="module")
def data():
    train = naive.planted_dataset(168, 70, 90, seed=6, vocab=6, noise=3)
    test = naive.planted_dataset(40, 70, 90, seed=7, vocab=6, noise=3)
    return train, test


class Scripted(Trainer):
    """A trainer whose validation P@1 follows a script (one value per evaluation), to test the bookkeeping."""

    script: list[float] = []

    def _validation_scores(self, val):
        score = self.script[len([h for h in self.history if h.val_p_at_1 is not None])]
        return {"val_p_at_1": score, "val_p_at_5": score / 2, "val_eval_mode": "exact"}


def kept_best(trainer: Trainer) -> dict:
    """The arrays of the best model a trainer keeps: in memory, or in its spill directory's files."""
    if trainer._best_arrays is not None:
        return trainer._best_arrays
    assert trainer._best_files is not None
    return trainer._best_files.load()


def predictions(model, data, mode="auto"):
    return model.predict(data.x_indptr, data.x_indices, data.x_values, k=5, mode=mode)


def test_early_stopping_best_snapshot_and_plateau_decay(tmp_path, data):
    train, test = data
    store = SnapshotStore(tmp_path, keep=100)
    trainer = Scripted(CFG, train, test, store=store)
    trainer.script = [0.1, 0.3, 0.2, 0.3, 0.25, 0.9, 0.9, 0.9]
    snapshots = []
    result = trainer.run(on_snapshot=lambda v, p: snapshots.append(p), snapshot_every_s=0.0)
    # epochs of 8 steps (128 training points): the best is after epoch 2, then 3 evaluations without a new
    # best (0.3 again is not better) stop training after epoch 5; the scripted 0.9 never comes
    assert [h.val_p_at_1 for h in trainer.history] == [0.1, 0.3, 0.2, 0.3, 0.25]
    assert result["early_stopped"] and not result["stopped"] and trainer.epoch == 5
    assert trainer.best == {"val_p_at_1": 0.3, "step": 16, "epoch": 2, "samples": 16 * 16}
    assert trainer.lr_decays == 3 and [h.lr for h in trainer.history] == pytest.approx([5e-3] * 3 + [2.5e-3, 1.25e-3])
    assert result["served_step"] == 16
    # the final model is the best one, and so is the newest snapshot's
    final = read_manifest(snapshots[-1])
    assert final["trainer_state"]["training_arrays"] == TRAINING_ARRAYS
    assert final["trainer_state"]["best"]["step"] == 16 and final["trainer_state"]["early_stopped"]
    served = load_model(snapshots[-1])
    np.testing.assert_array_equal(predictions(served, test)[1], predictions(trainer.model, test)[1])
    # ... which is what the model was at step 16 (the snapshot taken at that step, before its evaluation,
    # served the best before it, step 8's, and carried step 16's as the training state)
    at16 = [p for p in snapshots if read_manifest(p)["trainer_state"]["step"] == 16]
    assert at16 and read_manifest(at16[0])["trainer_state"]["best"]["step"] == 8
    arrays = load_arrays(at16[0], mmap=False)
    then = {k[len(TRAINING_ARRAYS) :]: v for k, v in arrays.items() if k.startswith(TRAINING_ARRAYS)}
    then = model_from_arrays(CFG, train.num_features, train.num_labels, then)
    np.testing.assert_array_equal(predictions(then, test, "exact")[1], predictions(served, test, "exact")[1])
    # the training state rides along: the arrays under TRAINING_ARRAYS are the last step's model
    current = load_arrays(snapshots[-1], [TRAINING_ARRAYS + "w1"], mmap=False)[TRAINING_ARRAYS + "w1"]
    np.testing.assert_array_equal(current, trainer.arrays()["w1"])
    assert not np.array_equal(current, trainer.model.weights[1])
    # resuming a finished run trains no further; the training state it validates again scores what it scored
    resumed = Scripted.resume(store, train, test)
    resumed.script = [0.1, 0.3, 0.2, 0.3, 0.25, 0.25]
    assert resumed.early_stopped and resumed.best == trainer.best
    resumed.run()
    assert resumed.step == trainer.step
    np.testing.assert_array_equal(predictions(resumed.model, test)[1], predictions(served, test)[1])
    # a warm start from it continues at the step size it had reached (3 decays: lr / 8), not at the full one
    warm = Trainer(CFG.replace(schedule=CFG.schedule.replace(epochs=1)), train, test, init_from=snapshots[-1])
    assert warm.lr_decays == 3
    warm.run()
    assert warm.history[0].lr == pytest.approx(5e-3 / 8)


def test_the_step_size_decays_by_epochs_across_resumes_and_warm_starts(tmp_path, data):
    train, test = data
    cfg = CFG.replace(schedule=CFG.schedule.replace(epochs=3, lr_decay=1.0, lr_epoch_decay=0.5))
    store = SnapshotStore(tmp_path / "run")
    trainer = Trainer(cfg, train, test, store=store)
    trainer.run(should_stop=lambda: trainer.step >= 12)
    resumed = Trainer.resume(store, train, test)
    resumed.run()
    # epochs of 8 steps; a record's rate is its window's last step's: 5e-3 * 0.5 ** (step / 8) before that step
    records = [h for h in resumed.history if h.val_p_at_1 is not None]  # the resumed run carries the first one's
    assert [h.step for h in records] == [8, 16, 24]
    assert [h.lr for h in records] == pytest.approx([5e-3 * 0.5 ** ((s - 1) / 8) for s in (8, 16, 24)])
    # a warm start goes on from the 3 epochs its source trained
    warm = Trainer(cfg.replace(schedule=cfg.schedule.replace(epochs=1)), train, test, init_from=store)
    assert warm.lr_epochs_before == pytest.approx(3.0)
    warm.run()
    assert warm.history[-1].lr == pytest.approx(5e-3 * 0.5 ** (3 + 7 / 8))


@pytest.mark.parametrize("split", [12, 21])  # after the first best (step 8), after a plateau (step 16 / 24)
def test_resume_with_a_kept_best_is_bit_identical(tmp_path, data, split):
    train, test = data
    cfg = CFG.replace(schedule=CFG.schedule.replace(epochs=4, early_stop_patience="never"))
    straight = Trainer(cfg, train, test)
    straight.run()
    store = SnapshotStore(tmp_path / "run")
    first = Trainer(cfg, train, test, store=store)
    first.run(should_stop=lambda: first.step >= split)
    assert first.step == split and first.best is not None
    resumed = Trainer.resume(store, train, test)
    assert resumed.best == first.best and resumed.lr_decays == first.lr_decays
    resumed.run()
    assert resumed.best == straight.best and resumed.lr_decays == straight.lr_decays

    def val_history(t):
        return [(h.step, h.val_p_at_1) for h in t.history if h.val_p_at_1 is not None]

    assert val_history(resumed) == val_history(straight)
    want, got = straight.arrays(), resumed.arrays()
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(predictions(resumed.model, test)[1], predictions(straight.model, test)[1])


class ScriptedLoss(Scripted):
    """Scripted, and the training loss of every step of epoch e is `losses[e]` per labelled point."""

    losses: list[float] = []

    def train_step(self, points):
        epoch = self.epoch
        _, labelled, active = super().train_step(points)
        return self.losses[epoch] * labelled, labelled, active


AUTO = CFG.replace(optimizer=CFG.optimizer.replace(hidden_dropout=None))
VALS = [0.1, 0.3, 0.2, 0.25, 0.35, 0.3, 0.3, 0.3]
LOSSES = [5.0, 4.0, 3.0, 3.1, 2.6, 2.4, 2.3, 2.2]


def scripted_auto(cfg=AUTO, **kw) -> ScriptedLoss:
    trainer = ScriptedLoss(cfg, *kw.pop("data"), **kw)
    trainer.script, trainer.losses = VALS, LOSSES
    return trainer


def test_auto_dropout_rises_when_validation_stalls_while_the_loss_falls(tmp_path, data):
    store = SnapshotStore(tmp_path, keep=100)
    trainer = scripted_auto(data=data, store=store)
    assert trainer.resolved().hidden_dropout == (0.0, 0.5) and trainer.hidden_dropout == 0.0
    restored = {}

    def on_metrics(m):
        if m.epoch == 7:  # the raise at this evaluation continued from the best model, step 40's
            best = kept_best(trainer)
            restored.update({k: np.array_equal(a, best[k]) for k, a in model_arrays(trainer.model).items()})

    trainer.run(on_metrics=on_metrics, snapshot_every_s=0.0)
    # epoch 3: a first evaluation without a new best halves the step size; epoch 4: the second in a row, but the
    # loss rose (3.1 after 3.0) -> halves; epoch 5: a new best (0.35); epoch 6: halves; epoch 7: the second in a
    # row while the loss fell (2.3 after 2.4) -> 0.5 from the best model, with a fresh early-stopping count;
    # epoch 8: halves
    assert [h.hidden_dropout for h in trainer.history] == [0.0] * 7 + [0.5]
    assert [h.lr for h in trainer.history] == pytest.approx([5e-3] * 3 + [2.5e-3] + [1.25e-3] * 2 + [6.25e-4] * 2)
    assert trainer.dropout_raises == 1 and trainer.hidden_dropout == 0.5 and trainer.lr_decays == 4
    assert trainer.evals_since_best == 1 and not trainer.early_stopped and trainer.best["epoch"] == 5
    assert restored and all(restored.values())
    state = read_manifest(store.latest()[1])["trainer_state"]
    assert state["hidden_dropout"] == 0.5 and state["dropout_raises"] == 1
    assert state["resolved"]["hidden_dropout"] == [0.0, 0.5]


def test_a_validation_score_that_creeps_up_is_a_plateau(data):
    # every evaluation a new best, most by less than the plateau margin (0.0005 or 0.0002 each)
    creep = [0.5, 0.6, 0.6005, 0.601, 0.7, 0.7002, 0.7004, 0.7006]
    assert schedule.PLATEAU_MARGIN > 0.0005
    trainer = scripted_auto(data=data)
    trainer.script, trainer.losses = creep, [5.0, 4.0, 3.0, 2.5, 2.4, 2.3, 2.2, 2.1]
    trainer.run()
    # epoch 3: a plateau halves the step size; epoch 4: the second in a row, with the loss falling -> 0.5, from
    # epoch 4's model (the best); epoch 5: progress; epochs 6-8: plateaus at the highest rate halve the step size
    # and stop training at the third
    assert [h.hidden_dropout for h in trainer.history] == [0.0] * 4 + [0.5] * 4
    assert [h.lr for h in trainer.history] == pytest.approx([5e-3] * 3 + [2.5e-3] * 3 + [1.25e-3, 6.25e-4])
    assert trainer.dropout_raises == 1 and trainer.lr_decays == 4 and trainer.early_stopped
    assert trainer.best["epoch"] == 8 and trainer.best["val_p_at_1"] == 0.7006  # each tiny gain still kept
    fixed = Scripted(CFG, *data)  # a fixed rate: plateaus count towards early stopping
    fixed.script = [0.5, 0.6, 0.6005, 0.601, 0.6015, 0.9, 0.9, 0.9]
    result = fixed.run()
    assert result["early_stopped"] and fixed.epoch == 5 and fixed.lr_decays == 3
    assert fixed.best["epoch"] == 5 and fixed.best["val_p_at_1"] == 0.6015


def test_auto_dropout_resumes_at_its_rate(tmp_path, data):
    straight = scripted_auto(data=data)
    straight.run()
    store = SnapshotStore(tmp_path)
    first = scripted_auto(data=data, store=store)
    first.run(should_stop=lambda: first.step >= 60)  # in epoch 8, after the raise
    assert first.hidden_dropout == 0.5
    resumed = Trainer.resume(store, *data)
    assert resumed.hidden_dropout == 0.5 and resumed.dropout_raises == 1
    resumed.__class__ = ScriptedLoss
    resumed.script, resumed.losses = VALS, LOSSES
    resumed.run()
    assert [h.hidden_dropout for h in resumed.history if h.val_p_at_1 is not None] == [
        h.hidden_dropout for h in straight.history
    ]
    want, got = straight.arrays(), resumed.arrays()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_fixed_rate_or_no_validation_split_never_changes_the_rate(data):
    fixed = scripted_auto(AUTO.replace(optimizer=AUTO.optimizer.replace(hidden_dropout=0.1)), data=data)
    fixed.run()
    assert {h.hidden_dropout for h in fixed.history} == {0.1} and fixed.resolved().hidden_dropout == (0.1,)
    assert fixed.lr_decays == 5 and fixed.early_stopped  # evaluations without a best count as before
    unsplit = Trainer(AUTO.replace(schedule=AUTO.schedule.replace(val_points="none", epochs=2)), *data)
    unsplit.run()
    assert unsplit.resolved().hidden_dropout == (0.0,) and {h.hidden_dropout for h in unsplit.history} == {0.0}


def test_real_validation_selects_the_best_evaluated_model(data):
    train, test = data
    trainer = Trainer(
        CFG.replace(optimizer=CFG.optimizer.replace(lr=3e-2), schedule=CFG.schedule.replace(epochs=6)), train, test
    )
    trainer.run()
    vals = [h.val_p_at_1 for h in trainer.history]
    assert trainer.best["val_p_at_1"] == max(vals)
    val = trainer._val_data
    pred, _ = predictions(trainer.model, val)
    got = float(np.mean([pred[i, 0] in val.y_indices[val.y_indptr[i] : val.y_indptr[i + 1]] for i in range(40)]))
    assert got == pytest.approx(max(vals))
    # the validation rows are never trained on: the data order of every epoch leaves them out
    held = set(trainer._val_idx.tolist())
    assert len(held) == 40
    for epoch in range(3):
        order = trainer.epoch_order(epoch)
        assert len(order) == train.num_points - 40 and not held & set(order.tolist())


# ---- auto serving -----------------------------------------------------------------------------------------
WIDE = 20_480  # lsh.is_wide_layer: more than 20,000 neurons


def wide_model() -> SlideModel:
    cfg = SlideConfig(model=ModelConfig(hidden=(8,), init_std=0.3), sampling=SamplingConfig(hash_k=6, hash_l=4), seed=3)
    return SlideModel.initialize(cfg, 60, WIDE)


def test_auto_scores_narrow_layers_exactly_and_wide_ones_from_their_tables(data):
    train, test = data
    assert lsh.is_wide_layer(WIDE) and not lsh.is_wide_layer(20_000)
    for narrow_width in (500, 641, 655, 18_931, 19_999):  # not multiples of 20 too: 5% is not a whole number
        assert not lsh.is_wide_layer(narrow_width), narrow_width
        assert lsh.resolve_l(SlideConfig(), narrow_width) == 50 and lsh.resolve_hubs(SlideConfig(), narrow_width) == 0
    assert lsh.is_wide_layer(20_001) and lsh.resolve_l(SlideConfig(), 670_091) == 16
    narrow = Trainer(CFG.replace(schedule=CFG.schedule.replace(epochs=1)), train).model
    assert narrow.resolve_mode("auto")[1] == "exact" and narrow.resolve_mode("lsh")[1] == "lsh"
    np.testing.assert_array_equal(predictions(narrow, test, "auto")[1], predictions(narrow, test, "exact")[1])
    dense = SlideModel.initialize(CFG.replace(model=CFG.model.replace(sample_output=False)), 70, 90)
    assert dense.resolve_mode("lsh")[1] == "exact"  # no tables to use
    model = wide_model()
    assert model.resolve_mode("auto")[1] == "lsh"  # before any calibration: the width rule
    x = naive.planted_dataset(30, 60, WIDE, seed=2)
    _, _, scored, used = model.predict_with_stats(x.x_indptr, x.x_indices, x.x_values, k=5)
    assert used == "lsh" and scored.max() < WIDE
    with pytest.raises(ValueError, match="mode"):
        model.predict(x.x_indptr, x.x_indices, x.x_values, mode="fast")


def naive_recall(approx, exact):
    return np.mean([len(set(a) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for a, e in zip(approx, exact, strict=True)])


def test_calibration_measures_the_tables_recall_and_chooses_by_it():
    model = wide_model()
    x = naive.planted_dataset(40, 60, WIDE, seed=2)
    args = (x.x_indptr, x.x_indices, x.x_values)
    exact, _ = model.predict(*args, k=5, mode="exact")
    tables, _ = model.predict(*args, k=5, mode="lsh")
    want = naive_recall(tables, exact)
    assert 0.0 < want < 1.0
    assert topk_recall(tables, exact) == pytest.approx(want)
    report = model.calibrate_serving(*args, min_recall=want - 1e-9)
    assert report["1"]["mode"] == "lsh" and report["1"]["recall_at_5"] == pytest.approx(want)
    np.testing.assert_array_equal(model.predict(*args)[0], tables)
    report = model.calibrate_serving(*args, min_recall=want + 1e-9)
    assert report["1"]["mode"] == "exact"
    np.testing.assert_array_equal(model.predict(*args)[0], exact)
    # with labels the P@1 of both is measured too, and a loss of more than max_p1_loss keeps it exact
    y_indptr = np.arange(41, dtype=np.int64)
    report = model.calibrate_serving(*args, y_indptr, exact[:, 0].copy(), min_recall=0.0)  # exact's top-1 is right
    hits = float(np.mean(tables[:, 0] == exact[:, 0]))
    assert report["1"]["p_at_1_exact"] == 1.0 and report["1"]["p_at_1_tables"] == pytest.approx(hits)
    assert report["1"]["mode"] == ("lsh" if hits >= 1.0 - 0.005 else "exact")


def test_serving_choice_survives_a_snapshot(tmp_path):
    model = wide_model()
    x = naive.planted_dataset(20, 60, WIDE, seed=2)
    model.calibrate_serving(x.x_indptr, x.x_indices, x.x_values, min_recall=2.0)
    assert model.resolve_mode()[1] == "exact"
    arrays = model_arrays(model)
    again = model_from_arrays(model.config, 60, WIDE, arrays)
    assert again.resolve_mode()[1] == "exact"
    del arrays["serve_tables"]  # written before auto existed: the width rule
    assert model_from_arrays(model.config, 60, WIDE, arrays).resolve_mode()[1] == "lsh"


def test_normalized_input_is_the_model_on_unit_rows():
    x = naive.planted_dataset(20, 60, 90, seed=2)
    values = x.x_values * np.linspace(0.5, 3, x.nnz).astype(np.float32)
    want = unit_rows(x.x_indptr, values)
    for i in range(x.num_points):
        s, e = x.x_indptr[i], x.x_indptr[i + 1]
        norm = np.linalg.norm(values[s:e].astype(np.float64))
        np.testing.assert_allclose(want[s:e], values[s:e] / norm if norm else 0.0, rtol=1e-6)
    plain = SlideModel.initialize(SlideConfig(model=ModelConfig(hidden=(8,)), seed=1), 60, 90)
    unit = SlideModel(
        plain.config.replace(model=plain.config.model.replace(normalize_input=True)),
        60,
        90,
        plain.weights,
        plain.b0,
        plain.hashes,
        plain.tables,
    )
    got = unit.predict(x.x_indptr, x.x_indices, values, mode="exact")
    ref = plain.predict(x.x_indptr, x.x_indices, want, mode="exact")
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert np.array_equal(unit_rows(np.array([0, 0, 2]), np.array([0.0, 0.0], np.float32)), [0.0, 0.0])


def test_calibration_grows_auto_serving_hubs_by_long_rows_until_the_tables_recall():
    n = 100_000  # auto serving hubs: 2,000 (twice the target active size); grown at most to n / 16
    model = SlideModel.initialize(wide_model().config, 60, n)
    model.tables[0].query_center[:] = np.random.default_rng(0).random(8)  # the mean input the top scorers are picked on
    x = naive.planted_dataset(40, 60, n, seed=2)
    args = (x.x_indptr, x.x_indices, x.x_values)
    exact, _ = model.predict(*args, k=5, mode="exact")
    counts = model._serve_hub_counts(1)
    assert counts == [2_000, 4_000, n // SERVE_HUBS_MAX_SHARE]
    recalls = []
    for count in counts:
        model._set_serve_hubs(1, count)
        recalls.append(naive_recall(model.predict(*args, k=5, mode="lsh")[0], exact))
    assert recalls[0] < recalls[1] <= recalls[2]  # a superset of hubs each time: the same top scorers, more long rows

    report = model.calibrate_serving(*args, min_recall=recalls[1] - 1e-9)
    assert report["1"]["mode"] == "lsh" and report["1"]["serve_hubs"] == 4_000
    assert report["1"]["recall_at_5"] == pytest.approx(recalls[1])
    hubs = model.tables[0].serve_hubs
    w = model.float_weights(1)
    static = w[:, :-1] @ model.tables[0].query_center.astype(np.float32) + w[:, -1]
    longest = np.argsort(-np.linalg.norm(w[:, :-1], axis=1), kind="stable")
    assert set(np.argsort(-static)[:1_000].tolist()) <= set(hubs.tolist())
    assert set(longest[:3_000].tolist()) - set(np.argsort(-static)[:1_000].tolist()) <= set(hubs.tolist())
    assert model.plan.layers[0].predict_hubs == 4_000  # what serving runs with is visible in the plan

    # nothing reaches the recall asked for: served exactly, and lsh asked for keeps the plain count
    report = model.calibrate_serving(*args, min_recall=2.0)
    assert report["1"]["mode"] == "exact" and report["1"]["serve_hubs"] == 2_000
    assert model.tables[0].serve_hubs.shape == (2_000,)
    # a count set in the config is never changed
    fixed = SlideModel.initialize(model.config.replace(predict=PredictConfig(hubs=2_000)), 60, n)
    assert fixed._serve_hub_counts(1) == [2_000]
    assert fixed.calibrate_serving(*args, min_recall=2.0)["1"]["serve_hubs"] == 2_000
