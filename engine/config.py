"""Training, network and serving configuration: frozen dataclasses, checked on creation.

`SlideConfig` groups the settings of one run: `model` (the network), `sampling` (LSH tables, active sets,
negatives, rehashing), `optimizer` (Adam and the batch), `schedule` (epochs, step-size schedule, validation,
evaluation), `predict` (how the trained model serves: `PredictConfig`, kept apart from training) and the run's
`threads` and `seed`. Every field has a default that works on unseen data; the service takes the same nested
object in a job's `config`, the CLI takes flags and `--config file.toml` (one table per group).

A setting the engine can choose from the data is None (auto) by default; what auto resolves to for a data shape
is engine.resolve's to say. A count that can be switched off takes the word its field names ("none", "all",
"never") rather than a special number. Settings are addressed by their path, `group.field` (`sampling.hash_l`)
or `field` for the run-level ones; the flat names of the previous release (`hash_l`, `predict_hubs`) are still
read, with a deprecation note (`upgrade_settings`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

HashFamily = Literal["simhash", "wta", "dwta"]
NoneWord = Literal["none"]
AllWord = Literal["all"]
NeverWord = Literal["never"]
Insertion = Literal["fifo", "reservoir"]
MomentDtype = Literal["float32", "bfloat16"]
WeightDtype = Literal["float32", "bfloat16"]
OutputInit = Literal["random", "centroids"]
Loss = Literal["softmax", "sigmoid"]

WIDE_LAYER_TABLES = 16
"""Tables of a sampled layer wider than 20,000 neurons when sampling.hash_l is None (auto)."""
SMALL_LAYER_TABLES = 50
"""Tables of a narrower sampled layer when sampling.hash_l is None (auto)."""
DENSE_OUTPUT_MAX_LABELS = 2048
"""Widest output layer that model.sample_output = None (auto) trains densely, with a full softmax."""
NARROW_HIDDEN = 128
"""The hidden width model.hidden = None (auto) gives an output layer of more than WIDE_HIDDEN_MAX_LABELS labels, and a
dense one of more than DENSE_OUTPUT_MAX_LABELS."""
DENSE_HIDDEN = 256
"""The hidden width model.hidden = None (auto) gives a dense output layer of up to DENSE_OUTPUT_MAX_LABELS labels."""
WIDE_HIDDEN = 512
"""The hidden width model.hidden = None (auto) gives a sampled output layer of up to WIDE_HIDDEN_MAX_LABELS labels."""
WIDE_HIDDEN_MAX_LABELS = 100_000
"""Widest output layer that gets WIDE_HIDDEN: its rows and Adam state take about 400 MB there (8 bytes a weight
with bfloat16 weights and first moments)."""
CENTROID_INIT_MAX_LABELS = 100_000
"""Widest output layer that model.output_init = None (auto) starts from its labels' centroids: making them holds a
float32 sum per label and hidden unit (205 MB at 100,000 labels and width 512)."""


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
    "model.hidden": Bounds(1, 2**20),
    "model.init_std": Bounds(0.0, 10.0, low_open=True),
    "sampling.hash_k": Bounds(1, 64, note="null = auto"),
    "sampling.hash_l": Bounds(1, 1024, note="null = auto"),
    "sampling.bin_size": Bounds(2, 256),
    "sampling.simhash_density": Bounds(0.0, 1.0, low_open=True),
    "sampling.table_bits": Bounds(1, 24, note="null = auto; buckets per table are 2^table_bits"),
    "sampling.bucket_size": Bounds(1, 2**20),
    "sampling.active_threshold": Bounds(1, 1024, note="at most hash_l"),
    "sampling.max_active": Bounds(1, COUNT_MAX, note='null = auto, "none" = no cap'),
    "sampling.probes": Bounds(0, 64),
    "sampling.hub_neurons": Bounds(1, COUNT_MAX, note='null = auto, "none" = no hubs'),
    "sampling.hard_negatives": Bounds(1, COUNT_MAX, note='null = auto, "all" = every non-label'),
    "sampling.random_negatives": Bounds(1, COUNT_MAX, note='null = auto, "none" = no random negatives'),
    "sampling.random_negative_group": Bounds(1, 65536, note="1 = no sharing"),
    "sampling.min_active": Bounds(0, COUNT_MAX),
    "sampling.rehash_n0": Bounds(1, 10**9),
    "sampling.rehash_lambda": Bounds(0.0, 10.0),
    "sampling.rehash_max_interval": Bounds(1, 10**9),
    "sampling.rebuild_every": Bounds(1, 10**6, note='"never" = keep the first hash functions'),
    "sampling.drift_threshold": Bounds(0.0, 10.0, high_open=True),
    "optimizer.lr": Bounds(0.0, 1.0, low_open=True),
    "optimizer.beta1": Bounds(0.0, 1.0, high_open=True),
    "optimizer.beta2": Bounds(0.0, 1.0, high_open=True),
    "optimizer.eps": Bounds(0.0, 1.0, low_open=True),
    "optimizer.batch_size": Bounds(1, 65536),
    "optimizer.hidden_dropout": Bounds(0.0, 1.0, high_open=True, note="null = auto, 0 = none"),
    "schedule.epochs": Bounds(0, 10**7),
    "schedule.lr_warmup_steps": Bounds(1, 10**9, note='null = auto, "none" = no warm-up'),
    "schedule.lr_decay": Bounds(0.0, 1.0, low_open=True, note="1 = constant step size"),
    "schedule.lr_epoch_decay": Bounds(0.0, 1.0, low_open=True, note="1 = no decay by epochs"),
    "schedule.val_points": Bounds(1, 10**7, note='null = auto, "none" = no validation split'),
    "schedule.early_stop_patience": Bounds(1, 10**6, note='"never" = run every epoch'),
    "schedule.eval_every": Bounds(1, 10**9, note="null = once per epoch"),
    "schedule.eval_points": Bounds(1, 10**7, note="null = all"),
    "predict.max_active": Bounds(1, COUNT_MAX, note='null = auto, "none" = no cap'),
    "predict.probes": Bounds(0, 64, note="null = as sampling.probes"),
    "predict.hubs": Bounds(1, COUNT_MAX, note='null = auto, "none" = the training hubs only'),
    "threads": Bounds(1, 1024, note="null = all cores"),
    "seed": Bounds(0, 2**63, high_open=True),
}
"""The range of every numeric setting by path: the configs check them, and the service's job schema states them."""

