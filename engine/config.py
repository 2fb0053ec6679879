"""Training and network configuration: one frozen dataclass, checked on creation.

Every field has a default that works on unseen data; the service exposes the same fields over HTTP,
the CLI as flags and `--config file.toml`. A setting the engine can choose from the data is None (auto) by
default; what auto resolves to for a data shape is engine.resolve's to say. A count that can be switched off
takes the word its field names ("none", "all") rather than a special number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

HashFamily = Literal["simhash", "wta", "dwta"]
NoneWord = Literal["none"]
AllWord = Literal["all"]
Insertion = Literal["fifo", "reservoir"]
MomentDtype = Literal["float32", "bfloat16"]
WeightDtype = Literal["float32", "bfloat16"]


WIDE_LAYER_TABLES = 16
"""Tables of a sampled layer wider than 20,000 neurons when hash_l is None (auto)."""
SMALL_LAYER_TABLES = 50
"""Tables of a narrower sampled layer when hash_l is None (auto)."""
DENSE_OUTPUT_MAX_LABELS = 2048
"""Widest output layer that sample_output = None (auto) trains densely, with a full softmax."""
NARROW_HIDDEN = 128
"""The hidden width hidden = None (auto) gives a dense output layer and an output layer of more than
WIDE_HIDDEN_MAX_LABELS labels."""
WIDE_HIDDEN = 512
"""The hidden width hidden = None (auto) gives a sampled output layer of up to WIDE_HIDDEN_MAX_LABELS labels."""
WIDE_HIDDEN_MAX_LABELS = 100_000
"""Widest output layer that gets WIDE_HIDDEN: its rows and Adam state take about 400 MB there (8 bytes a weight
with bfloat16 weights and first moments)."""


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric setting: [low, high], an end excluded when `low_open` / `high_open`; `note` says what
    special values mean. For `hidden` it bounds each width."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)  # NaN is in no range

    def __str__(self) -> str:
        low, high = (f"{v}" if isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        text = f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return f"{text} ({self.note})" if self.note else text


MAX_HIDDEN_LAYERS = 8
"""Most hidden layers a network may have."""
COUNT_MAX = 2**24
"""Upper bound of the neuron-count settings (caps, hubs, negatives): more than any output layer trained here."""

BOUNDS: dict[str, Bounds] = {
    "hidden": Bounds(1, 2**20),
    "hash_k": Bounds(1, 64, note="null = auto"),
    "hash_l": Bounds(1, 1024, note="null = auto"),
    "bin_size": Bounds(2, 256),
    "simhash_density": Bounds(0.0, 1.0, low_open=True),
    "table_bits": Bounds(1, 24, note="null = auto; buckets per table are 2^table_bits"),
    "bucket_size": Bounds(1, 2**20),
    "active_threshold": Bounds(1, 1024, note="at most hash_l"),
    "max_active": Bounds(1, COUNT_MAX, note='null = auto, "none" = no cap'),
    "predict_max_active": Bounds(1, COUNT_MAX, note='null = auto, "none" = no cap'),
    "probes": Bounds(0, 64),
    "predict_probes": Bounds(0, 64, note="null = as probes"),
    "hub_neurons": Bounds(1, COUNT_MAX, note='null = auto, "none" = no hubs'),
    "predict_hubs": Bounds(1, COUNT_MAX, note='null = auto, "none" = the training hubs only'),
    "hard_negatives": Bounds(1, COUNT_MAX, note='null = auto, "all" = every non-label'),
    "random_negatives": Bounds(1, COUNT_MAX, note='null = auto, "none" = no random negatives'),
    "random_negative_group": Bounds(1, 65536, note="1 = no sharing"),
    "min_active": Bounds(0, COUNT_MAX),
    "batch_size": Bounds(1, 65536),
    "epochs": Bounds(0, 10**7),
    "lr": Bounds(0.0, 1.0, low_open=True),
    "lr_warmup_steps": Bounds(1, 10**9, note='null = auto, "none" = no warm-up'),
    "lr_decay": Bounds(0.0, 1.0, low_open=True, note="1 = constant step size"),
    "val_points": Bounds(1, 10**7, note='null = auto, "none" = no validation split'),
    "early_stop_patience": Bounds(0, 10**6, note="0 = never stop early"),
    "beta1": Bounds(0.0, 1.0, high_open=True),
    "beta2": Bounds(0.0, 1.0, high_open=True),
    "eps": Bounds(0.0, 1.0, low_open=True),
    "init_std": Bounds(0.0, 10.0, low_open=True),
    "rehash_n0": Bounds(1, 10**9),
    "rehash_lambda": Bounds(0.0, 10.0),
    "rehash_max_interval": Bounds(1, 10**9),
    "rebuild_every": Bounds(0, 10**6, note="0 = never"),
    "drift_threshold": Bounds(0.0, 10.0, high_open=True),
    "threads": Bounds(1, 1024, note="null = all cores"),
    "seed": Bounds(0, 2**63, high_open=True),
    "eval_every": Bounds(1, 10**9, note="null = once per epoch"),
    "eval_points": Bounds(1, 10**7, note="null = all"),
}
"""The range of every numeric setting: SlideConfig checks them, and the service's job schema states them."""

