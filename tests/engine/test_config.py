"""SlideConfig refuses bad settings with an error naming the field, and round-trips through a dict."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, SlideConfig


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