WORDS: dict[str, str] = {
    "sampling.max_active": "none",
    "sampling.hub_neurons": "none",
    "sampling.hard_negatives": "all",
    "sampling.random_negatives": "none",
    "sampling.rebuild_every": "never",
    "schedule.lr_warmup_steps": "none",
    "schedule.val_points": "none",
    "schedule.early_stop_patience": "never",
    "predict.max_active": "none",
    "predict.hubs": "none",
}
"""The word a count setting takes instead of a number (what it means: the setting's note in BOUNDS)."""

LEGACY: dict[str, dict[int, str | None]] = {
    **{
        path: {0: None}
        for path in (
            "sampling.hash_k",
            "sampling.hash_l",
            "sampling.table_bits",
            "threads",
            "schedule.eval_every",
            "schedule.eval_points",
        )
    },
    **{path: {0: None, -1: word} for path, word in WORDS.items() if word != "never"},
    **{path: {0: word} for path, word in WORDS.items() if word == "never"},
    "predict.probes": {-1: None},
}
"""Numbers that meant auto (0), none/all (-1) or never (0) before those became null and words, by path: what they
mean now. SlideConfig.from_dict still takes them (snapshots and job bodies written before); `upgrade_settings`
says so."""


class _Group:
    """What every settings group does: check its fields on creation (BOUNDS, by `GROUP.field`), `replace`."""

    GROUP: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            path = f"{self.GROUP}.{f.name}"
            if path in BOUNDS:
                value = getattr(self, f.name)
                for v in value if isinstance(value, tuple) else (value,):
                    check_setting(path, v)
            choices = _CHOICES.get(path)
            if choices is not None:
                auto = f.default is None  # null = auto
                ok = getattr(self, f.name) in choices or (auto and getattr(self, f.name) is None)
                _check(ok, path, f"must be {' or '.join(choices)}" + (" (or null for auto)" if auto else ""))

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ModelConfig(_Group):
    """The network: its hidden layers, which layers are LSH-sampled, how weights are stored and initialised."""

    GROUP: ClassVar[str] = "model"

    hidden: tuple[int, ...] | None = None
    """Widths of the hidden ReLU layers, input side first. None = auto, one layer: WIDE_HIDDEN (512) neurons when
    the output layer is LSH-sampled and has at most WIDE_HIDDEN_MAX_LABELS (100,000) labels, where its wider
    embedding fits more labels apart at a cost proportional to the few active neurons; DENSE_HIDDEN (256) when it
    is trained densely and has at most DENSE_OUTPUT_MAX_LABELS (2,048), since a dense output layer pays for every
    label at every step; else NARROW_HIDDEN (128), where a wider one costs memory. Set it to fit more (wider, every
    step costs more) or to save memory and time (narrower)."""
    sample_hidden: bool = False
    """LSH-sample the hidden layers too. Off by default: the output layer is where the cost is; turn it on only
    for hidden layers of many thousands of neurons."""
    sample_output: bool | None = None
    """LSH-sample the output layer: None = auto, sampled when it has more than DENSE_OUTPUT_MAX_LABELS labels
    (below that a full softmax is as fast and learns more); False trains every output neuron (`--dense`)."""
    normalize_input: bool = False
    """Scale every input row (training and prediction) to unit L2 norm; turn it on for raw counts or
    unnormalised TF-IDF, whose row norms vary with document length."""
    weight_dtype: WeightDtype = "bfloat16"
    """How the weight matrices are stored: bfloat16 halves the bytes every step reads and the model's memory;
    sums, the softmax and Adam run in float32 and updates are rounded stochastically. float32 = exact storage,
    for comparisons against a textbook implementation. The input layer's biases and the optimizer's state keep
    their own dtypes."""
    init_std: float = 0.05
    """Standard deviation of the normal initial weights (biases start at zero). Too small a start leaves the
    hidden layer near zero and the model on the popularity plateau for epochs; too large saturates the softmax."""
    output_init: OutputInit | None = None
    """How a new model's output rows start. "centroids": each label's row points along the mean initial hidden
    activation of the training points that carry it, less the mean over all training points (a label embedding
    like PECOS's PIFA, in the network's initial hidden space), at a few times the length of a random row
    (engine.centroids); labels without training points keep their random rows. Training then starts with a
    softmax that already ranks a point's labels near the top, which tail labels, with few gradient steps of
    their own, need most. "random": the normal rows of init_std. None = auto: centroids for output layers of up
    to CENTROID_INIT_MAX_LABELS labels, random above. A resumed run, a warm start (init_from) and the shards of a
    label-sharded run keep the rows they are given."""
    loss: Loss | None = None
    """The output layer's training loss over a point's active labels. "sigmoid": a logistic loss per label
    (one-vs-rest, as the linear XMC models train), every label scored on its own, with output biases starting
    at -log(labels); "softmax": a cross-entropy over the active set, the labels competing for one unit of
    probability. Prediction ranks by the same scores either way. None = auto: sigmoid for output layers of up to
    20,000 labels, where it learned more on every quality benchmark set; softmax for wider ones, whose hubs and
    random negatives estimate the full softmax, and where the sigmoid learned far less (BENCHMARKS.md). A warm
    start keeps its source's, the shards of a label-sharded run train softmax. Snapshots record what was chosen,
    and a resumed run keeps it."""

    def __post_init__(self) -> None:
        if self.hidden is not None:
            widths = (self.hidden,) if isinstance(self.hidden, int) else self.hidden
            object.__setattr__(self, "hidden", tuple(int(h) for h in widths))
            _check(
                1 <= len(self.hidden) <= MAX_HIDDEN_LAYERS,
                "model.hidden",
                f"give 1 to {MAX_HIDDEN_LAYERS} hidden layers (or null for auto); got {len(self.hidden)}",
            )
        super().__post_init__()


