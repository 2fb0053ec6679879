"""Lazy Adam's state: the arrays a trainer keeps beside its model, and their names in a snapshot.

The update kernels are in kernels/optimizer.py; this is the state they step, in one record that a
snapshot writes with `to_arrays()` and a resumed or warm-started trainer reads with `from_arrays()`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

PREFIX = "opt_"
"""The prefix of the state's array names in a snapshot."""
_LAYER_ARRAY = re.compile(r"^opt_(m|v|steps|drift)(\d+)$")
_INPUT_MEAN = re.compile(r"^opt_input_mean(\d+)$")
_PER_LAYER = ("m", "v", "steps", "drift")


@dataclass
class LazyAdamState:
    """Per weight layer (tuples indexed by layer, the input layer first): the first moment m (float32, or
    bfloat16 bits (uint16) for a sampled layer with moment_dtype bfloat16), the second moment v float32
    (rows, cols), steps int64 (rows,) (how many updates each row has had: its bias correction) and drift
    float32 (rows,) (how far each row moved since it was last hashed: what a drift-triggered rehash reads).
    mb0 and vb0 float32 (h1,): the moments of the input layer's bias. input_mean: per sampled layer, the
    float64 running mean of its inputs, which centres the next rehash's hub choice."""

    m: tuple[np.ndarray, ...]
    v: tuple[np.ndarray, ...]
    steps: tuple[np.ndarray, ...]
    drift: tuple[np.ndarray, ...]
    mb0: np.ndarray
    vb0: np.ndarray
    input_mean: dict[int, np.ndarray]

    @classmethod
    def zeros(
        cls,
        weights: Sequence[np.ndarray],
        b0: np.ndarray,
        moment_dtypes: Sequence[type],
        input_mean: Mapping[int, np.ndarray],
    ) -> LazyAdamState:
        """A fresh state for these weights: zero moments (m of layer l in moment_dtypes[l]) and step counts,
        and input_mean as given (copied to float64)."""
        return cls(
            m=tuple(np.zeros(w.shape, dt) for w, dt in zip(weights, moment_dtypes, strict=True)),
            v=tuple(np.zeros(w.shape, np.float32) for w in weights),
            steps=tuple(np.zeros(w.shape[0], np.int64) for w in weights),
            drift=tuple(np.zeros(w.shape[0], np.float32) for w in weights),
            mb0=np.zeros_like(b0),
            vb0=np.zeros_like(b0),
            input_mean={layer: np.asarray(x, np.float64).copy() for layer, x in input_mean.items()},
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays by their snapshot names (`opt_m0`, ..., `opt_mb0`, `opt_input_mean1`), not copied."""
        arrays: dict[str, np.ndarray] = {}
        for layer in range(len(self.m)):
            for kind in _PER_LAYER:
                arrays[f"{PREFIX}{kind}{layer}"] = getattr(self, kind)[layer]
        arrays[f"{PREFIX}mb0"] = self.mb0
        arrays[f"{PREFIX}vb0"] = self.vb0
        arrays.update({f"{PREFIX}input_mean{layer}": x for layer, x in self.input_mean.items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LazyAdamState:
        """The state among a snapshot's arrays (other names are ignored), taken as they are: no copy, so a
        resumed trainer holds one set. Raises KeyError naming a missing array."""
        layers = {int(match.group(2)) for match in map(_LAYER_ARRAY.match, arrays) if match}
        depth = max(layers, default=-1) + 1
        if depth == 0:
            raise KeyError(f"no optimizer state ({PREFIX}m0, ...) among the arrays")

        def per_layer(kind: str) -> tuple[np.ndarray, ...]:
            try:
                return tuple(arrays[f"{PREFIX}{kind}{layer}"] for layer in range(depth))
            except KeyError as exc:
                raise KeyError(f"optimizer state array {exc.args[0]} is missing") from None

        means = {int(match.group(1)): arrays[name] for name in arrays if (match := _INPUT_MEAN.match(name))}
        try:
            mb0, vb0 = arrays[f"{PREFIX}mb0"], arrays[f"{PREFIX}vb0"]
        except KeyError as exc:
            raise KeyError(f"optimizer state array {exc.args[0]} is missing") from None
        return cls(
            m=per_layer("m"),
            v=per_layer("v"),
            steps=per_layer("steps"),
            drift=per_layer("drift"),
            mb0=mb0,
            vb0=vb0,
            input_mean=dict(sorted(means.items())),
        )

    def grown(self, rows: Sequence[int]) -> LazyAdamState:
        """The state for layers of rows[l] rows: zero rows appended where a layer grew (new labels or
        features start with no history), the same arrays elsewhere."""
        if len(rows) != len(self.m):
            raise ValueError(f"{len(rows)} layer sizes for a state of {len(self.m)} layers")

        def pad(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
            return tuple(pad_rows(a, n) for a, n in zip(arrays, rows, strict=True))

        return LazyAdamState(
            pad(self.m), pad(self.v), pad(self.steps), pad(self.drift), self.mb0, self.vb0, self.input_mean
        )

    def reset_rows(self, layer: int, rows: np.ndarray) -> None:
        """Forget the history of these rows of a layer (moments, step counts and drift to zero)."""
        for kind in _PER_LAYER:
            getattr(self, kind)[layer][rows] = 0


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """a with zero rows appended up to `rows` rows (a itself when it has them)."""
    if a.shape[0] >= rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])
