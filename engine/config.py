"""Training and network configuration: one frozen dataclass, checked on creation.

Every field has a default that works on unseen data; the service exposes the same fields over HTTP,
the CLI as flags and `--config file.toml`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

HashFamily = Literal["simhash", "wta", "dwta"]
Insertion = Literal["fifo", "reservoir"]
MomentDtype = Literal["float32", "bfloat16"]
WeightDtype = Literal["float32", "bfloat16"]


WIDE_LAYER_TABLES = 16
"""Tables of a sampled layer wider than 20,000 neurons when hash_l is 0 (auto)."""
SMALL_LAYER_TABLES = 50
"""Tables of a narrower sampled layer when hash_l is 0 (auto)."""


@dataclass(frozen=True)
class SlideConfig:
    """Network, hashing, optimizer and schedule of one SLIDE training run."""

    hidden: tuple[int, ...] = (128,)
    """Widths of the hidden ReLU layers, input side first."""
    sample_hidden: bool = False
    """LSH-sample the hidden layers too (the output layer is where the cost is)."""
    sample_output: bool = True
    """LSH-sample the output layer; False trains the same network densely (the `--dense` baseline)."""

    hash_family: HashFamily = "simhash"
    hash_k: int = 0
    """Codes (WTA/DWTA) or bits (SimHash) concatenated per table; 0 = chosen from the layer width so
    that an input's L buckets hold about 5% of the layer's neurons (at most 1,000)."""
    hash_l: int = 0
    """Number of independent tables; 0 = auto: 16 for layers wider than 20,000 neurons, else 50.
    Trained output rows of a wide layer crowd into full buckets, so an input's L buckets return about
    L * bucket_size candidates, nearly all of them once, and the 1,000-neuron cap then keeps a random
    subset: 50 tables read ~3,150 to keep 1,000. 16 tables of 64 fill the cap without it, and rehash
    at a third of the cost. amazon670k, same batches: 16 against 50 0.705x the time a step, P@1
    0.512 / 0.517 after 3,000 steps; 24 1.09x the time of 16, P@1 0.512; 12 0.92x, P@1 0.513.
    delicious200k, 16 against 50: 0.90x the time, P@1 0.932 / 0.935 after 2,000 steps. Per sample 50
    tables pull ahead later (amazon670k 0.606 / 0.595 after 8,000 steps, about equal at equal time):
    long runs may want more. A small layer's buckets are not full and 16 tables retrieve worse (small
    preset, 5,000 labels, 6 epochs: exact P@1 0.549 against 0.572), so it keeps 50."""
    bin_size: int = 8
    """WTA/DWTA bin width: each code is an argmax position in [0, bin_size)."""
    simhash_density: float = 0.05
    """Fraction of non-zero (+-1) entries in each SimHash projection."""
    table_bits: int = 0
    """log2 of buckets per table; 0 = the code space's own size, capped at 20."""
    bucket_size: int = 64
    """Capacity of a bucket (neuron ids). Trained output rows crowd into few buckets (at amazon670k
    scale a third of a table's rows sit in full ones), so the capacity sets how many candidates an
    input reads: 64 against 128 read half as many, with equal P@1 after 3,000 amazon670k steps
    (0.515 / 0.514) and 2,000 delicious200k steps (0.936 / 0.934), train_batch 24 vs 31-32 ms a step."""
    insertion: Insertion = "fifo"
    """What a full bucket does with a new id: replace the oldest (fifo) or reservoir sampling."""

    active_threshold: int = 1
    """Keep a retrieved neuron only if it was found in at least this many of the L buckets."""
    max_active: int = 0
    """Cap on retrieved neurons per point, keeping the most frequently retrieved: 0 = auto (the
    layer's target active size: 5% of a small layer, at most 1,000), -1 = no cap."""
    predict_max_active: int = 0
    """The same cap when serving predictions (the serving hubs come on top): 0 = auto (as in training
    for a layer with serving hubs, else none), -1 = none beyond the buckets themselves (at most
    hash_l * bucket_size), > 0 = this many. At amazon670k scale the training cap keeps recall@5 of
    exact at 0.986 (0.992 uncapped) while scoring 3.0k instead of 6.7k candidates; a small layer's
    few training slots are too few to serve from without hubs."""
    probes: int = 0
    """Multi-probe SimHash in training: extra buckets read per table, each one least-confident bit
    away from the input's own (0 = the input's own bucket only)."""
    predict_probes: int = -1
    """The same when serving predictions: -1 = as in training."""
    hub_neurons: int = 0
    """Neurons with the highest score for the average input, added to every active set: 0 = auto (a
    quarter of the target active size, at most 256, for layers wider than 20,000 neurons), -1 = none."""
    predict_hubs: int = 0
    """Hub neurons added to every candidate set when serving: 0 = auto (for layers wider than 20,000
    neurons the larger of twice the target active size and 1% of the layer, half by score on the
    mean input and half by weight norm; else the training hubs), -1 = the training hubs only."""
    hard_negatives: int = 0
    """Per point, only this many of the output active set's non-label neurons, those with the highest
    softmax probability, receive a gradient (the softmax still normalises over the whole active set):
    0 = auto (a quarter of the target active size, as many as the auto hubs, for layers wider than
    20,000 neurons, else all), -1 = all. At amazon670k scale 250 of ~1,500 against 500: 52.5 vs 69.0
    ms a step (the optimizer's update 6.8 vs 18.0 ms), P@1 0.515 vs 0.525 after 3,000 steps, so ahead
    at equal time (0.56-0.58 vs 0.54-0.55 after 240 s); on delicious200k 0.932 vs 0.938 after 2,000
    steps. 128 fell behind there (0.907); before the random negatives, 64 stopped learning: the
    retrieved neurons must keep meeting negative gradients."""
    random_negatives: int = 0
    """Output neurons each point draws uniformly from those it did not retrieve, added to its active
    set with their logits raised by log(unretrieved labels / drawn): together they stand for every label
    the tables did not return, so the softmax's normaliser estimates the full one (a log-Q-corrected
    sampled softmax). They always get a gradient (the hard-negative cut ranks only the retrieved).
    0 = auto (as many as the auto hubs, 250, for output layers wider than 20,000 neurons), -1 = none.
    Without them the softmax spans only the retrieved neurons and the labels, and with many labels per
    point it can fall by making the hidden output input-independent: on delicious200k-shaped data (~75
    labels per point) P@1 fell to 0.002; with them it reached 0.94 after 2,000 steps. 64 per point, or
    250 shared by a batch, pushed the unretrieved labels down too slowly to leave the popularity
    plateau. They cost ~1.3x in speed on amazon670k's shape (~5 labels per point: 86.5 against 67.5 ms
    a step), where -1 with lr=1e-3 learns faster per second (BENCHMARKS.md)."""
    random_negative_group: int = 4
    """Consecutive training points that draw their random negatives from one random sequence (each
    keeps the first `random_negatives` it has not retrieved, so each point's draw stays uniform over
    its own unretrieved labels): 1 = every point its own. Sharing by 4 cuts the distinct rows the
    optimizer steps on a batch (amazon670k: ~32,000 random rows to ~8,000): 240 s back to back,
    1,917 vs 1,576 samples/s, P@1 0.553 vs 0.538; on delicious200k P@1 0.151 / 0.722 / 0.916 / 0.938
    at 500-2,000 steps vs 0.152 / 0.795 / 0.924 / 0.936.
    Shared by a whole batch, the unretrieved labels were pushed down too rarely (BENCHMARKS.md)."""
    min_active: int = 0
    """Pad the active set with random neurons up to this size (0 = no padding)."""

    batch_size: int = 128
    epochs: int = 5
    lr: float = 3e-3
    """Adam's step size. 3e-3 rather than the usual 1e-3: with random negatives the softmax estimates
    the full one, whose many unretrieved labels must first be pushed down row by row (at 1/10 of
    amazon670k's shape P@1 after 300 / 1,200 steps: 0.022 / 0.32 at 1e-3, 0.17 / 0.56 at 3e-3)."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    moment_dtype: MomentDtype = "bfloat16"
    """How LSH-sampled layers store Adam's first moment: bfloat16 halves its memory and snapshot size
    (173 MB at 670k labels; P@1 matched float32's over 3,000 amazon670k steps, speed the same within
    noise), float32 is textbook Adam. The second moment and dense layers stay float32."""
    weight_dtype: WeightDtype = "bfloat16"
    """How the weight matrices are stored: bfloat16 (the top half of a float32) halves the bytes that
    every forward pass, backward pass, update and rehash reads, and a SLIDE step's cost is reading
    scattered rows; it also halves the model's memory and snapshot size. Sums, the softmax and Adam's
    update run in float32; the updated weight is rounded stochastically, so an Adam step below
    bfloat16's resolution (1/128 of the weight) still moves it in expectation. float32 is exact
    textbook storage. The input layer's biases and the optimizer's state keep their own dtypes."""
    init_std: float = 0.01

    rehash_n0: int = 20
    """Steps before the first rehash; the i-th interval is rehash_n0 * exp(rehash_lambda * i)."""
    rehash_lambda: float = 0.1
    rehash_max_interval: int = 100
    """Upper bound on the interval between rehashes, in steps: rows change direction within a few
    hundred Adam steps, and stale buckets stop returning the neurons that score high."""
    rebuild_every: int = 0
    """Draw new hash functions every this many rehashes (0 = never)."""
    drift_threshold: float = 0.0
    """Rehash only rows whose weights moved by more than this fraction of their norm (0 = all rows)."""

    threads: int = 0
    """Worker threads (0 = all cores Numba sees)."""
    seed: int = 0
    eval_every: int = 0
    """Evaluate every this many steps (0 = once per epoch)."""
    eval_points: int = 2000
    """Test points used by the periodic evaluation (0 = all)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        _check(
            len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            "hidden",
            "give at least one hidden layer, each of width >= 1",
        )
        _check(self.hash_family in ("simhash", "wta", "dwta"), "hash_family", "must be simhash, wta or dwta")
        _check(self.insertion in ("fifo", "reservoir"), "insertion", "must be fifo or reservoir")
        _check(self.moment_dtype in ("float32", "bfloat16"), "moment_dtype", "must be float32 or bfloat16")
        _check(self.weight_dtype in ("float32", "bfloat16"), "weight_dtype", "must be float32 or bfloat16")
        _check(0 <= self.hash_l <= 1024, "hash_l", "number of tables must be 0 (auto) or in [1, 1024]")
        _check(2 <= self.bin_size <= 256, "bin_size", "must be in [2, 256]")
        _check(0 <= self.hash_k <= 64, "hash_k", "must be 0 (auto) or in [1, 64]")
        _check(0 < self.simhash_density <= 1, "simhash_density", "must be in (0, 1]")
        _check(
            self.table_bits == 0 or 1 <= self.table_bits <= 24,
            "table_bits",
            f"buckets per table are 2^table_bits, so table_bits must be 0 (auto) or in [1, 24]; got {self.table_bits}",
        )
        _check(self.bucket_size >= 1, "bucket_size", "must be >= 1")
        _check(
            1 <= self.active_threshold <= (self.hash_l or WIDE_LAYER_TABLES),
            "active_threshold",
            f"must be in [1, hash_l] ({WIDE_LAYER_TABLES} when hash_l is 0, auto)",
        )
        _check(self.max_active >= -1, "max_active", "must be -1 (no cap), 0 (auto) or a positive cap")
        _check(self.predict_max_active >= -1, "predict_max_active", "must be -1 (no cap), 0 (auto) or > 0")
        _check(0 <= self.probes <= 64, "probes", "must be in [0, 64]")
        _check(-1 <= self.predict_probes <= 64, "predict_probes", "must be -1 (as probes) or in [0, 64]")
        _check(
            self.hash_family == "simhash" or (self.probes == 0 and self.predict_probes <= 0),
            "probes",
            "multi-probe needs the simhash family (WTA/DWTA codes have no confidence margin)",
        )
        _check(self.min_active >= 0, "min_active", "must be >= 0")
        _check(self.random_negative_group >= 1, "random_negative_group", "must be >= 1 (1 = no sharing)")
        _check(self.random_negatives >= -1, "random_negatives", "must be -1 (none), 0 (auto) or a count")
        _check(self.hard_negatives >= -1, "hard_negatives", "must be -1 (all), 0 (auto) or a count")
        _check(self.predict_hubs >= -1, "predict_hubs", "must be -1 (the training hubs), 0 (auto) or a count")
        _check(self.hub_neurons >= -1, "hub_neurons", "must be -1 (none), 0 (auto) or a count")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.epochs >= 0, "epochs", "must be >= 0")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "Adam betas must be in [0, 1)")
        _check(self.eps > 0, "eps", "must be > 0")
        _check(self.init_std > 0, "init_std", "must be > 0")
        _check(self.rehash_n0 >= 1, "rehash_n0", "must be >= 1 step")
        _check(self.rehash_lambda >= 0, "rehash_lambda", "must be >= 0")
        _check(self.rehash_max_interval >= 1, "rehash_max_interval", "must be >= 1")
        _check(self.rebuild_every >= 0, "rebuild_every", "must be >= 0")
        _check(0 <= self.drift_threshold < 10, "drift_threshold", "must be in [0, 10)")
        _check(self.threads >= 0, "threads", "must be >= 0")
        _check(0 <= self.seed < 2**63, "seed", "must be in [0, 2^63)")
        _check(self.eval_every >= 0 and self.eval_points >= 0, "eval_every", "must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SlideConfig:
        """Build from a plain mapping; unknown keys are an error naming them."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; known settings are {sorted(known)}")
        if "hidden" in values and isinstance(values["hidden"], int):
            values["hidden"] = (values["hidden"],)
        return cls(**values)

    def replace(self, **changes: Any) -> SlideConfig:
        return dataclasses.replace(self, **changes)


class ConfigError(ValueError):
    """A setting is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


__all__ = ["SlideConfig", "ConfigError", "HashFamily", "Insertion", "MomentDtype", "WeightDtype", "field"]