@dataclass(frozen=True)
class SamplingConfig(_Group):
    """How LSH-sampled layers pick their active neurons in training: the hash tables (family, K, L, buckets),
    retrieval (thresholds, caps, probes), the neurons added to every active set (hubs, negatives) and when the
    tables are rebuilt from the moving weights."""

    GROUP: ClassVar[str] = "sampling"

    hash_family: HashFamily = "simhash"
    """Hash function of the tables: simhash (signed sparse random projections; the only one with multi-probe),
    wta or dwta (winner-take-all codes; dwta densifies sparse inputs, for inputs with few non-zeros)."""
    hash_k: int | None = None
    """Codes (WTA/DWTA) or bits (SimHash) concatenated per table; None = auto, chosen from the layer width so that
    an input's L buckets hold about 5% of the layer's neurons (at most 1,000). Larger = smaller buckets, fewer
    and more similar candidates."""
    hash_l: int | None = None
    """Number of independent tables; None = auto: 16 for layers wider than 20,000 neurons (their buckets fill, so
    16 already return max_active), else 50. More tables retrieve more and cost more per step and per rehash."""
    bin_size: int = 8
    """WTA/DWTA bin width: each code is an argmax position in [0, bin_size). Ignored by simhash. Wider bins make
    each code more selective (fewer collisions); at most the layer's input width."""
    simhash_density: float = 0.05
    """Fraction of non-zero (+-1) entries in each SimHash projection; denser projections cost more to hash and
    follow the weights more closely. Raise it for narrow inputs, where 5% is only a few entries."""
    table_bits: int | None = None
    """log2 of buckets per table; None = auto, the code space's own size capped at 20. Lower it to save table
    memory when the code space is much larger than the layer."""
    bucket_size: int = 64
    """Capacity of a bucket (neuron ids). Trained rows crowd into full buckets, so this sets how many candidates
    an input reads from each table: larger reads more and costs more per step."""
    insertion: Insertion = "fifo"
    """Which ids a full bucket keeps: the most recently inserted (fifo, so recently rehashed rows win) or a uniform
    random sample of all that hash there (reservoir). Try reservoir when buckets are full and the rows that moved
    last should not crowd out the others."""
    active_threshold: int = 1
    """Keep a retrieved neuron only if it was found in at least this many of the L buckets (at most the tables of
    every sampled layer). Raise it to keep only the neurons many tables agree on."""
    max_active: int | NoneWord | None = None
    """Cap on retrieved neurons per point in training, keeping the most frequently retrieved: None = auto (the
    layer's target active size: 5% of a small layer, at most 1,000), "none" = no cap."""
    probes: int = 0
    """Multi-probe SimHash in training: extra buckets read per table, each one least-confident bit away from
    the input's own (0 = the input's own bucket only). Raises recall with few tables, at a cost per step."""
    hub_neurons: int | NoneWord | None = None
    """Neurons with the highest score for the average input, added to every active set so they keep meeting
    negative gradients: None = auto (a quarter of the target active size, at most 256, for layers wider than
    20,000 neurons, else none), "none" = no hubs."""
    hard_negatives: int | AllWord | None = None
    """Per point, only this many of the output active set's non-label neurons, the most probable, get a
    gradient (the softmax still spans the whole set): None = auto (a quarter of the target active size for
    layers wider than 20,000 neurons, else all), "all" = all. Fewer = a cheaper update; too few stops learning."""
    random_negatives: int | NoneWord | None = None
    """Output neurons each point draws uniformly from those it did not retrieve, with log-Q-corrected logits,
    so the sampled softmax estimates the full one: None = auto (250 for output layers wider than 20,000
    neurons, else none), "none" = none. Needed with many labels per point; "none" with optimizer.lr 1e-3 trains
    faster where points have few labels."""
    random_negative_group: int = 4
    """Consecutive training points that draw their random negatives from one random sequence, each point's
    draw still uniform over its own unretrieved labels (1 = every point its own). Sharing cuts the distinct
    rows the optimizer updates per batch; a group too large pushes the unretrieved labels down too rarely."""
    min_active: int = 0
    """Pad the active set with random neurons up to this size (0 = no padding). random_negatives is the better
    tool for the output layer; this pads every sampled layer, hidden ones too."""
    rehash_n0: int = 20
    """Steps before the first rehash; the i-th interval is rehash_n0 * exp(rehash_lambda * i). Lower it if the
    first epoch's retrieval lags the fast-moving early weights; raise it to spend less time rehashing."""
    rehash_lambda: float = 0.1
    """Growth rate of the interval between rehashes (0 = every rehash_n0 steps): the weights move less as training
    settles, so the tables need refreshing less often."""
    rehash_max_interval: int = 100
    """Upper bound on the interval between rehashes, in steps: rows change direction within a few hundred Adam
    steps, and stale buckets stop returning the neurons that score high. Lower it if retrieval lags the weights."""
    rebuild_every: int | NeverWord = "never"
    """Draw new hash functions every this many rehashes ("never" = keep the first ones, which suits weights
    whose directions stay spread out)."""
    drift_threshold: float = 0.0
    """Rehash only rows whose weights moved by more than this fraction of their norm (0 = all rows); raise it
    to make a rehash cheaper on layers where few rows move."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            1 <= self.active_threshold <= (self.hash_l or SMALL_LAYER_TABLES),
            "sampling.active_threshold",
            f"must be in [1, hash_l] (at most {SMALL_LAYER_TABLES} when hash_l is auto; engine.resolve checks it "
            f"against each layer's tables once the data's shape is known: {WIDE_LAYER_TABLES} for a wide layer)",
        )
        _check(
            self.hash_family == "simhash" or self.probes == 0,
            "sampling.probes",
            "multi-probe needs the simhash family (WTA/DWTA codes have no confidence margin)",
        )


@dataclass(frozen=True)
class OptimizerConfig(_Group):
    """Adam (lazy: a row moves only when a batch touches it) and the batch it steps on."""

    GROUP: ClassVar[str] = "optimizer"

    lr: float = 1e-2
    """Adam's peak step size (see schedule.lr_warmup_steps and schedule.lr_decay). Lazy Adam moves a row only when
    a batch touches it, so the rows of rare features and labels get few steps: a large step lets them learn
    within a few epochs, and the plateau decay and the best snapshot take care of what it costs later."""
    beta1: float = 0.9
    """Adam's decay rate of the first moment (the running mean of gradients); rarely worth changing."""
    beta2: float = 0.999
    """Adam's decay rate of the second moment (the running mean of squared gradients); rarely worth changing."""
    eps: float = 1e-8
    """Added to Adam's denominator, so rows with tiny gradients do not take huge steps."""
    moment_dtype: MomentDtype = "bfloat16"
    """How LSH-sampled layers store Adam's first moment: bfloat16 halves its memory and snapshot size; float32 is
    textbook Adam. The second moment and dense layers stay float32."""
    batch_size: int = 128
    """Training points per step (one Adam update per batch). Larger batches use more threads at once and take
    fewer, coarser steps."""
    hidden_dropout: float | None = None
    """Probability that training zeroes each hidden unit for one point (inverted dropout: the kept ones are
    scaled by 1 / (1 - rate); prediction drops nothing). A regulariser against a hidden layer that memorises
    the training points. None = auto: training starts without dropout; at the second evaluation in a row without
    progress (see schedule.lr_decay) while the training loss still falls, it raises the rate to 0.5
    (engine.schedule.AUTO_DROPOUT_RATES) and goes on from the best model, instead of reducing the step size and
    counting towards early stopping; without a validation split it stays 0. A number keeps that rate throughout
    (0 = none): 0.3-0.5 suits data the model memorises within a few epochs, and slows learning where it still
    underfits."""