WORDS: dict[str, str] = {
    "max_active": "none",
    "predict_max_active": "none",
    "hub_neurons": "none",
    "predict_hubs": "none",
    "hard_negatives": "all",
    "random_negatives": "none",
    "lr_warmup_steps": "none",
    "val_points": "none",
}
"""The word a count setting takes instead of a number (what it means: the field's note in BOUNDS)."""

LEGACY: dict[str, dict[int, str | None]] = {
    **{name: {0: None} for name in ("hash_k", "hash_l", "table_bits", "threads", "eval_every", "eval_points")},
    **{name: {0: None, -1: word} for name, word in WORDS.items()},
    "predict_probes": {-1: None},
}
"""Numbers that meant auto (0) or none/all (-1) before those became null and words, by field: what they mean now.
SlideConfig.from_dict still takes them (snapshots and job bodies written before); `upgrade_settings` says so."""


def upgrade_settings(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """values with the old numbers of LEGACY (and "auto", which a TOML file writes for null) replaced by what
    they mean now, and a deprecation note per number replaced."""
    out = dict(values)
    notes = []
    for name, old in LEGACY.items():
        value = out.get(name)
        if value == "auto":
            out[name] = None
        elif isinstance(value, int) and not isinstance(value, bool) and value in old:
            new = old[value]
            out[name] = new
            shown = "null (auto)" if new is None else f'"{new}"'
            notes.append(f"{name}: {value} is deprecated and will be refused in a later release; use {shown}")
    return out, notes


@dataclass(frozen=True)
class SlideConfig:
    """Network, hashing, optimizer and schedule of one SLIDE training run."""

    hidden: tuple[int, ...] | None = None
    """Widths of the hidden ReLU layers, input side first. None = auto, one layer: WIDE_HIDDEN (512) neurons when
    the output layer is LSH-sampled and has at most WIDE_HIDDEN_MAX_LABELS (100,000) labels, where its wider
    embedding fits more labels apart at a cost proportional to the few active neurons; else NARROW_HIDDEN (128),
    since a dense output layer pays for every label at every step and a wider one costs memory. A wider layer
    can fit more and makes every step cost more."""
    sample_hidden: bool = False
    """LSH-sample the hidden layers too. Off by default: the output layer is where the cost is."""
    sample_output: bool | None = None
    """LSH-sample the output layer: None = auto, sampled when it has more than DENSE_OUTPUT_MAX_LABELS labels
    (below that a full softmax is as fast and learns more); False trains every output neuron (`--dense`)."""

    hash_family: HashFamily = "simhash"
    """Hash function of the tables: simhash (signed sparse random projections; the only one with multi-probe),
    wta or dwta (winner-take-all codes; dwta densifies sparse inputs)."""
    hash_k: int | None = None
    """Codes (WTA/DWTA) or bits (SimHash) concatenated per table; None = auto, chosen from the layer width so that
    an input's L buckets hold about 5% of the layer's neurons (at most 1,000). Larger = smaller buckets."""
    hash_l: int | None = None
    """Number of independent tables; None = auto: 16 for layers wider than 20,000 neurons (their buckets fill, so
    16 already return max_active), else 50. More tables retrieve more and cost more per step and per rehash."""
    bin_size: int = 8
    """WTA/DWTA bin width: each code is an argmax position in [0, bin_size)."""
    simhash_density: float = 0.05
    """Fraction of non-zero (+-1) entries in each SimHash projection."""
    table_bits: int | None = None
    """log2 of buckets per table; None = auto, the code space's own size capped at 20."""
    bucket_size: int = 64
    """Capacity of a bucket (neuron ids). Trained rows crowd into full buckets, so this sets how many candidates
    an input reads from each table: larger reads more and costs more per step."""
    insertion: Insertion = "fifo"
    """What a full bucket does with a new id: replace the oldest (fifo) or reservoir sampling."""

    active_threshold: int = 1
    """Keep a retrieved neuron only if it was found in at least this many of the L buckets (at most the tables of
    every sampled layer)."""
    max_active: int | NoneWord | None = None
    """Cap on retrieved neurons per point, keeping the most frequently retrieved: None = auto (the layer's target
    active size: 5% of a small layer, at most 1,000), "none" = no cap."""
    predict_max_active: int | NoneWord | None = None
    """The same cap when serving predictions, serving hubs on top: None = auto (the training cap for a layer with
    serving hubs, else none), "none" = the whole buckets (at most hash_l * bucket_size). Raise it for recall,
    lower it for latency."""
    probes: int = 0
    """Multi-probe SimHash in training: extra buckets read per table, each one least-confident bit away from
    the input's own (0 = the input's own bucket only). Raises recall with few tables, at a cost per step."""
    predict_probes: int | None = None
    """The same when serving predictions: None = as in training."""
    hub_neurons: int | NoneWord | None = None
    """Neurons with the highest score for the average input, added to every active set so they keep meeting
    negative gradients: None = auto (a quarter of the target active size, at most 256, for layers wider than
    20,000 neurons, else none), "none" = no hubs."""
    predict_hubs: int | NoneWord | None = None
    """Hub neurons added to every candidate set when serving: None = auto (for layers wider than 20,000 neurons
    the larger of twice the target active size and 1% of the layer, half by score on the mean input and half
    by weight norm; else the training hubs), "none" = the training hubs only. Raise it if lsh recall falls."""
    hard_negatives: int | AllWord | None = None
    """Per point, only this many of the output active set's non-label neurons, the most probable, get a
    gradient (the softmax still spans the whole set): None = auto (a quarter of the target active size for
    layers wider than 20,000 neurons, else all), "all" = all. Fewer = a cheaper update; too few stops learning."""
    random_negatives: int | NoneWord | None = None
    """Output neurons each point draws uniformly from those it did not retrieve, with log-Q-corrected logits,
    so the sampled softmax estimates the full one: None = auto (250 for output layers wider than 20,000
    neurons, else none), "none" = none. Needed with many labels per point; "none" with lr=1e-3 trains faster
    where points have few labels."""
    random_negative_group: int = 4
    """Consecutive training points that draw their random negatives from one random sequence, each point's
    draw still uniform over its own unretrieved labels (1 = every point its own). Sharing cuts the distinct
    rows the optimizer updates per batch; a group too large pushes the unretrieved labels down too rarely."""
    min_active: int = 0
    """Pad the active set with random neurons up to this size (0 = no padding)."""

    batch_size: int = 128
    """Training points per step (one Adam update per batch)."""
    epochs: int = 10
    """Most passes over the training data. Early stopping (early_stop_patience) usually ends a run sooner once
    validation P@1 stops rising, and the best model is served, so more epochs cost time, never quality."""
    lr: float = 1e-2
    """Adam's peak step size (see lr_warmup_steps and lr_decay). Lazy Adam moves a row only when a batch
    touches it, so the rows of rare features and labels get few steps: a large step lets them learn within a
    few epochs, and the plateau decay and the best snapshot take care of what it costs later."""
    lr_warmup_steps: int | NoneWord | None = None
    """Steps over which the step size rises linearly from lr / warm-up steps to lr, so the first updates
    of rows that Adam has barely seen stay small: None = auto (a quarter of an epoch, at most 500), "none" = no
    warm-up."""
    lr_decay: float = 0.5
    """Factor applied to the step size each time an evaluation brings no new best validation P@1 (reduce
    on plateau; 1 = constant). It follows the validation history, never the number of epochs configured,
    so a longer run follows the same path as a shorter one. Without a validation split it never applies."""
    normalize_input: bool = False
    """Scale every input row (training and prediction) to unit L2 norm; for raw counts or unnormalised
    TF-IDF, whose row norms vary with document length."""
    val_points: int | NoneWord | None = None
    """Training points held out as a validation split (seeded, never trained on) that picks the served
    snapshot and stops training early: None = auto (a tenth of the training set, at most 5,000, none below
    1,000 points), "none" = no split (the last state is served), a number = this many. The test set is only
    reported."""
    early_stop_patience: int = 3
    """Evaluations without a new best validation P@1 before training stops (0 = run every epoch)."""
    beta1: float = 0.9
    """Adam's decay rate of the first moment (the running mean of gradients)."""
    beta2: float = 0.999
    """Adam's decay rate of the second moment (the running mean of squared gradients)."""
    eps: float = 1e-8
    """Added to Adam's denominator, so rows with tiny gradients do not take huge steps."""
    moment_dtype: MomentDtype = "bfloat16"
    """How LSH-sampled layers store Adam's first moment: bfloat16 halves its memory and snapshot size at equal
    accuracy; float32 is textbook Adam. The second moment and dense layers stay float32."""
    weight_dtype: WeightDtype = "bfloat16"
    """How the weight matrices are stored: bfloat16 halves the bytes every step reads and the model's memory;
    sums, the softmax and Adam run in float32 and updates are rounded stochastically. float32 = exact storage.
    The input layer's biases and the optimizer's state keep their own dtypes."""
    init_std: float = 0.05
    """Standard deviation of the normal initial weights (biases start at zero). Too small a start leaves the
    hidden layer near zero and the model on the popularity plateau for epochs."""

    rehash_n0: int = 20
    """Steps before the first rehash; the i-th interval is rehash_n0 * exp(rehash_lambda * i)."""
    rehash_lambda: float = 0.1
    """Growth rate of the interval between rehashes (0 = every rehash_n0 steps)."""
    rehash_max_interval: int = 100
    """Upper bound on the interval between rehashes, in steps: rows change direction within a few hundred Adam
    steps, and stale buckets stop returning the neurons that score high."""
    rebuild_every: int = 0
    """Draw new hash functions every this many rehashes (0 = never)."""
    drift_threshold: float = 0.0
    """Rehash only rows whose weights moved by more than this fraction of their norm (0 = all rows)."""

    threads: int | None = None
    """Worker threads (None = all cores Numba sees)."""
    seed: int = 0
    """Seed of every random draw (weights, hash functions, sampling); with threads=1 a run is bit-identical."""
    eval_every: int | None = None
    """Evaluate every this many steps (None = once per epoch)."""
    eval_points: int | None = 2000
    """Test points used by the periodic evaluation (None = all); it reports them and selects nothing."""

    def __post_init__(self) -> None:
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
            _check(
                1 <= len(self.hidden) <= MAX_HIDDEN_LAYERS,
                "hidden",
                f"give 1 to {MAX_HIDDEN_LAYERS} hidden layers (or null for auto); got {len(self.hidden)}",
            )
        for name in BOUNDS:
            for value in (self.hidden or ()) if name == "hidden" else (getattr(self, name),):
                check_setting(name, value)
        _check(self.hash_family in ("simhash", "wta", "dwta"), "hash_family", "must be simhash, wta or dwta")
        _check(self.insertion in ("fifo", "reservoir"), "insertion", "must be fifo or reservoir")
        _check(self.moment_dtype in ("float32", "bfloat16"), "moment_dtype", "must be float32 or bfloat16")
        _check(self.weight_dtype in ("float32", "bfloat16"), "weight_dtype", "must be float32 or bfloat16")
        _check(
            1 <= self.active_threshold <= (self.hash_l or SMALL_LAYER_TABLES),
            "active_threshold",
            f"must be in [1, hash_l] (at most {SMALL_LAYER_TABLES} when hash_l is auto; engine.resolve checks it "
            f"against each layer's tables once the data's shape is known: {WIDE_LAYER_TABLES} for a wide layer)",
        )
        _check(
            self.hash_family == "simhash" or (self.probes == 0 and not self.predict_probes),
            "probes",
            "multi-probe needs the simhash family (WTA/DWTA codes have no confidence margin)",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = None if self.hidden is None else list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SlideConfig:
        """Build from a plain mapping; unknown keys are an error naming them. The numbers settings used before
        null and words (LEGACY) are read as what they meant: `upgrade_settings` lists them."""
        values, _ = upgrade_settings(dict(values or {}))
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


def check_setting(name: str, value: Any) -> None:
    """Raise ConfigError unless `value` is in the range of the numeric setting `name` (BOUNDS), or null (auto)
    or the setting's word where it takes them."""
    if (value is None and name in LEGACY) or (name in WORDS and value == WORDS[name]):
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and BOUNDS[name].contains(value)
    _check(ok, name, f"must be in {BOUNDS[name]}; got {value!r}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


__all__ = [
    "DENSE_OUTPUT_MAX_LABELS",
    "SlideConfig",
    "ConfigError",
    "BOUNDS",
    "Bounds",
    "LEGACY",
    "WORDS",
    "upgrade_settings",
    "check_setting",
    "MAX_HIDDEN_LAYERS",
    "HashFamily",
    "Insertion",
    "MomentDtype",
    "WeightDtype",
]
