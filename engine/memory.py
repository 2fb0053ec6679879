"""How much memory a training run needs: a function of the config and the dataset's shape, no arrays allocated.

`estimate_memory` adds up the arrays a `Trainer` holds (weights, Adam's moments and step counts, hash tables,
step buffers, data read buffers, evaluation scratch), the largest short-lived allocation on top of them, and the
resident size of a trainer process before any of it (interpreter, numpy, Numba and its compiled kernels). The
auto settings are resolved by the engine's own resolver (`engine.resolve`), so the estimate follows them.
`serving` is separate: the published snapshot's model arrays (weights and tables), which
a service maps to answer predictions while the job trains.

The estimate is checked against the measured peak resident size of trainer processes (tests/engine/test_memory.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .centroids import CENTROID_CHUNK, CENTROID_WRITE_ROWS
from .config import SlideConfig
from .network import layer_widths, slots_of
from .resolve import output_init, resolve

BASELINE_BYTES = 185 * 2**20
"""Resident size of a trainer process before its model: Python, numpy, Numba, llvmlite and the compiled kernels
loaded from Numba's cache (a service trainer also holds SQLAlchemy: ~20 MB more than `slide train`)."""
THREAD_BYTES = 2**20
"""Resident bytes each Numba worker thread adds (its stack's touched pages and bookkeeping)."""

_INIT_ROWS = 1 << 15  # network._INIT_ROWS: rows of a layer drawn at a time when it is initialised
_UPDATE_CHUNKS = 16  # trainer._UPDATE_CHUNKS
_HASH_BLOCK = 64  # lsh._HASH_BLOCK
_HASH_CHUNKS = 256  # chunks of lsh.hash_rows' parallel loop
_MAX_K = 5  # the periodic evaluation asks for the top 5