@dataclass(frozen=True)
class ScheduleConfig(_Group):
    """How long training runs and how its step size moves: epochs, warm-up, reduce-on-plateau decay, the
    validation split that picks the served model and stops early, and the periodic evaluation."""

    GROUP: ClassVar[str] = "schedule"

    epochs: int = 10
    """Most passes over the training data. Early stopping (early_stop_patience) usually ends a run sooner once
    validation P@1 stops rising, and the best model is served, so more epochs cost time, never quality."""
    lr_warmup_steps: int | NoneWord | None = None
    """Steps over which the step size rises linearly from optimizer.lr / warm-up steps to optimizer.lr, so the
    first updates of rows that Adam has barely seen stay small: None = auto (a quarter of an epoch, at most 500),
    "none" = no warm-up."""
    lr_decay: float = 0.5
    """Factor applied to the step size each time an evaluation brings no progress: no new best validation P@1
    by at least schedule.PLATEAU_MARGIN (0.003; a smaller gain is still kept as the best model) (reduce on
    plateau; 1 = constant). It follows the validation history, never the number of epochs configured,
    so a longer run follows the same path as a shorter one. Without a validation split it never applies; an
    evaluation that raises hidden dropout (optimizer.hidden_dropout auto) does not apply it."""
    lr_epoch_decay: float = 1.0
    """Factor the step size shrinks by over each epoch of training, step by step (epoch_decay ** epochs trained,
    on top of lr_decay's cuts; 1 = none). 0.8 gains on large sets that still underfit after 10 epochs and loses
    on small ones, whose short epochs need the full step size for longer (BENCHMARKS.md); a warm start continues
    from the epochs its source trained."""
    val_points: int | NoneWord | None = None
    """Training points held out as a validation split (seeded, never trained on) that picks the served
    snapshot and stops training early: None = auto (a tenth of the training set, at most 5,000, none below
    1,000 points), "none" = no split (the last state is served), a number = this many. The test set is only
    reported."""
    early_stop_patience: int | NeverWord = 3
    """Evaluations in a row without progress (see lr_decay) before training stops ("never" = run every epoch);
    a raise of hidden dropout (optimizer.hidden_dropout auto) starts the count again."""
    eval_every: int | None = None
    """Evaluate every this many steps (None = once per epoch). Each evaluation also scores the validation split
    and counts towards early stopping and the step-size decay: set it for long epochs on large data, where once
    per epoch reacts too late."""
    eval_points: int | None = 2000
    """Test points used by the periodic evaluation (None = all); it reports them and selects nothing, so fewer
    only make the reported P@k noisier and the evaluation cheaper."""


