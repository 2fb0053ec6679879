"""Every numeric setting has a range, stated once (engine.config.BOUNDS): SlideConfig refuses values outside it,
naming the field, and the service's job schema states the same range."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from engine import ConfigError, ModelConfig, SlideConfig
from engine.config import BOUNDS, GROUPS, MAX_HIDDEN_LAYERS, with_settings


def _numeric(prefix: str, cls: type) -> list[str]:
    return [
        f"{prefix}{f.name}"
        for f in dataclasses.fields(cls)
        if (hint := typing.get_type_hints(cls)[f.name]) in (int, float, tuple[int, ...], tuple[int, ...] | None)
        or {int, float} & set(typing.get_args(hint))  # a number or null (auto) and/or a word
    ]


NUMERIC = _numeric("", SlideConfig) + [p for name, cls in GROUPS.items() for p in _numeric(f"{name}.", cls)]


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
        setting = (value,) if name == "model.hidden" else value
        with pytest.raises(ConfigError) as info:
            with_settings(SlideConfig(), {name: setting})
        assert info.value.field == name and str(BOUNDS[name]) in str(info.value)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_the_bounds_themselves_are_accepted(name):
    b = BOUNDS[name]
    for value in [v for v, open_ in ((b.low, b.low_open), (b.high, b.high_open)) if not open_]:
        extra = {"sampling.hash_l": 1024} if name == "sampling.active_threshold" else {}
        with_settings(SlideConfig(), {name: (value,) if name == "model.hidden" else value, **extra})


def test_hidden_layer_count_is_bounded():
    SlideConfig(model=ModelConfig(hidden=(8,) * MAX_HIDDEN_LAYERS))
    with pytest.raises(ConfigError, match="hidden"):
        SlideConfig(model=ModelConfig(hidden=(8,) * (MAX_HIDDEN_LAYERS + 1)))
    with pytest.raises(ConfigError, match="hidden"):
        SlideConfig(model=ModelConfig(hidden=()))


def test_the_job_schema_states_the_same_bounds():
    from app.schemas import SlideConfigModel

    schema = SlideConfigModel.model_json_schema()

    def props(path: str) -> dict:
        group, _, name = path.rpartition(".")
        if not group:
            return schema["properties"][name]
        assert schema["properties"][group]["$ref"] == f"#/$defs/{GROUPS[group].__name__}"
        return schema["$defs"][GROUPS[group].__name__]["properties"][name]

    hidden = props("model.hidden")["anyOf"][0]  # the widths; then null (auto)
    assert props("model.hidden")["anyOf"][1] == {"type": "null"} and props("model.hidden")["default"] is None
    for name, b in BOUNDS.items():
        number = hidden["items"] if name == "model.hidden" else props(name)
        number = number["anyOf"][0] if "anyOf" in number else number  # the number; then its word, old numbers, null
        assert number["exclusiveMinimum" if b.low_open else "minimum"] == b.low, name
        assert number["exclusiveMaximum" if b.high_open else "maximum"] == b.high, name
        assert f"Range: {b}" in props(name)["description"], name
    assert hidden["maxItems"] == MAX_HIDDEN_LAYERS and hidden["minItems"] == 1