PART_FIELDS: dict[str, tuple[str, ...]] = {
    "baseline": ("threads",),
    "weights": ("model.hidden", "model.weight_dtype"),
    "optimizer": ("model.hidden", "optimizer.moment_dtype", "model.sample_hidden", "model.sample_output"),
    "tables": (
        "model.hidden",
        "sampling.hash_l",
        "sampling.hash_k",
        "sampling.table_bits",
        "sampling.bin_size",
        "sampling.simhash_density",
        "predict.hubs",
    ),
    "step_buffers": (
        "optimizer.batch_size",
        "model.hidden",
        "sampling.hash_l",
        "sampling.bucket_size",
        "sampling.probes",
        "sampling.hub_neurons",
        "sampling.random_negatives",
        "sampling.min_active",
        "threads",
    ),
    "evaluation": (
        "schedule.eval_points",
        "sampling.hash_l",
        "sampling.bucket_size",
        "predict.probes",
        "predict.hubs",
        "threads",
    ),
    "data": (),
    "validation": ("schedule.val_points", "model.hidden", "model.weight_dtype", "sampling.hash_l", "predict.hubs"),
    "transient": (
        "model.hidden",
        "model.output_init",
        "optimizer.batch_size",
        "sampling.bucket_size",
        "sampling.hash_l",
        "sampling.table_bits",
        "threads",
    ),
}
"""The settings (paths) each part of the estimate grows with (the dataset's shape drives most of them too)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs. `parts` add up to `trainer` (the peak resident size of the process that
    trains); `serving` is the model a service maps to serve the job's snapshots; `total` is both."""

    parts: dict[str, int]
    serving: int
    fields: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(PART_FIELDS))

    @property
    def trainer(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def total(self) -> int:
        return self.trainer + self.serving

    def breakdown(self) -> dict[str, int]:
        """Every part, `serving` included, largest first."""
        parts = {**self.parts, "serving": self.serving}
        return dict(sorted(parts.items(), key=lambda kv: -kv[1]))

    def describe(self) -> str:
        """'2.1 GB (weights 1.0 GB, optimizer 900 MB, ...)': the total and its parts over 1% of it."""
        shown = [
            f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in self.breakdown().items() if v >= self.total / 100
        ]
        return f"{format_bytes(self.total)} ({', '.join(shown)})"


def format_bytes(n: float) -> str:
    """Decimal units, three significant digits: 1.23 GB, 456 MB, 7.89 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def estimate_memory(
    config: SlideConfig,
    num_points: int,
    num_features: int,
    num_labels: int,
    nnz: int = 0,
    label_entries: int = 0,
    max_labels_per_point: int | None = None,
    eval_points: int = 0,
    eval_nnz: int = 0,
    eval_label_entries: int = 0,
    threads: int | None = None,
    spill: bool = False,
) -> MemoryEstimate:
    """The memory a `Trainer` of `config` needs on a training set of this shape (and an evaluation set of
    `eval_points` points, if any), with `threads` Numba threads (None: config.threads, else all cores).

    nnz and label_entries: stored feature values and labels over all training points. max_labels_per_point:
    the most labels one point has (None: four times the average, at least 1). spill: the trainer keeps the best
    model so far in files (it has a snapshot store or a spill_dir, engine.spill), not a copy in memory. Nothing is
    allocated: the service calls this before it admits a job.
    """
    cfg = config
    if threads is None:
        threads = cfg.threads or os.cpu_count() or 1
    t = max(1, int(threads))
    n_points, n_feat, n_lab = int(num_points), int(num_features), int(num_labels)
    widths = layer_widths(cfg, n_feat, n_lab)
    depth = len(widths) - 1  # weight layers, the input layer included
    plan = resolve(cfg, n_feat, n_lab, n_points)
    slots = slots_of(plan)
    by_layer = {p.layer: p for p in plan.layers}
    wbytes = 2 if cfg.model.weight_dtype == "bfloat16" else 4
    if max_labels_per_point is None:
        avg = label_entries / n_points if n_points else 1.0
        max_labels_per_point = max(1, int(np.ceil(4 * avg)))
    max_labels = min(n_lab, int(max_labels_per_point))

    rows = [widths[layer + 1] for layer in range(depth)]  # neurons of each weight layer (W0: one row per feature)
    rows[0] = n_feat
    cols = [widths[1]] + [widths[layer] + 1 for layer in range(1, depth)]  # W[layer>=1] has the bias in its last column
    cells = [rows[layer] * cols[layer] for layer in range(depth)]

    weights = sum(cells) * wbytes + widths[1] * 4  # + b0
    optimizer = 0
    for layer in range(depth):
        compact = cfg.optimizer.moment_dtype == "bfloat16" and slots[layer] >= 0
        optimizer += cells[layer] * ((2 if compact else 4) + 4)  # m, v
        optimizer += rows[layer] * (8 + 4)  # steps int64, drift float32
    optimizer += widths[1] * 8  # mb0, vb0

    sampled = [layer for layer in range(depth) if slots[layer] >= 0]
    tables = 0
    layer_l, layer_cap, layer_codes, hubs_of, serve_hubs_of = {}, {}, {}, {}, {}
    for layer in sampled:
        lp = by_layer[layer]
        n, dim = lp.neurons, lp.inputs
        k, n_tables, n_buckets = lp.hash_k, lp.hash_l, lp.buckets
        per_code = (
            max(1, int(round(cfg.sampling.simhash_density * dim)))
            if cfg.sampling.hash_family == "simhash"
            else cfg.sampling.bin_size
        )
        hubs, serve_hubs = min(n, lp.hub_neurons), min(n, lp.predict_hubs)
        tables += 2 * n_tables * n * 4  # codes, ids
        tables += n * 4 + n_tables * (n_buckets + 1) * 8  # inserted, offsets
        tables += dim * (4 + 4) + (hubs + serve_hubs) * 4  # center, query_center, hubs
        tables += k * n_tables * per_code * (4 + 4) + 8 * 8  # hash functions: idx, sign, params
        optimizer += dim * 8  # the trainer's running input mean
        layer_l[layer], layer_codes[layer], hubs_of[layer], serve_hubs_of[layer] = (
            n_tables,
            k * n_tables,
            hubs,
            serve_hubs,
        )
        extra = lp.random_negatives
        layer_cap[layer] = min(
            n,
            n_tables * (1 + cfg.sampling.probes) * cfg.sampling.bucket_size
            + hubs
            + max_labels
            + cfg.sampling.min_active
            + extra,
        )
    serving = weights + tables + depth  # + serve_tables, one byte a layer

    # Step buffers (Trainer._buffers), allocated for a full batch.
    b = cfg.optimizer.batch_size
    caps = [layer_cap.get(layer, widths[layer + 1]) for layer in range(1, depth)]
    step = sum(b * widths[layer] * 4 for layer in range(1, depth))  # hid
    step += sum(
        b * (c * 4 + (c * 4 if layer in layer_cap else 4)) for layer, c in zip(range(1, depth), caps, strict=True)
    )  # act_val, ids
    step += b * (depth * 4 + widths[1] * 4 + 4 + 4)  # nact, delta0, losses, nkept
    n_max = max([widths[layer + 1] for layer in sampled] or [1])
    n_codes = max(layer_codes.values() or [1])
    width_max = max(widths[1:-1])
    id_cap = max(layer_cap.values() or [1])  # act_ids of a dense layer are a (b, 1) placeholder
    step += t * (
        n_max * 8 + id_cap * 4 + 8 + n_codes * 12 + max(layer_l.values() or [1]) * (1 + cfg.sampling.probes) * 4
    )
    step += t * width_max * 8  # gin, gprev
    step += sum(rows) * 4  # group_of_row
    fused = (depth - 1) in layer_cap
    step += max(_UPDATE_CHUNKS, t) * b * widths[-2] * 4 if fused else 0  # grad_inputs

    # Data read buffers: the row readers keep both indptr arrays in memory; one epoch's order; labelled flags.
    data = (n_points + 1) * 16 + n_points * (8 + 1) + n_points * 8  # + the training rows (validation_split)
    evaluation = 0
    if eval_points:
        data += (eval_points + 1) * 16
        used = eval_points if not cfg.schedule.eval_points else min(eval_points, cfg.schedule.eval_points)
        share = used / eval_points
        evaluation += used * 8 + int(share * (eval_nnz * 8 + eval_label_entries * 4)) + used * 16  # rows, batch
        evaluation += used * _MAX_K * 8  # top-k out
        pp = plan.predict_probes
        serve_cap = max(
            [
                min(
                    widths[layer + 1],
                    layer_l[layer] * (1 + pp) * cfg.sampling.bucket_size + max(hubs_of[layer], serve_hubs_of[layer]),
                )
                for layer in sampled
            ]
            or [1]
        )
        evaluation += t * (sum(widths[1:-1]) * 4 + serve_cap * 8 + n_max * 8 + n_codes * 12)
        evaluation += t * max(layer_l.values() or [1]) * (1 + pp) * 4

    # The validation split (schedule.validation_split): its rows in memory, and the copy of the best model so far
    # (in files when the trainer spills).
    n_val = plan.val_points or 0
    validation = 0
    if n_val:
        share = n_val / n_points
        validation += (n_val + 1) * 16 + int(share * (nnz * 8 + label_entries * 4))  # the rows' copy
        validation += 0 if spill else serving

    # The largest short-lived allocation: a layer drawn a block of rows at a time at initialisation (float32,
    # and its bfloat16 rounding), a rebuild's per-table counting sort, the optimizer's grouping of a batch, and
    # re-picking the hubs (scores, norms, an argpartition).
    init = max(min(rows[layer], _INIT_ROWS) * cols[layer] * (4 + (2 if wbytes == 2 else 0)) for layer in range(depth))
    rebuild = 0
    for layer in sampled:
        n, dim, n_buckets = by_layer[layer].neurons, by_layer[layer].inputs, by_layer[layer].buckets
        per_table = (n_buckets + 1) * 8 * 3 + n * 4
        hashing = min(_HASH_CHUNKS, t) * (dim * _HASH_BLOCK * 4 + layer_codes[layer] * _HASH_BLOCK * 4) + n * 8
        rebuild = max(rebuild, min(t, layer_l[layer]) * per_table + hashing, n * (4 + 4 + 8 + 8))
    # the optimizer groups the batch's (point, active neuron) pairs by neuron: at most the retrieval cap per point
    per_point = [
        min(
            layer_cap[layer],
            (by_layer[layer].max_active or layer_cap[layer])
            + layer_cap[layer]
            - layer_l[layer] * (1 + cfg.sampling.probes) * cfg.sampling.bucket_size,
        )
        for layer in sampled
    ]
    pairs = b * max(per_point or [max(caps)]) + (nnz / n_points * b if n_points else 0)
    # starting the output rows at the labels' centroids (engine.centroids): a float32 sum per label and hidden unit,
    # a chunk of points' activations and their rows, a block of rows converted
    centroids = 0
    if output_init(cfg, n_lab) == "centroids":
        h_last = widths[-2]
        chunk = min(n_points, CENTROID_CHUNK)
        centroids = n_lab * (h_last * 4 + 8 + 8) + chunk * h_last * 4 + CENTROID_WRITE_ROWS * h_last * 8
        centroids += int(chunk / n_points * (nnz * 8 + label_entries * 4)) if n_points else 0
    transient = max(init - step, centroids - step, rebuild, int(pairs * 64))  # no step buffers yet at init

    parts = {
        "baseline": BASELINE_BYTES + t * THREAD_BYTES,
        "weights": int(weights),
        "optimizer": int(optimizer),
        "tables": int(tables),
        "step_buffers": int(step),
        "evaluation": int(evaluation),
        "data": int(data),
        "validation": int(validation),
        "transient": int(max(0, transient)),
    }
    return MemoryEstimate(parts=parts, serving=int(serving))


def estimate_for(
    config: SlideConfig, train, test=None, threads: int | None = None, spill: bool = False
) -> MemoryEstimate:
    """`estimate_memory` for a training `Dataset` (and an evaluation one)."""
    y = np.asarray(train.y_indptr)
    return estimate_memory(
        config,
        train.num_points,
        train.num_features,
        train.num_labels,
        nnz=train.nnz,
        label_entries=int(y[-1]) if len(y) else 0,
        max_labels_per_point=int(np.diff(y).max(initial=0)) if len(y) > 1 else 0,
        eval_points=test.num_points if test is not None else 0,
        eval_nnz=test.nnz if test is not None else 0,
        eval_label_entries=int(test.y_indptr[-1]) if test is not None and test.num_points else 0,
        threads=threads,
        spill=spill,
    )


__all__ = ["BASELINE_BYTES", "MemoryEstimate", "PART_FIELDS", "estimate_for", "estimate_memory", "format_bytes"]
