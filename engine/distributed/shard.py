"""One label shard of a sharded model: the replicated hidden layers plus a slice of the output layer.

A `ShardTrainer` is a Trainer over a model whose output layer holds labels [lo, hi) only (its rows, biases,
Adam state, hash tables and rehash schedule). Its step is the single-process `Trainer.train_step` cut at
the two points where the softmax needs the other shards (see engine.distributed.kernels):

    forward(points)   -> each point's largest local logit         (the caller takes the max over shards)
    exps(max)         -> each point's local sum of exponentials    (the caller adds them over shards)
    update(sum)       -> losses and the gradient at the output layer's inputs (the caller adds them), after
                         updating this shard's output rows
    backward(grad)    -> the hidden and input layers' update from the summed gradient: every shard applies
                         the same update, so the replicas stay bit-identical

Nothing here needs Ray: engine.distributed.trainer runs shards as Ray actors, and tests may run them in
one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numba
import numpy as np

from .. import lsh, tables
from .._numba import scratch_rows
from ..adam import LazyAdamState
from ..config import ConfigError, SlideConfig
from ..kernels.forward import backward_batch
from ..kernels.groups import Batch
from ..kernels.hashing import mix3
from ..network import _INIT_ROWS, SlideModel, layer_slots, layer_widths, weight_storage
from ..resolve import concrete, samples_output
from ..snapshot import FORMAT_VERSION, MANIFEST, _file_crc32, model_arrays, model_from_arrays
from ..sparse import Dataset, normalize_rows
from ..trainer import _MODEL_ARRAY, TRAINING_ARRAYS, Trainer
from .kernels import dense_output_grads, shard_deltas_batch, shard_exps_batch, shard_forward_batch

SHARD_DIR = "shard-{:03d}"
"""Directory of shard p's arrays inside a sharded snapshot version."""


def label_ranges(num_labels: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous label slices [lo, hi) of near-equal size, one per shard."""
    if not 1 <= shards <= num_labels:
        raise ValueError(f"shards must be in [1, {num_labels}] (the number of labels), got {shards}")
    bounds = np.linspace(0, num_labels, shards + 1).round().astype(np.int64)
    return [(int(bounds[p]), int(bounds[p + 1])) for p in range(shards)]


def shard_config(config: SlideConfig, num_labels: int) -> SlideConfig:
    """A shard's config: whether the output layer is sampled, and the hidden widths, are decided by the whole
    layer's width (auto would look at the shard's slice); the other auto settings follow the shard's own width.
    Shards start from random output rows (model.output_init "random"): the centroids are not computed across
    shards. They train the softmax, normalised across shards (engine.distributed.kernels): model.loss "sigmoid"
    is refused."""
    if config.model.loss == "sigmoid":
        raise ConfigError("model.loss", "label-sharded training trains the softmax; use null or softmax")
    shaped = concrete(config, num_labels)
    model = shaped.model.replace(sample_output=samples_output(config, num_labels), output_init="random", loss="softmax")
    return shaped.replace(model=model)


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard p's sampling (random negatives, padding): shard 0 keeps the run's seed."""
    return int(seed) if shard == 0 else int(mix3(np.uint64(seed), np.uint64(0x5A4D), np.uint64(shard))) >> 1


def initialize_shard(config: SlideConfig, num_features: int, num_labels: int, lo: int, hi: int) -> SlideModel:
    """Shard [lo, hi) of `SlideModel.initialize(config, num_features, num_labels)`: the same random draws in
    the same order (the output layer's rows outside the slice are drawn and dropped a block at a time), so
    one shard over all labels is that model exactly. Hash functions and tables are the shard's own."""
    cfg = shard_config(config, num_labels)
    rng = np.random.default_rng(config.seed)
    widths = layer_widths(config, num_features, num_labels)
    dtype = weight_storage(config)
    depth = len(widths) - 1
    weights = []
    for layer in range(depth):
        rows, cols = widths[layer + 1], widths[layer] + (layer > 0)
        if layer == 0:
            rows, cols = num_features, widths[1]
        keep = (lo, hi) if layer == depth - 1 else (0, rows)
        weights.append(_random_rows(rng, rows, cols, config.model.init_std, dtype, layer > 0, keep))
    local = hi - lo
    slots = layer_slots(cfg, local)
    sampled = [int(layer) for layer in np.flatnonzero(slots >= 0)]
    local_widths = [*widths[:-1], local]
    hashes = [lsh.draw_hash_functions(cfg, local_widths[layer], local_widths[layer + 1], rng) for layer in sampled]
    tabs = [
        tables.empty_tables(
            hf.n_tables,
            local_widths[layer + 1],
            hf.num_buckets,
            local_widths[layer],
            lsh.resolve_hubs(cfg, local_widths[layer + 1]),
            lsh.resolve_serve_hubs(cfg, local_widths[layer + 1]),
        )
        for layer, hf in zip(sampled, hashes, strict=True)
    ]
    model = SlideModel(cfg, num_features, local, tuple(weights), np.zeros(widths[1], np.float32), hashes, tabs)
    for layer in sampled:
        model.rehash_layer(layer, round_id=0)
    return model


