"""engine.resolve: one config and data shape -> the concrete per-layer values the model, trainer and memory
estimate use, and the record of it in snapshots."""

from __future__ import annotations

import pytest

from engine import lsh, schedule
from engine.config import (
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    PredictConfig,
    SamplingConfig,
    ScheduleConfig,
    SlideConfig,
    with_settings,
)
from engine.network import SlideModel
from engine.resolve import resolve
from engine.snapshot import manifest_resolved


def test_a_wide_output_layer_is_sampled_with_the_lsh_rules():
    cfg = SlideConfig()
    plan = resolve(cfg, 135_909, 670_091, 100_000)
    out = plan.output
    assert plan.sample_output and out.sampled and out.layer == 1 and (out.neurons, out.inputs) == (670_091, 128)
    assert (out.hash_k, out.hash_l) == (lsh.resolve_k(cfg, 670_091), lsh.resolve_l(cfg, 670_091)) and out.hash_l == 16
    assert out.buckets == lsh.table_geometry(cfg, out.hash_k)[1]
    assert out.max_active == lsh.target_active(670_091) == 1000
    assert out.hub_neurons == lsh.resolve_hubs(cfg, 670_091) > 0
    assert out.hard_negatives == lsh.resolve_hard_negatives(cfg, 670_091) > 0
    assert out.random_negatives == lsh.resolve_random_negatives(cfg, 670_091) > 0
    assert plan.val_points == schedule.validation_size(cfg, 100_000) == 5000 and plan.train_points == 95_000
    assert plan.steps_per_epoch == -(-95_000 // cfg.optimizer.batch_size)
    assert plan.lr_warmup_steps == schedule.warmup_steps(cfg, plan.steps_per_epoch)
    assert plan.hidden_dropout == schedule.dropout_rates(cfg, 5000) == schedule.AUTO_DROPOUT_RATES
    assert plan.to_dict()["hidden_dropout"] == list(schedule.AUTO_DROPOUT_RATES)
    fixed = SlideConfig(optimizer=OptimizerConfig(hidden_dropout=0.3))
    assert resolve(fixed, 135_909, 670_091, 100_000).hidden_dropout == (0.3,)
    assert resolve(cfg, 135_909, 670_091, 900).hidden_dropout == (0.0,)  # no validation split: nothing to watch


def test_a_narrow_output_trains_densely_and_the_run_values_need_the_point_count():
    plan = resolve(SlideConfig(model=ModelConfig(hidden=(32, 16), sample_hidden=True)), 500, 100)
    hidden, out = plan.layers
    assert not plan.sample_output and not out.sampled and out.hash_l == 0 and out.max_active == 0
    assert hidden.sampled and hidden.hash_l == 50 and (hidden.neurons, hidden.inputs) == (16, 32)
    assert hidden.hard_negatives == hidden.random_negatives == 0, "negatives are the output layer's"
    assert plan.train_points is None and plan.lr_warmup_steps is None and plan.hidden_dropout is None
    d = plan.to_dict()
    assert d["layers"]["1"]["hash_l"] == 50 and d["layers"]["2"]["sampled"] is False and "layer" not in d["layers"]["1"]


def test_active_threshold_is_checked_against_each_layers_own_tables():
    cfg = SlideConfig(
        model=ModelConfig(sample_output=True), sampling=SamplingConfig(active_threshold=20)
    )  # auto tables: 50 below 20,000 neurons, 16 above
    assert resolve(cfg, 100, 5_000).output.hash_l == 50
    with pytest.raises(ConfigError, match="layer 1 .*16") as info:
        resolve(cfg, 100, 50_000)
    assert info.value.field == "sampling.active_threshold"
    assert resolve(cfg.replace(sampling=cfg.sampling.replace(hash_l=20)), 100, 50_000).output.hash_l == 20


def test_a_model_runs_with_its_plan():
    cfg = SlideConfig(model=ModelConfig(hidden=(8,), sample_output=True), predict=PredictConfig(probes=2))
    model = SlideModel.initialize(cfg, 40, 300)
    plan = model.plan
    assert plan == resolve(cfg, 40, 300) and plan.predict_probes == model.predict_probes == 2
    slot = model.layer_slot[1]
    assert plan.output.hash_l == model.hashes[slot].n_tables and plan.output.max_active == model.max_active[slot]


def test_an_old_manifest_gets_its_plan_from_its_config():
    old = {
        "config": SlideConfig(model=ModelConfig(sample_output=True)).to_dict(),
        "num_features": 40,
        "num_labels": 300,
        "trainer_state": {"resolved": {"train_points": 90, "val_points": 10, "layer1": {"hash_l": 50}}},
    }
    got = manifest_resolved(old)
    assert got["layers"]["1"]["hash_l"] == 50 and got["train_points"] == 90 and got["val_points"] == 10
    new = {**old, "trainer_state": {"resolved": got}}
    assert manifest_resolved(new) is got


@pytest.mark.parametrize(
    ("labels", "overrides", "width"),
    [
        (500, {}, 256),  # a dense output layer pays for every label at every step
        (2_048, {}, 256),
        (5_000, {}, 512),  # sampled: the cost follows the few active neurons
        (100_000, {}, 512),
        (100_001, {}, 128),  # memory: rows and Adam state at 8 bytes a weight
        (670_091, {}, 128),
        (5_000, {"model.sample_output": False}, 128),  # a wide layer trained densely
        (500, {"model.sample_output": True}, 512),
        (5_000, {"model.hidden": (64, 32)}, (64, 32)),
    ],
)
def test_auto_hidden_width_follows_the_output_layer(labels, overrides, width):
    plan = resolve(with_settings(SlideConfig(), overrides), 1_000, labels)
    want = width if isinstance(width, tuple) else (width,)
    assert plan.hidden == want and plan.output.inputs == want[-1]
    assert plan.to_dict()["hidden"] == list(want)


def test_a_model_and_its_snapshot_keep_the_widths_auto_gave_them(tmp_path):
    from engine import Trainer
    from engine.snapshot import SnapshotStore, load_model, manifest_config, read_manifest
    from engine.synth import generate

    train, test = generate("tiny", seed=0)
    cfg = SlideConfig(model=ModelConfig(sample_output=True), schedule=ScheduleConfig(epochs=1))
    assert cfg.model.hidden is None
    store = SnapshotStore(tmp_path / "store")
    trainer = Trainer(cfg, train, test, store)
    assert (
        trainer.config.model.hidden == trainer.model.config.model.hidden == (512,)
        and trainer.model.weights[0].shape[1] == 512
    )
    trainer.run()
    _, path = store.latest()
    assert manifest_config(read_manifest(path)).model.hidden == (512,), "the snapshot records the concrete widths"
    assert load_model(path).weights[0].shape[1] == 512


def test_label_shards_take_the_whole_layers_auto_widths():
    from engine.distributed.shard import label_ranges, shard_config

    cfg = SlideConfig()
    for lo, hi in label_ranges(3_000, 2):  # each shard alone (1,500 labels) would be dense and 128 wide
        shard = shard_config(cfg, 3_000)
        assert shard.model.hidden == (512,) and shard.model.sample_output is True
        assert resolve(shard, 100, hi - lo).hidden == (512,)
