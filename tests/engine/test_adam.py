"""LazyAdamState: its arrays by snapshot name and back, growth and row resets."""

from __future__ import annotations

import numpy as np
import pytest

from engine.adam import LazyAdamState


def _state() -> LazyAdamState:
    rng = np.random.default_rng(0)
    weights = [np.zeros((6, 4), np.float32), np.zeros((5, 5), np.uint16)]
    state = LazyAdamState.zeros(weights, np.zeros(4, np.float32), [np.float32, np.uint16], {1: np.ones(4, np.float32)})
    for arrays in (state.m, state.v, state.steps, state.drift):
        for a in arrays:
            a[...] = rng.integers(1, 9, a.shape)
    state.mb0[:] = 0.5
    return state


def test_to_arrays_and_back_is_the_same_state_without_copies():
    state = _state()
    arrays = state.to_arrays()
    assert sorted(arrays) == sorted(
        [f"opt_{kind}{layer}" for kind in ("m", "v", "steps", "drift") for layer in (0, 1)]
        + ["opt_mb0", "opt_vb0", "opt_input_mean1"]
    )
    assert arrays["opt_m1"].dtype == np.uint16 and arrays["opt_input_mean1"].dtype == np.float64
    # other arrays of a snapshot (the model's, training's opt_cur_ copies) are ignored
    back = LazyAdamState.from_arrays({**arrays, "w0": np.zeros(1), "opt_cur_w1": np.zeros(1)})
    for kind in ("m", "v", "steps", "drift"):
        for a, b in zip(getattr(state, kind), getattr(back, kind), strict=True):
            assert a is b
    assert back.mb0 is state.mb0 and back.input_mean.keys() == {1}


def test_a_missing_array_is_named():
    arrays = _state().to_arrays()
    del arrays["opt_drift1"]
    with pytest.raises(KeyError, match="opt_drift1"):
        LazyAdamState.from_arrays(arrays)
    with pytest.raises(KeyError, match="no optimizer state"):
        LazyAdamState.from_arrays({"w0": np.zeros(1)})


def test_grown_layers_get_zero_rows_and_reset_rows_forget_history():
    state = _state()
    grown = state.grown([6, 8])
    assert grown.m[0] is state.m[0]
    assert grown.m[1].shape == (8, 5) and grown.steps[1].shape == (8,)
    np.testing.assert_array_equal(grown.v[1][:5], state.v[1])
    assert not grown.v[1][5:].any() and not grown.steps[1][5:].any()
    grown.reset_rows(1, np.array([0, 2]))
    for kind in ("m", "v", "steps", "drift"):
        assert not getattr(grown, kind)[1][[0, 2]].any() and getattr(grown, kind)[1][1].all()
    with pytest.raises(ValueError, match="2 layers"):
        state.grown([6])
