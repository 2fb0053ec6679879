"""SlideConfig refuses bad settings with an error naming the field, and round-trips through a dict."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import DENSE_OUTPUT_MAX_LABELS, ConfigError, SlideConfig
from engine.network import SlideModel
from engine.resolve import samples_output


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"hash_family": "minhash"}, "hash_family"),
        ({"hash_l": -1}, "hash_l"),
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