def _random_rows(rng, rows: int, cols: int, std: float, dtype, bias: bool, keep: tuple[int, int]) -> np.ndarray:
    """Rows keep[0]:keep[1] of network._random_layer(rng, rows, cols, ...), drawing all of them."""
    from ..kernels.optimizer import to_bfloat16

    lo, hi = keep
    w: np.ndarray = np.empty((hi - lo, cols), dtype=dtype)
    for start in range(0, rows, _INIT_ROWS):
        stop = min(rows, start + _INIT_ROWS)
        block = rng.standard_normal((stop - start, cols), dtype=np.float32)
        a, b = max(start, lo), min(stop, hi)
        if a >= b:
            continue
        block = block[a - start : b - start]
        block *= np.float32(std)
        if bias:
            block[:, -1] = 0.0
        w[a - lo : b - lo] = to_bfloat16(block) if dtype == np.uint16 else block
    return w


class ShardTrainer(Trainer):
    """The training state of labels [lo, hi) of a model over `train` (see the module docstring)."""

    def __init__(
        self,
        config: SlideConfig,
        train: Dataset,
        shard: int,
        shards: int,
        model: SlideModel | None = None,
        optimizer: LazyAdamState | None = None,
    ):
        self.shard, self.shards = int(shard), int(shards)
        self.lo, self.hi = label_ranges(train.num_labels, shards)[shard]
        self.global_labels = int(train.num_labels)
        if model is None:
            model = initialize_shard(config, train.num_features, train.num_labels, self.lo, self.hi)
        # the shard's view of the data counts its own labels; forward() maps the global label ids to them
        local = dataclasses.replace(train, num_labels=self.hi - self.lo)
        super().__init__(shard_config(config, train.num_labels), local, None, None, model=model, optimizer=optimizer)
        self.run_config = config
        self._seed = shard_seed(config.seed, shard)
        self._pending: dict[str, Any] | None = None

    # ---- one step in four stages ---------------------------------------------------------------
    def forward(self, points: np.ndarray, lr: float) -> np.ndarray:
        """Stage 1: the batch's hidden layers and this shard's output logits; float64 (b,) local maxima."""
        cfg, model = self.config, self.model
        points = np.ascontiguousarray(points, dtype=np.int64)
        b = points.shape[0]
        if not 1 <= b <= cfg.optimizer.batch_size:
            raise ValueError(f"a batch holds 1 to batch_size={cfg.optimizer.batch_size} points, got {b}")
        bufs = self._buffers(cfg.optimizer.batch_size)
        act = bufs.first(b)
        hid, act_ids, act_val = act.hid, act.act_ids, act.act_val
        nact, nkept, delta0 = act.nact, act.nkept, act.delta0
        data = self._train_rows.take(points)
        if cfg.model.normalize_input:
            data = normalize_rows(data)
        y = np.asarray(data.y_indices)
        mine = (y >= self.lo) & (y < self.hi)
        row = np.repeat(np.arange(b), np.diff(data.y_indptr))
        y_indptr = np.zeros(b + 1, np.int64)
        np.cumsum(np.bincount(row[mine], minlength=b), out=y_indptr[1:])
        y_indices = np.ascontiguousarray(y[mine] - self.lo, dtype=np.int32)
        self._lr = float(lr)
        n_chunks = max(1, min(b, numba.get_num_threads()))
        out = model.depth - 1
        flags = self._label_flags[:b]
        tops = np.empty(b, np.float64)
        shard_forward_batch(
            np.arange(b, dtype=np.int64),
            self.samples_seen,
            Batch(data.x_indptr, data.x_indices, data.x_values, y_indptr, y_indices),
            model.kernel_layers(),
            model.kernel_tables(),
            *self._retrieval_and_sampling(self._seed),
            act,
            bufs.lookup,
            n_chunks,
            flags,
            tops,
        )
        self._pending = dict(
            b=b,
            points=points,
            data=data,
            y_indptr=y_indptr,
            y_indices=y_indices,
            n_labels=np.diff(data.y_indptr).astype(np.int64),
            hid=hid,
            act_ids=act_ids,
            act_val=act_val,
            nact=nact,
            nkept=nkept,
            delta0=delta0,
            act=act,
            n_chunks=n_chunks,
            out=out,
        )
        return tops

    def exps(self, tops: np.ndarray) -> np.ndarray:
        """Stage 2: exp(logit - max over all shards); float64 (b,) local sums."""
        st = self._require("forward")
        sums = np.empty(st["b"], np.float64)
        out = st["out"]
        shard_exps_batch(st["act_val"][out - 1], st["nact"][:, out], np.ascontiguousarray(tops, np.float64), sums)
        return sums

    def update(self, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Stage 3: deltas from the sum over all shards, and this shard's output rows' Adam step. Returns the
        losses of this shard's labels float64 (b,), the gradient at the output layer's inputs float32 (b, in)
        and the mean output active set size."""
        st = self._require("forward")
        model = self.model
        b, out = st["b"], st["out"]
        act_ids, act_val, nact, hid = st["act_ids"], st["act_val"], st["nact"], st["hid"]
        bufs = self._bufs
        losses = np.empty(b, np.float64)
        sampled = bool(model.layer_slot[out] >= 0)
        shard_deltas_batch(
            st["y_indptr"],
            st["y_indices"],
            st["n_labels"],
            np.ascontiguousarray(totals, np.float64),
            self._label_flags[:b],
            act_val[out - 1],
            nact[:, out],
            st["nkept"],
            sampled,
            self._hard_negatives,
            bufs.lookup.counts,
            st["n_chunks"],
            losses,
        )
        width = model.weights[out].shape[1] - 1
        if self._fused_output:
            # the fused update's partial sums, added over chunks in order as backward_batch would
            grad_inputs = scratch_rows(self._grad_inputs, b)
            grad_inputs[:] = 0.0
            self._update_layer(out, act_ids, act_val, nact, hid, grad_inputs)
            grads = np.zeros((b, width), np.float32)
            for part in grad_inputs:
                grads += part
        else:
            grads = np.empty((b, width), np.float32)
            dense_output_grads(model.weights[out], act_val[out - 1], nact[:, out], grads)
            self._update_layer(out, act_ids, act_val, nact, hid, self._grad_inputs[:0])
        st["stage"] = "update"
        return losses, grads, float(nact[:, out].mean())

    def backward(self, grads: np.ndarray) -> tuple[int, int]:
        """Stage 4: the hidden and input layers' update from the gradient at the output layer's inputs summed
        over all shards; then the step counters and the rehash schedule. Returns (rehash_round,
        next_rehash_step)."""
        st = self._require("update")
        model = self.model
        b, out = st["b"], st["out"]
        act_ids, act_val, nact, hid, delta0 = st["act_ids"], st["act_val"], st["nact"], st["hid"], st["delta0"]
        bufs = self._bufs
        grads = np.ascontiguousarray(grads, np.float32).reshape(1, b, -1)
        backward_batch(grads, st["n_chunks"], model.kernel_layers(), st["act"], bufs.back, self._kept_scale)
        for layer in range(1, out):
            self._update_layer(layer, act_ids, act_val, nact, hid, self._grad_inputs[:0])
        self._update_input_layer(st["data"], np.arange(b, dtype=np.int64), delta0, hid)
        self.step += 1
        self.samples_seen += b
        self._pending = None
        if self.step >= self.next_rehash_step:
            self.rehash()
        return self.rehash_round, self.next_rehash_step

    def _require(self, stage: str) -> dict:
        st = self._pending
        if st is None or st.get("stage", "forward") != stage:
            raise RuntimeError(f"shard {self.shard}: a step's stages must run in order (expected after {stage})")
        return st

    def _buffers(self, batch: int):
        bufs = super()._buffers(batch)
        cap = bufs.act.act_val[-1].shape[1]
        if getattr(self, "_label_flags", np.zeros((0, 0))).shape != (batch, cap):
            self._label_flags = np.zeros((batch, cap), np.uint8)
        return bufs

    # ---- serving from the shard ----------------------------------------------------------------
    def serving_model(self, best: bool) -> SlideModel:
        """The model this shard serves: its slice of the best model so far (best) or the training state."""
        return self.best_model() if best else self.model

    def set_best(self, best: dict | None, keep: bool) -> None:
        """Take the driver's record of the best validation score; keep: copy this shard's current model."""
        self.best = best
        if keep:
            self._keep_best()

    def sync(self, lr_decays: int, evals_since_best: int, early_stopped: bool, dropout_raises: int) -> None:
        """Take the driver's schedule: its step-size decays, early-stopping count and hidden dropout step."""
        self.lr_decays, self.evals_since_best, self.early_stopped = lr_decays, evals_since_best, early_stopped
        self.dropout_raises = dropout_raises

    def restore_best(self) -> None:
        """Continue training from this shard's slice of the best model (the driver raised hidden dropout)."""
        self._restore_best()

    # ---- snapshots -----------------------------------------------------------------------------
    def write(self, directory: str | os.PathLike) -> dict:
        """Write this shard's slice (as Trainer.publish would: the served arrays, and the training state as
        `opt_cur_*` when it differs) into `directory` with its own manifest; returns the shard's entry for
        the version's manifest."""
        self.refresh_serving_hubs()
        arrays = self.arrays()
        prefix = None
        serving = self.model.serving_report
        if self._serves_best():
            assert self._best_arrays is not None
            current = {name: arrays.pop(name) for name in model_arrays(self.model)}
            arrays.update({TRAINING_ARRAYS + name: a for name, a in current.items()})
            arrays.update(self._best_arrays)
            prefix = TRAINING_ARRAYS
            serving = self._best_serving
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, arr in arrays.items():
            path = d / f"{name}.npy"
            np.save(path, np.ascontiguousarray(arr))
            files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": _file_crc32(path)}
        entry = {
            "shard": self.shard,
            "lo": self.lo,
            "hi": self.hi,
            "dir": d.name,
            "training_arrays": prefix,
            "serving": serving,
            "rehash_round": self.rehash_round,
            "next_rehash_step": self.next_rehash_step,
        }
        manifest = {"format_version": FORMAT_VERSION, **entry, "arrays": files}
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in d.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        return entry

    @classmethod
    def from_snapshot(
        cls, config: SlideConfig, train: Dataset, shard: int, shards: int, directory: str | os.PathLike, state: dict
    ) -> ShardTrainer:
        """A shard continuing from its slice in a sharded snapshot version; state: the version's trainer_state."""
        from ..snapshot import load_arrays, read_manifest

        d = Path(directory)
        entry = read_manifest(d)
        lo, hi = label_ranges(train.num_labels, shards)[shard]
        if (entry["lo"], entry["hi"]) != (lo, hi):
            raise ValueError(
                f"{d} holds labels [{entry['lo']}, {entry['hi']}), shard {shard} of {shards} owns [{lo}, {hi})"
            )
        arrays = load_arrays(d, mmap=False, verify=True)
        served = None
        prefix = entry.get("training_arrays")
        if prefix:
            served = {name: arrays.pop(name) for name in list(arrays) if _MODEL_ARRAY.match(name)}
            arrays.update({name[len(prefix) :]: arrays.pop(name) for name in list(arrays) if name.startswith(prefix)})
        cfg = shard_config(config, train.num_labels)
        model = model_from_arrays(cfg, train.num_features, hi - lo, arrays)
        trainer = cls(config, train, shard, shards, model=model, optimizer=LazyAdamState.from_arrays(arrays))
        trainer.best = state.get("best")
        trainer.evals_since_best = int(state.get("evals_since_best", 0))
        trainer.lr_decays = int(state.get("lr_decays", 0))
        trainer.dropout_raises = min(int(state.get("dropout_raises", 0)), len(trainer._dropout_rates) - 1)
        trainer.early_stopped = bool(state.get("early_stopped", False))
        if served is not None:
            trainer._best_arrays, trainer._best_serving = served, dict(entry.get("serving", {}))
        elif trainer.best is not None:
            model.serving_report = dict(entry.get("serving", {}))
            trainer._keep_best()
        for key in ("step", "epoch", "batch_in_epoch", "samples_seen"):
            setattr(trainer, key, int(state[key]))
        trainer.rehash_round = int(entry["rehash_round"])
        trainer.next_rehash_step = int(entry["next_rehash_step"])
        return trainer


__all__ = ["ShardTrainer", "initialize_shard", "label_ranges", "shard_config", "shard_seed", "SHARD_DIR"]
