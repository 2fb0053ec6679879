"""SlideConfig refuses bad settings with an error naming their path, round-trips through a dict, and reads the flat
names and numbers of the previous release with a note each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.config import (
    DENSE_OUTPUT_MAX_LABELS,
    FLAT_NAMES,
    RUN_SETTINGS,
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    PredictConfig,
    SamplingConfig,
    ScheduleConfig,
    SlideConfig,
    setting,
    setting_paths,
    upgrade_settings,
    with_settings,
)
from engine.network import SlideModel
from engine.resolve import samples_output


@pytest.mark.parametrize(
    "changes",
    [
        {"sampling.hash_family": "minhash"},
        {"sampling.hash_l": -1},
        {"sampling.hash_l": 0},
        {"sampling.max_active": "all"},
        {"sampling.hard_negatives": "none"},
        {"schedule.val_points": 0},
        {"sampling.hash_l": 1025},
        {"sampling.probes": -1},
        {"sampling.probes": 65},
        {"predict.probes": -2},
        {"sampling.hash_family": "dwta", "sampling.probes": 1},
        {"sampling.hash_family": "wta", "predict.probes": 2},
        {"sampling.drift_threshold": -0.1},
        {"optimizer.lr": float("nan")},
        {"schedule.early_stop_patience": 0},
        {"sampling.rebuild_every": 0},
        {"schedule.early_stop_patience": "none"},
        {"model.weight_dtype": "float16"},
    ],
)
def test_bad_settings_name_their_path(changes):
    with pytest.raises(ConfigError) as err:
        with_settings(SlideConfig(), changes)
    assert err.value.field == list(changes)[-1]


def test_round_trip_and_unknown_keys():
    config = SlideConfig(
        model=ModelConfig(hidden=(64, 32)),
        sampling=SamplingConfig(probes=2, hash_k=9, rebuild_every=3),
        optimizer=OptimizerConfig(lr=1e-3),
        schedule=ScheduleConfig(early_stop_patience="never"),
        predict=PredictConfig(probes=3, hubs="none"),
        seed=4,
    )
    d = config.to_dict()
    assert d["model"]["hidden"] == [64, 32] and d["predict"] == {"max_active": None, "probes": 3, "hubs": "none"}
    assert json.loads(json.dumps(d)) == d
    assert SlideConfig.from_dict(d) == config
    assert SlideConfig.from_dict({"model": {"hidden": 16}}).model.hidden == (16,)
    for bad, path in [
        ({"probe": 1}, "probe"),
        ({"sampling": {"probe": 1}}, "sampling.probe"),
        ({"predict": {"predict_hubs": 1}}, "predict.predict_hubs"),
        ({"sampling": 5}, "sampling"),
        ({"hash_l": 8, "sampling": {"hash_l": 9}}, "sampling.hash_l"),
    ]:
        with pytest.raises(ConfigError) as err:
            SlideConfig.from_dict(bad)
        assert err.value.field == path, bad
    assert SlideConfig(sampling=SamplingConfig(hash_family="dwta"), predict=PredictConfig(probes=0)).predict.probes == 0


def test_settings_by_path():
    paths = setting_paths()
    assert len(paths) == len(set(paths)) and "sampling.hash_l" in paths and "predict.hubs" in paths and "seed" in paths
    assert set(FLAT_NAMES.values()) | set(RUN_SETTINGS) == set(paths), "every setting had a flat name"
    config = with_settings(SlideConfig(), {"model.hidden": (8,), "predict.hubs": 3, "seed": 2})
    assert config.model.hidden == (8,) and config.predict.hubs == 3 and config.seed == 2
    assert [setting(config, p) for p in ("model.hidden", "predict.hubs", "seed")] == [(8,), 3, 2]
    assert config.sampling == SamplingConfig() and config.optimizer == OptimizerConfig()


@pytest.mark.parametrize(
    "sample_output, num_labels, sampled",
    [
        (None, DENSE_OUTPUT_MAX_LABELS, False),
        (None, DENSE_OUTPUT_MAX_LABELS + 1, True),
        (True, 10, True),
        (False, 100_000, False),
    ],
)
def test_sample_output_auto_samples_only_wide_output_layers(sample_output, num_labels, sampled):
    config = SlideConfig(model=ModelConfig(hidden=(8,), sample_output=sample_output))
    assert samples_output(config, num_labels) is sampled
    model = SlideModel.initialize(config, 20, num_labels)
    assert bool(model.layer_slot[-1] >= 0) is sampled
    assert len(model.hashes) == int(sampled)


def test_an_auto_dense_model_round_trips_through_a_snapshot(tmp_path):
    from engine.snapshot import SnapshotStore, load_model, model_arrays

    config = SlideConfig(model=ModelConfig(hidden=(8,)))
    model = SlideModel.initialize(config, 20, 30)
    _, path = SnapshotStore(tmp_path).publish(
        model_arrays(model), {"config": config.to_dict(), "num_features": 20, "num_labels": 30}
    )
    loaded = load_model(path)
    assert loaded.config.model.sample_output is None and loaded.layer_slot[-1] == -1
    x = (np.array([0, 2]), np.array([3, 7], np.int32), np.ones(2, np.float32))
    assert np.array_equal(loaded.predict(*x, k=5)[0], model.predict(*x, k=5)[0])


def test_auto_is_none_and_switched_off_counts_are_words():
    cfg = SlideConfig(
        sampling=SamplingConfig(max_active="none", hard_negatives="all", hash_l=None),
        schedule=ScheduleConfig(val_points="none"),
    )
    assert SlideConfig.from_dict(cfg.to_dict()) == cfg
    auto = ("sampling.hash_k", "sampling.hash_l", "sampling.max_active", "predict.hubs", "threads")
    assert all(setting(SlideConfig(), path) is None for path in auto)
    assert SlideConfig().sampling.rebuild_every == "never" and SlideConfig().schedule.early_stop_patience == 3


def test_the_numbers_settings_used_before_still_read_as_what_they_meant():
    old = {
        "sampling": {"hash_l": 0, "max_active": -1, "hard_negatives": -1, "probes": 0, "rebuild_every": 0},
        "schedule": {"val_points": 0, "early_stop_patience": 0},
        "predict": {"probes": -1},
    }
    values, notes = upgrade_settings(old)
    assert values == {
        "sampling": {
            "hash_l": None,
            "max_active": "none",
            "hard_negatives": "all",
            "probes": 0,
            "rebuild_every": "never",
        },
        "schedule": {"val_points": None, "early_stop_patience": "never"},
        "predict": {"probes": None},
    }  # 0 probes always meant none: a plain number
    assert len(notes) == 7
    assert any(n.startswith("sampling.hard_negatives: -1 is deprecated") and '"all"' in n for n in notes)
    assert any(n.startswith("schedule.early_stop_patience: 0 is deprecated") and '"never"' in n for n in notes)
    assert SlideConfig.from_dict(old) == SlideConfig(
        sampling=SamplingConfig(max_active="none", hard_negatives="all", rebuild_every="never"),
        schedule=ScheduleConfig(early_stop_patience="never"),
    )
    # what a TOML file writes for null
    assert upgrade_settings({"sampling": {"hash_k": "auto"}}) == ({"sampling": {"hash_k": None}}, [])
    assert upgrade_settings({"model": {"sample_output": "auto"}}) == ({"model": {"sample_output": None}}, [])
    with pytest.raises(ConfigError, match="hash_l"):
        SlideConfig(sampling=SamplingConfig(hash_l=0))  # the constructor takes the current form only


def test_the_flat_names_used_before_read_as_their_paths_with_a_note_each():
    old = {"hash_l": 16, "predict_hubs": "none", "predict_probes": -1, "hidden": [32], "lr": 1e-3, "seed": 3}
    values, notes = upgrade_settings(old)
    assert values == {
        "sampling": {"hash_l": 16},
        "predict": {"hubs": "none", "probes": None},
        "model": {"hidden": [32]},
        "optimizer": {"lr": 1e-3},
        "seed": 3,
    }
    assert "hash_l is deprecated and will be refused in a later release; use sampling.hash_l" in notes
    assert any(n.startswith("predict_hubs is deprecated") and n.endswith("use predict.hubs") for n in notes)
    assert any(n.startswith("predict.probes: -1 is deprecated") for n in notes), "then the old number's note"
    assert len(notes) == 6 and not any(n.startswith("seed") for n in notes), "run-level names did not move"
    config = SlideConfig.from_dict(old)
    assert config == SlideConfig(
        model=ModelConfig(hidden=(32,)),
        sampling=SamplingConfig(hash_l=16),
        optimizer=OptimizerConfig(lr=1e-3),
        predict=PredictConfig(hubs="none"),
        seed=3,
    )
    # a flat name and a nested group together: each goes where it belongs
    mixed = SlideConfig.from_dict({"hash_k": 4, "sampling": {"hash_l": 8}, "schedule": {"epochs": 2}})
    assert (mixed.sampling.hash_k, mixed.sampling.hash_l, mixed.schedule.epochs) == (4, 8, 2)