@dataclass(frozen=True)
class PredictConfig(_Group):
    """How a trained model serves predictions from its hash tables (`lsh` mode): candidates per query and the
    neurons added to every candidate set. Kept with the model in its snapshot; training reads only `hubs`
    (the serving hubs are picked from the weights at every snapshot). Change these for recall or latency, not
    for what the model learns."""

    GROUP: ClassVar[str] = "predict"

    max_active: int | NoneWord | None = None
    """Cap on candidates per query, keeping the most frequently retrieved, serving hubs on top: None = auto (the
    training cap, sampling.max_active, for a layer with serving hubs, else none), "none" = the whole buckets (at
    most hash_l * bucket_size). Raise it for recall, lower it for latency."""
    probes: int | None = None
    """Multi-probe SimHash when serving: extra buckets read per table; None = as in training (sampling.probes).
    Raise it for recall at a cost in latency."""
    hubs: int | NoneWord | None = None
    """Hub neurons added to every candidate set when serving: None = auto (for layers wider than 20,000 neurons
    the larger of twice the target active size and 1% of the layer, half by score on the mean input and half
    by weight norm, and doubled with more long rows, up to 1/16 of the layer, where `auto` calibration finds the
    tables' recall short; else the training hubs), "none" = the training hubs only. Raise it if lsh recall falls."""


