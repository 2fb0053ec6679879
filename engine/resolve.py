"""The one place where a config's auto settings become concrete values for a data shape.

`resolve(config, num_features, num_labels, num_points)` turns every auto (and every special value) into
the number the engine uses, per layer where a setting is per layer: which layers are LSH-sampled, their K,
L and bucket geometry, retrieval caps, hubs and negatives, and the run's validation split and warm-up.
The model, the trainer and the memory estimate all read it, and it is what `slide train` prints first, what a
snapshot's manifest records (`resolved`) and what `GET /v1/models/{id}` returns. The maths behind the
hashing choices lives in lsh.py and the schedule's in schedule.py; this module only decides and records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from . import lsh, schedule
from .config import (
    CENTROID_INIT_MAX_LABELS,
    DENSE_HIDDEN,
    DENSE_OUTPUT_MAX_LABELS,
    NARROW_HIDDEN,
    WIDE_HIDDEN,
    WIDE_HIDDEN_MAX_LABELS,
    ConfigError,
    SlideConfig,
)


@dataclass(frozen=True)
class LayerPlan:
    """A weight layer >= 1 as the engine runs it. The hashing fields are 0 for a dense layer, and the
    negatives 0 for a hidden layer. Counts of 0 mean none (max_active, predict_max_active: no cap)."""

    layer: int
    neurons: int
    inputs: int
    sampled: bool
    hash_k: int = 0
    hash_l: int = 0
    buckets: int = 0
    max_active: int = 0
    predict_max_active: int = 0
    hub_neurons: int = 0
    predict_hubs: int = 0
    hard_negatives: int = 0
    random_negatives: int = 0


@dataclass(frozen=True)
class Resolved:
    """Concrete values for one config and data shape (see the module doc). train_points, val_points,
    steps_per_epoch, lr_warmup_steps and hidden_dropout are None when the number of training points is not known.
    hidden_dropout: the rates training may use, in the order it raises them (schedule.dropout_rates): one for a
    fixed rate, several for auto.
    shard_labels: the labels of each shard of a label-sharded run (engine.distributed), whose `layers` are
    shard 0's; None for a single process."""

    sample_output: bool
    hidden: tuple[int, ...]
    output_init: str
    loss: str
    probes: int
    predict_probes: int
    layers: tuple[LayerPlan, ...]
    train_points: int | None = None
    val_points: int | None = None
    steps_per_epoch: int | None = None
    lr_warmup_steps: int | None = None
    hidden_dropout: tuple[float, ...] | None = None
    shard_labels: tuple[int, ...] | None = None

    @property
    def output(self) -> LayerPlan:
        return self.layers[-1]

    def sampled_layers(self) -> list[int]:
        return [p.layer for p in self.layers if p.sampled]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the run's values, then `layers` keyed by layer number (and for a sharded run `shards` and
        `shard_labels`)."""
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["hidden_dropout"] = None if self.hidden_dropout is None else list(self.hidden_dropout)
        d["layers"] = {str(p.layer): {k: v for k, v in asdict(p).items() if k != "layer"} for p in self.layers}
        if self.shard_labels is None:
            del d["shard_labels"]
        else:
            d["shards"] = len(self.shard_labels)
        return d


def samples_output(config: SlideConfig, num_labels: int) -> bool:
    """Whether the output layer is LSH-sampled: as configured, or (None = auto) when it is wider than
    DENSE_OUTPUT_MAX_LABELS."""
    if config.model.sample_output is None:
        return int(num_labels) > DENSE_OUTPUT_MAX_LABELS
    return bool(config.model.sample_output)


def hidden_widths(config: SlideConfig, num_labels: int) -> tuple[int, ...]:
    """The hidden layers' widths: as configured, or (None = auto) one layer of WIDE_HIDDEN neurons when the output
    layer is sampled and has at most WIDE_HIDDEN_MAX_LABELS labels, of DENSE_HIDDEN when it is dense and has at most
    DENSE_OUTPUT_MAX_LABELS, else of NARROW_HIDDEN (config.model.hidden)."""
    if config.model.hidden is not None:
        return tuple(config.model.hidden)
    n = int(num_labels)
    if samples_output(config, n):
        return (WIDE_HIDDEN if n <= WIDE_HIDDEN_MAX_LABELS else NARROW_HIDDEN,)
    return (DENSE_HIDDEN if n <= DENSE_OUTPUT_MAX_LABELS else NARROW_HIDDEN,)


def output_init(config: SlideConfig, num_labels: int) -> str:
    """How a new model's output rows start: as configured, or (None = auto) "centroids" for an output layer of up to
    CENTROID_INIT_MAX_LABELS labels, else "random" (config.model.output_init)."""
    if config.model.output_init is not None:
        return config.model.output_init
    return "centroids" if int(num_labels) <= CENTROID_INIT_MAX_LABELS else "random"


def output_loss(config: SlideConfig, num_labels: int) -> str:
    """The output layer's training loss: as configured, or (None = auto) "sigmoid" for an output layer of up to
    20,000 labels and "softmax" for a wide one (lsh.is_wide_layer), whose hubs and random negatives estimate the
    full softmax (config.model.loss)."""
    if config.model.loss is not None:
        return config.model.loss
    return "softmax" if lsh.is_wide_layer(int(num_labels)) else "sigmoid"


def concrete(config: SlideConfig, num_labels: int) -> SlideConfig:
    """The config with its structure settings made concrete for this many labels (hidden and loss = None
    resolved), so a model built from it, and its snapshot, keep their shape and objective whatever a later auto
    rule says."""
    return config.replace(
        model=config.model.replace(hidden=hidden_widths(config, num_labels), loss=output_loss(config, num_labels))
    )


def resolve(config: SlideConfig, num_features: int, num_labels: int, num_points: int | None = None) -> Resolved:
    """The concrete values of `config` for data of this shape (num_points: training points, if known).

    Raises ConfigError when a setting cannot hold for this shape (active_threshold above a layer's tables)."""
    hidden = hidden_widths(config, num_labels)
    widths = [int(num_features), *hidden, int(num_labels)]
    out = len(widths) - 2  # the output layer's index: W[l] maps widths[l] inputs to widths[l + 1] neurons
    sample_out = samples_output(config, num_labels)
    layers = []
    for layer in range(1, out + 1):
        neurons, inputs = widths[layer + 1], widths[layer]
        is_output = layer == out
        sampled = sample_out if is_output else config.model.sample_hidden
        if not sampled:
            layers.append(LayerPlan(layer, neurons, inputs, False))
            continue
        k, n_tables = lsh.resolve_k(config, neurons), lsh.resolve_l(config, neurons)
        if config.sampling.active_threshold > n_tables:
            raise ConfigError(
                "sampling.active_threshold",
                f"must be at most the tables of every sampled layer; layer {layer} ({neurons:,} neurons) has "
                f"{n_tables} (sampling.hash_l), got {config.sampling.active_threshold}",
            )
        layers.append(
            LayerPlan(
                layer,
                neurons,
                inputs,
                True,
                hash_k=k,
                hash_l=n_tables,
                buckets=lsh.table_geometry(config, k)[1],
                max_active=lsh.resolve_max_active(config, neurons),
                predict_max_active=lsh.resolve_max_active(config, neurons, predict=True),
                hub_neurons=lsh.resolve_hubs(config, neurons),
                predict_hubs=lsh.resolve_serve_hubs(config, neurons),
                hard_negatives=lsh.resolve_hard_negatives(config, neurons) if is_output else 0,
                random_negatives=lsh.resolve_random_negatives(config, neurons) if is_output else 0,
            )
        )
    plan = Resolved(
        sample_output=sample_out,
        hidden=hidden,
        output_init=output_init(config, num_labels),
        loss=output_loss(config, num_labels),
        probes=config.sampling.probes,
        predict_probes=config.sampling.probes if config.predict.probes is None else config.predict.probes,
        layers=tuple(layers),
    )
    if num_points is None:
        return plan
    val = schedule.validation_size(config, int(num_points))
    train = int(num_points) - val
    steps = -(-train // config.optimizer.batch_size)
    return replace(
        plan,
        train_points=train,
        val_points=val,
        steps_per_epoch=steps,
        lr_warmup_steps=schedule.warmup_steps(config, steps),
        hidden_dropout=schedule.dropout_rates(config, val),
    )
