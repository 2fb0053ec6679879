"""Every numeric setting has a range, stated once (engine.config.BOUNDS): SlideConfig refuses values outside it,
naming the field, and the service's job schema states the same range."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from engine import ConfigError, SlideConfig
from engine.config import BOUNDS, MAX_HIDDEN_LAYERS

NUMERIC = [
    f.name
    for f in dataclasses.fields(SlideConfig)
    if (hint := typing.get_type_hints(SlideConfig)[f.name]) in (int, float, tuple[int, ...], tuple[int, ...] | None)
    or {int, float} & set(typing.get_args(hint))  # a number or null (auto) and/or a word
]


def test_every_numeric_setting_has_bounds():
    assert NUMERIC and sorted(set(NUMERIC) - set(BOUNDS)) == []
    assert sorted(set(BOUNDS) - set(NUMERIC)) == []


def _outside(name: str) -> list[float]:
    b = BOUNDS[name]
    step = 1 if isinstance(b.high, int) else 1e-9
    over = b.high if b.high_open else b.high + step
    under = b.low if b.low_open else b.low - step
    return [over, under, math.nan] if isinstance(b.high, float) else [over, under]


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_values_outside_the_bounds_are_refused_naming_the_field(name):
    for value in _outside(name):
        value = int(value) if isinstance(BOUNDS[name].high, int) else value
        setting = (value,) if name == "hidden" else value
        with pytest.raises(ConfigError) as info:
            SlideConfig(**{name: setting})
        assert info.value.field == name and str(BOUNDS[name]) in str(info.value)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_the_bounds_themselves_are_accepted(name):
    b = BOUNDS[name]
    for value in [v for v, open_ in ((b.low, b.low_open), (b.high, b.high_open)) if not open_]:
        extra = {"hash_l": 1024} if name == "active_threshold" else {}
        SlideConfig(**{name: (value,) if name == "hidden" else value, **extra})


def test_hidden_layer_count_is_bounded():
    SlideConfig(hidden=(8,) * MAX_HIDDEN_LAYERS)
    with pytest.raises(ConfigError, match="hidden"):
        SlideConfig(hidden=(8,) * (MAX_HIDDEN_LAYERS + 1))
    with pytest.raises(ConfigError, match="hidden"):
        SlideConfig(hidden=())


def test_the_job_schema_states_the_same_bounds():
    from app.schemas import SlideConfigModel

    props = SlideConfigModel.model_json_schema()["properties"]
    hidden = props["hidden"]["anyOf"][0]  # the widths; then null (auto)
    assert props["hidden"]["anyOf"][1] == {"type": "null"} and props["hidden"]["default"] is None
    for name, b in BOUNDS.items():
        schema = hidden["items"] if name == "hidden" else props[name]
        schema = schema["anyOf"][0] if "anyOf" in schema else schema  # the number; then its word, old numbers, null
        assert schema["exclusiveMinimum" if b.low_open else "minimum"] == b.low, name
        assert schema["exclusiveMaximum" if b.high_open else "maximum"] == b.high, name
        assert f"Range: {b}" in props[name]["description"], name
    assert hidden["maxItems"] == MAX_HIDDEN_LAYERS and hidden["minItems"] == 1