GROUPS: dict[str, type[_Group]] = {
    "model": ModelConfig,
    "sampling": SamplingConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "predict": PredictConfig,
}
"""The settings groups of SlideConfig, by field name."""

RUN_SETTINGS = ("threads", "seed")
"""SlideConfig's own settings, outside any group."""


@dataclass(frozen=True)
class SlideConfig:
    """One SLIDE run: the network (`model`), LSH sampling (`sampling`), Adam (`optimizer`), the schedule
    (`schedule`), serving (`predict`), and the run's threads and seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network: hidden layers, which layers are LSH-sampled, weight storage and initialisation."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """LSH sampling in training: hash tables, retrieval, hubs and negatives, rehashing."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Adam and the batch size."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Epochs, step-size schedule, validation split and early stopping, periodic evaluation."""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """How the trained model serves predictions (kept with it in its snapshot)."""
    threads: int | None = None
    """Worker threads (None = all cores Numba sees). Set it to share a machine with other runs, or to 1 for
    bit-identical reruns."""
    seed: int = 0
    """Seed of every random draw (weights, hash functions, sampling); with threads=1 a run is bit-identical."""

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            _check(isinstance(getattr(self, name), cls), name, f"must be a {cls.__name__}")
        for name in RUN_SETTINGS:
            check_setting(name, getattr(self, name))
        _check(
            self.sampling.hash_family == "simhash" or not self.predict.probes,
            "predict.probes",
            "multi-probe needs the simhash family (WTA/DWTA codes have no confidence margin)",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and nested: one object per group, then threads and seed."""
        d = dataclasses.asdict(self)
        d["model"]["hidden"] = None if self.model.hidden is None else list(self.model.hidden)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SlideConfig:
        """Build from a plain (nested) mapping; an unknown key is an error naming its path. The flat names and the
        numbers of the previous release (FLAT_NAMES, LEGACY) are read as what they meant: `upgrade_settings`
        lists them."""
        values, _ = upgrade_settings(dict(values or {}))
        known = [*GROUPS, *RUN_SETTINGS]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; known settings are {known}")
        groups = {}
        for name, group in GROUPS.items():
            sub = values.get(name) or {}
            if isinstance(sub, _Group):
                groups[name] = sub
                continue
            _check(isinstance(sub, dict), name, f"must be an object of {name} settings; got {sub!r}")
            fields = [f.name for f in dataclasses.fields(group)]  # type: ignore[arg-type]
            unknown = sorted(set(sub) - set(fields))
            if unknown:
                raise ConfigError(f"{name}.{unknown[0]}", f"unknown setting; known {name} settings are {fields}")
            groups[name] = group(**sub)
        return cls(**groups, **{k: values[k] for k in RUN_SETTINGS if k in values})  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> SlideConfig:
        """A copy with whole groups or run-level settings replaced (`config.replace(model=config.model.replace(
        hidden=(64,)))`)."""
        return dataclasses.replace(self, **changes)


