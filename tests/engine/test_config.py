"""SlideConfig refuses bad settings with an error naming the field, and round-trips through a dict."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import DENSE_OUTPUT_MAX_LABELS, ConfigError, SlideConfig, upgrade_settings
from engine.network import SlideModel
from engine.resolve import samples_output


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"hash_family": "minhash"}, "hash_family"),
        ({"hash_l": -1}, "hash_l"),
        ({"hash_l": 0}, "hash_l"),
        ({"max_active": "all"}, "max_active"),
        ({"hard_negatives": "none"}, "hard_negatives"),
        ({"val_points": 0}, "val_points"),
        ({"hash_l": 1025}, "hash_l"),
        ({"probes": -1}, "probes"),
        ({"probes": 65}, "probes"),
        ({"predict_probes": -2}, "predict_probes"),
        ({"hash_family": "dwta", "probes": 1}, "probes"),
        ({"hash_family": "wta", "predict_probes": 2}, "probes"),
        ({"drift_threshold": -0.1}, "drift_threshold"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_bad_settings_name_their_field(changes, field):
    with pytest.raises(ConfigError) as err:
        SlideConfig(**changes)
    assert err.value.field == field


def test_round_trip_and_unknown_keys():
    config = SlideConfig(hidden=(64, 32), probes=2, predict_probes=3, hash_k=9)
    assert SlideConfig.from_dict(config.to_dict()) == config
    assert SlideConfig.from_dict({"hidden": 16}).hidden == (16,)
    with pytest.raises(ConfigError) as err:
        SlideConfig.from_dict({"probe": 1})
    assert err.value.field == "probe"
    assert SlideConfig(hash_family="dwta", predict_probes=0).predict_probes == 0


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
    config = SlideConfig(hidden=(8,), sample_output=sample_output)
    assert samples_output(config, num_labels) is sampled
    model = SlideModel.initialize(config, 20, num_labels)
    assert bool(model.layer_slot[-1] >= 0) is sampled
    assert len(model.hashes) == int(sampled)


def test_an_auto_dense_model_round_trips_through_a_snapshot(tmp_path):
    from engine.snapshot import SnapshotStore, load_model, model_arrays

    config = SlideConfig(hidden=(8,))
    model = SlideModel.initialize(config, 20, 30)
    _, path = SnapshotStore(tmp_path).publish(
        model_arrays(model), {"config": config.to_dict(), "num_features": 20, "num_labels": 30}
    )
    loaded = load_model(path)
    assert loaded.config.sample_output is None and loaded.layer_slot[-1] == -1
    x = (np.array([0, 2]), np.array([3, 7], np.int32), np.ones(2, np.float32))
    assert np.array_equal(loaded.predict(*x, k=5)[0], model.predict(*x, k=5)[0])


def test_auto_is_none_and_switched_off_counts_are_words():
    cfg = SlideConfig(max_active="none", hard_negatives="all", val_points="none", hash_l=None)
    assert SlideConfig.from_dict(cfg.to_dict()) == cfg
    assert all(getattr(SlideConfig(), name) is None for name in ("hash_k", "hash_l", "max_active", "threads"))


def test_the_numbers_settings_used_before_still_read_as_what_they_meant():
    old = {"hash_l": 0, "max_active": -1, "hard_negatives": -1, "predict_probes": -1, "val_points": 0, "probes": 0}
    values, notes = upgrade_settings(old)
    assert values == {
        "hash_l": None,
        "max_active": "none",
        "hard_negatives": "all",
        "predict_probes": None,
        "val_points": None,
        "probes": 0,  # 0 probes always meant none: a plain number
    }
    assert len(notes) == 5 and any(n.startswith("hard_negatives: -1 is deprecated") and '"all"' in n for n in notes)
    assert SlideConfig.from_dict(old) == SlideConfig(max_active="none", hard_negatives="all")
    assert upgrade_settings({"hash_k": "auto"}) == ({"hash_k": None}, [])  # what a TOML file writes for null
    with pytest.raises(ConfigError, match="hash_l"):
        SlideConfig(hash_l=0)  # the constructor takes the current form only