def setting(config: SlideConfig, path: str) -> Any:
    """The setting at `path` (`sampling.hash_l`, `seed`), for code that handles settings by name (the CLI's
    flags, the settings a warm start keeps); elsewhere read the attribute."""
    group, _, name = path.rpartition(".")
    return getattr(getattr(config, group) if group else config, name)


def with_settings(config: SlideConfig, changes: dict[str, Any]) -> SlideConfig:
    """`config` with the settings at these paths replaced (`{"model.hidden": (64,), "seed": 1}`)."""
    groups: dict[str, dict[str, Any]] = {}
    run: dict[str, Any] = {}
    for path, value in changes.items():
        group, _, name = path.rpartition(".")
        if group:
            _check(group in GROUPS, path, f"unknown group {group!r}; groups are {list(GROUPS)}")
            groups.setdefault(group, {})[name] = value
        else:
            run[path] = value
    return config.replace(**{g: getattr(config, g).replace(**c) for g, c in groups.items()}, **run)


def merge_settings(*mappings: dict[str, Any]) -> dict[str, Any]:
    """Settings mappings (as SlideConfig.from_dict reads them) merged group by group, later ones winning:
    `merge_settings({"schedule": {"epochs": 1000}}, user_json)`."""
    out: dict[str, Any] = {}
    for mapping in mappings:
        for key, value in mapping.items():
            old = out.get(key)
            out[key] = {**old, **value} if isinstance(value, dict) and isinstance(old, dict) else value
    return out


def setting_paths() -> list[str]:
    """Every setting's path, group by group, then the run-level ones."""
    paths = [f"{g}.{f.name}" for g, cls in GROUPS.items() for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return [*paths, *RUN_SETTINGS]


FLAT_NAMES: dict[str, str] = {
    (f"predict_{name}" if group == "predict" else name): f"{group}.{name}"
    for group, name in (path.split(".") for path in setting_paths() if "." in path)
}
"""The flat names settings had in the previous release (one level, `hash_l`, `predict_hubs`), with their path now.
Read for one more release, with a deprecation note (`upgrade_settings`)."""


def _nullable() -> set[str]:
    out = set(n for n in RUN_SETTINGS if type(None) in typing.get_args(typing.get_type_hints(SlideConfig)[n]))
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        out |= {f"{group}.{f.name}" for f in dataclasses.fields(cls) if type(None) in typing.get_args(hints[f.name])}  # type: ignore[arg-type]
    return out


def nest_flat_names(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`values` with the flat names of the previous release (FLAT_NAMES: `hash_l`, `predict_hubs`) moved into
    their groups, and a deprecation note per name moved. Raises ConfigError when a setting is given both by its
    flat name and its path."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    notes = []
    for name, path in FLAT_NAMES.items():
        if name not in out:
            continue
        group, leaf = path.split(".")
        sub = out.setdefault(group, {})
        if not isinstance(sub, dict):
            continue  # from_dict (or the job schema) names the group at fault
        if leaf in sub:
            raise ConfigError(path, f"given twice, as {path} and by its former name {name}")
        sub[leaf] = out.pop(name)
        notes.append(f"{name} is deprecated and will be refused in a later release; use {path}")
    return out, notes


def upgrade_settings(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`values` in the current form, and a deprecation note per old form replaced, in the order of the settings:
    flat names moved to their group (`nest_flat_names`), the old numbers of LEGACY replaced by what they mean now,
    and "auto" (which a TOML file writes for null) made null. Raises ConfigError when a setting is given both by
    its flat name and its path."""
    out, notes = nest_flat_names(values)
    for path in setting_paths():
        if path not in NULLABLE and path not in LEGACY:
            continue
        group, _, leaf = path.rpartition(".")
        holder = out.get(group) if group else out
        if not isinstance(holder, dict) or leaf not in holder:
            continue
        value = holder[leaf]
        if value == "auto" and path in NULLABLE:
            holder[leaf] = None
        elif path in LEGACY and isinstance(value, int) and not isinstance(value, bool) and value in LEGACY[path]:
            new = LEGACY[path][value]
            holder[leaf] = new
            shown = "null (auto)" if new is None else f'"{new}"'
            notes.append(f"{path}: {value} is deprecated and will be refused in a later release; use {shown}")
    return out, notes


class ConfigError(ValueError):
    """A setting is out of range or unknown; `field` names its path (`sampling.hash_l`)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def check_setting(path: str, value: Any) -> None:
    """Raise ConfigError unless `value` is in the range of the numeric setting at `path` (BOUNDS), or null (auto)
    where it takes null, or its word where it takes one."""
    if (value is None and path in NULLABLE) or (path in WORDS and value == WORDS[path]):
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and BOUNDS[path].contains(value)
    _check(ok, path, f"must be in {BOUNDS[path]}; got {value!r}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


_CHOICES: dict[str, tuple[str, ...]] = {
    "sampling.hash_family": typing.get_args(HashFamily),
    "sampling.insertion": typing.get_args(Insertion),
    "optimizer.moment_dtype": typing.get_args(MomentDtype),
    "model.weight_dtype": typing.get_args(WeightDtype),
    "model.output_init": typing.get_args(OutputInit),
    "model.loss": typing.get_args(Loss),
}

NULLABLE: set[str] = _nullable()
"""Paths of the settings that take null (auto)."""


__all__ = [
    "DENSE_OUTPUT_MAX_LABELS",
    "DENSE_HIDDEN",
    "SlideConfig",
    "ModelConfig",
    "SamplingConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "PredictConfig",
    "GROUPS",
    "RUN_SETTINGS",
    "FLAT_NAMES",
    "NULLABLE",
    "ConfigError",
    "BOUNDS",
    "Bounds",
    "LEGACY",
    "WORDS",
    "upgrade_settings",
    "nest_flat_names",
    "check_setting",
    "setting",
    "with_settings",
    "merge_settings",
    "setting_paths",
    "MAX_HIDDEN_LAYERS",
    "HashFamily",
    "Insertion",
    "MomentDtype",
    "WeightDtype",
    "OutputInit",
    "Loss",
    "CENTROID_INIT_MAX_LABELS",
]
