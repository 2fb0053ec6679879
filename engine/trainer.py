"""Training loop: epochs of HOGWILD-free parallel batches, the rehash schedule, evaluation, snapshots.

A `Trainer` owns a model, its lazy-Adam state and the batch buffers. `run()` trains until the
configured epochs are done or `should_stop()` turns true, reporting metrics and publishing snapshots
(which double as checkpoints: `Trainer.resume(store, ...)` continues from the newest one with the
same step counter, data order and schedule).

Model selection uses a validation split held out of the training set (`schedule.validation_split`):
after each evaluation the model with the best validation P@1 so far is kept, every snapshot serves it
(its arrays are the snapshot's model; the state training continues from rides along as `opt_cur_*`
arrays when it differs), training stops after `early_stop_patience` evaluations without progress
(schedule.is_progress), and when `run()` returns `trainer.model` is the best model. The test set is only
reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numba
import numpy as np

from . import labels, schedule
from ._numba import scratch_rows, set_threads
from .adam import LazyAdamState
from .centroids import init_output_from_centroids
from .config import SlideConfig
from .kernels.forward import backward_batch, train_batch
from .kernels.groups import Activations, Backprop, Batch, Lookup, Retrieval, Sampling
from .kernels.optimizer import (
    group_by_feature,
    group_by_row,
    update_dense_layer,
    update_input_bias,
    update_input_layer,
    update_sampled_layer,
)
from .metrics import precision_at_k
from .network import PredictMode, SlideModel
from .progress import TrainingMetrics
from .resolve import Resolved, concrete, output_init, resolve
from .snapshot import (
    SnapshotError,
    SnapshotStore,
    _file_crc32,
    attach_text,
    load_arrays,
    manifest_config,
    model_arrays,
    model_from_arrays,
    read_manifest,
)
from .sparse import Dataset, RowReader, normalize_rows
from .spill import SPILL_DIR, Spill, SpilledArrays, SpilledModel, remove_abandoned
from .warmstart import map_data, warm_start

if TYPE_CHECKING:
    from .text import TextFeaturizer

MetricsCallback = Callable[[TrainingMetrics], None]
_INPUT_MEAN_DECAY = 0.99
_UPDATE_CHUNKS = 16
"""Row chunks of a sampled layer's update; also the partial sums of the fused backward pass through
the output layer, so results are bit-identical for any thread count up to this many."""
SnapshotCallback = Callable[[int, Path], None]
TRAINING_ARRAYS = "opt_cur_"
_MODEL_ARRAY = re.compile(r"^(w\d+|b0|serve_tables|hash\d+_\w+|table\d+_\w+)$")
"""Names of the arrays snapshot.model_arrays writes."""
"""Prefix of the model arrays training continues from, in a snapshot that serves an earlier (best) model."""
CALIBRATION_POINTS = 200
"""Validation points on which `auto` serving checks the tables of wide layers against exact scoring."""


class StepBuffers(NamedTuple):
    """Scratch of one training step, allocated once per batch size (kernels.groups): per batch slot the
    activations and deltas, per worker chunk the active-set lookup and the backward pass's rows."""

    act: Activations
    lookup: Lookup
    back: Backprop

    def first(self, b: int) -> Activations:
        """The activations of the first b batch slots (a shorter last batch)."""
        a = self.act
        if b == a.nact.shape[0]:
            return a
        return Activations(
            hid=tuple(h[:b] for h in a.hid),
            act_ids=tuple(x[:b] for x in a.act_ids),
            act_val=tuple(x[:b] for x in a.act_val),
            nact=a.nact[:b],
            nkept=a.nkept[:b],
            delta0=a.delta0[:b],
            losses=a.losses[:b],
        )


def epoch_order(seed: int, epoch: int, num_points: int) -> np.ndarray:
    """The permutation of training points in an epoch, a function of (seed, epoch) only: baselines
    that call this see the engine's data order."""
    return np.random.default_rng([seed, epoch]).permutation(num_points)


def eval_rows(num_test: int, eval_points: int | None, seed: int) -> np.ndarray:
    """The test points periodic evaluation uses: all (eval_points None or >= num_test) or a seeded subset."""
    if eval_points is None or eval_points >= num_test:
        return np.arange(num_test)
    return np.sort(np.random.default_rng([seed, 7]).choice(num_test, size=eval_points, replace=False))


class Trainer:
    """Trains a SlideModel on a Dataset; see `run`."""

    def __init__(
        self,
        config: SlideConfig,
        train: Dataset,
        test: Dataset | None = None,
        store: SnapshotStore | None = None,
        model: SlideModel | None = None,
        optimizer: LazyAdamState | None = None,
        init_from: str | os.PathLike | SnapshotStore | None = None,
        label_names: Sequence[str] | None = None,
        featurizer: TextFeaturizer | None = None,
        spill_dir: str | os.PathLike | None = None,
    ):
        """optimizer: Adam's state to continue from; None = fresh.

        init_from: a snapshot (a version directory, or a store or its root for the newest version) to start
        from instead of a fresh model: its weights, tables, optimizer state and featurizer, grown to the data
        (engine.warmstart); the structure settings (`warmstart.STRUCTURE_FIELDS`) come from it, the rest from
        `config`. The step size continues from where the source's run had decayed it (see lr_decays).
        label_names / featurizer: the training set's, matched by name / term against the source's.
        spill_dir: where the model not in use is kept, in files (engine.spill) rather than in memory: the copy of the
        best model so far while training, and the state training continues from while `model` is the best one
        (after `run`). A trainer with a store keeps them in the store's `.best` directory (snapshots link the
        files); None without a store: in memory.
        """
        if train.num_points == 0:
            raise ValueError("the training set has no points")
        lr_decays, lr_epochs_before = 0, 0.0
        if init_from is not None:
            warm = warm_start(init_from, config, train, test, label_names, featurizer)
            config, model, optimizer, train, test, lr_decays, lr_epochs_before = warm
        if test is not None and (test.num_features > train.num_features or test.num_labels > train.num_labels):
            raise ValueError("the test set has more features or labels than the training set")
        if model is not None and (model.num_features < train.num_features or model.num_labels < train.num_labels):
            raise ValueError("the training set has more features or labels than the model")
        fresh = model is None
        self.model = model or SlideModel.initialize(config, train.num_features, train.num_labels)
        if config.model.hidden is None or config.model.loss is None:  # what auto gave the model, for its snapshots
            built = concrete(self.model.config, self.model.num_labels).model
            config = config.replace(model=config.model.replace(hidden=built.hidden, loss=built.loss))
        self.config = config
        self.train = train
        self.test = test
        self.store = store
        self._retired = self._retired_labels()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_seen = 0
        self.rehash_round = 0
        self.next_rehash_step = config.sampling.rehash_n0
        self.train_seconds = 0.0
        self.history: list[TrainingMetrics] = []
        self._init_optimizer(optimizer)
        self._eval_rows = self._pick_eval_rows()
        self._train_rows = RowReader(train)
        self._train_idx, self._val_idx = schedule.validation_split(config, train.num_points)
        if fresh and output_init(config, self.model.num_labels) == "centroids":
            init_output_from_centroids(self.model, self._train_rows, self._train_idx)
        self._val_data = self._train_rows.take(self._val_idx) if self._val_idx.size else None
        self._steps_per_epoch = -(-self._train_idx.size // config.optimizer.batch_size)
        self._warmup = schedule.warmup_steps(config, self._steps_per_epoch)
        self._lr = config.optimizer.lr
        self.best: dict | None = None
        """Validation P@1 (and step, epoch) of the best model so far; None before the first validation."""
        self.evals_since_best = 0
        self.lr_decays = lr_decays
        """Evaluations so far that brought no progress (schedule.is_progress): each multiplied the step size by
        lr_decay. A warm start continues its source's count: a trained model fine-tuned at the full step size
        loses what it had settled."""
        self.lr_epochs_before = lr_epochs_before
        """Epochs of step-size decay (schedule.lr_epoch_decay) before this run's first step: a warm start's source's."""
        self.early_stopped = False
        self._dropout_rates = schedule.dropout_rates(config, int(self._val_idx.size))
        self.dropout_raises = 0
        """Times hidden dropout was raised (see schedule.raises_dropout): the rate is dropout_rates[raises]."""
        self._spill_parent = Path(spill_dir) if spill_dir is not None else None
        if self._spill_parent is None and store is not None:
            self._spill_parent = store.root / SPILL_DIR
        if self._spill_parent is not None:
            remove_abandoned(self._spill_parent)  # those of a trainer killed before it could remove them
        self._spill: Spill | None = None
        self._closed = False
        self._best_arrays: dict | None = None
        """The kept best model's arrays, in memory (no spill directory)..."""
        self._best_files: SpilledArrays | None = None
        """... or in files (see spill_dir)."""
        self._best_serving: dict = {}
        self._training_model: SlideModel | None = None
        """After run() while `model` is the best one: the model training continues from, in memory..."""
        self._training_files: SpilledModel | None = None
        """... or in files (when the best one is)."""
        self._test_rows = RowReader(test) if test is not None else None
        self._labelled = np.diff(self._train_rows.y_indptr) > 0
        out = self.model.depth - 1
        sampled_output = self.model.layer_slot[out] >= 0
        # the output layer's negatives for its width (a sharded model's is its whole label set)
        output = resolve(
            self.config.replace(model=self.config.model.replace(sample_output=bool(sampled_output))),
            1,
            self.model.num_labels,
        ).output
        self._hard_negatives = output.hard_negatives
        self._random_negatives = output.random_negatives
        # the backward pass through a sampled output layer runs inside its update (see train_step)
        self._fused_output = bool(sampled_output)
        self._buffers_for: int | None = None
        self._serving_hubs_step = -1

    # ---- state ------------------------------------------------------------------------------
    def _init_optimizer(self, state: LazyAdamState | None = None) -> None:
        w = self.model.weights
        if state is not None:  # taken as it is: no zeroed copy beside it (it would count against a ceiling)
            # a snapshot written after labels were added keeps the optimizer's arrays: new rows start at zero
            state = state.grown([x.shape[0] for x in w])
            for layer, m in enumerate(state.m):
                if m.dtype != self._moment_dtype(layer):
                    raise ValueError(
                        f"opt_m{layer} is {m.dtype}, the config says {np.dtype(self._moment_dtype(layer))}"
                    )
            self.adam = state
            return
        self.adam = LazyAdamState.zeros(
            w,
            self.model.b0,
            [self._moment_dtype(layer) for layer in range(len(w))],
            {
                layer: self.model.tables[self.model.layer_slot[layer]].query_center
                for layer in self.model.sampled_layers()
            },
        )

    def _moment_dtype(self, layer: int) -> type:
        """dtype of layer's first moment: bfloat16 bits (uint16) for a sampled layer if configured."""
        compact = self.config.optimizer.moment_dtype == "bfloat16" and self.model.layer_slot[layer] >= 0
        return np.uint16 if compact else np.float32

    def state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "rehash_round": self.rehash_round,
            "next_rehash_step": self.next_rehash_step,
            "train_seconds": self.train_seconds,
            "history": [m.to_dict() for m in self.history[-1000:]],
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "lr_decays": self.lr_decays,
            "lr_epochs_before": self.lr_epochs_before,
            "dropout_raises": self.dropout_raises,
            "hidden_dropout": self.hidden_dropout,
            "early_stopped": self.early_stopped,
            "resolved": self.resolved().to_dict(),
        }

    def resolved(self) -> Resolved:
        """What the config's auto settings resolve to for this model and training set (engine.resolve)."""
        return dataclasses.replace(
            self.model.plan,
            train_points=int(self._train_idx.size),
            val_points=int(self._val_idx.size),
            steps_per_epoch=self._steps_per_epoch,
            lr_warmup_steps=self._warmup,
            hidden_dropout=self._dropout_rates,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The training state: the model training continues from, and the optimizer's arrays (those of a model kept in
        files are mapped read-only from them)."""
        if self._training_files is not None:
            arrays = {
                name: np.load(path, mmap_mode="r") for name, (path, _) in self._training_files.arrays.files.items()
            }
        else:
            arrays = model_arrays(self._training_model or self.model)
        arrays.update(self.adam.to_arrays())
        return arrays

    def publish(self) -> tuple[int, Path] | None:
        """Write a snapshot to the store (if any): the served model (the best by validation P@1 so far, or the
        current one before the first validation or without a split) + optimizer + progress, and the model
        training continues from as `opt_cur_*` arrays when that is not the served one."""
        if self.store is None:
            return None
        self._check_open()
        self.refresh_serving_hubs()
        state = self.state()
        serving = self.model.serving_report
        links: dict[str, tuple[Path, dict]] = {}
        if self._training_files is not None:  # after run(): files of the training state, the best model's in memory
            arrays = self.adam.to_arrays()
            links.update(self._training_files.arrays.links(TRAINING_ARRAYS))
        else:
            arrays = self.arrays()
        if self._serves_best():
            if self._training_files is None:
                current = {name: arrays.pop(name) for name in model_arrays(self.model)}
                arrays.update({TRAINING_ARRAYS + name: a for name, a in current.items()})
            if self._best_files is not None:
                links.update(self._best_files.links())
            else:
                assert self._best_arrays is not None
                arrays.update(self._best_arrays)
            state["training_arrays"] = TRAINING_ARRAYS
            serving = self._best_serving
        meta = self._snapshot_meta(state, serving)
        if self.model.featurizer is not None:
            meta["text"] = self.model.featurizer.meta()
            arrays.update(self.model.featurizer.to_arrays())
        if self.model.label_names is not None:
            arrays.update(self.model.label_names.to_arrays())
        return self.store.publish(arrays, meta, links=links)

    def attach_text(self, featurizer=None, label_names=None) -> None:
        """Carry a text featurizer and/or label names in every snapshot, so a snapshot alone serves text queries
        and answers with names (engine.text)."""
        if featurizer is not None:
            if featurizer.num_features != self.model.num_features:
                raise ValueError(
                    f"the featurizer makes {featurizer.num_features} features; the model has {self.model.num_features}"
                )
            self.model.featurizer = featurizer
        if label_names is not None:
            if len(label_names) != self.model.num_labels:
                raise ValueError(f"{len(label_names)} label names for {self.model.num_labels} labels")
            self.model.label_names = label_names

    # ---- labels added and retired while training ----------------------------------------------
    def _retired_labels(self) -> np.ndarray | None:
        mask = labels.retired_mask(self.model)
        return mask if mask.any() else None

    def _best_model_copy(self) -> SlideModel | None:
        """The kept best model as a SlideModel over its arrays (read into memory when they are in files; None when
        none is kept)."""
        if self._best_arrays is not None:
            arrays = self._best_arrays
        elif self._best_files is not None:
            arrays = self._best_files.load()
        else:
            return None
        best = model_from_arrays(
            self.config, self.model.num_features, arrays[f"w{self.model.depth - 1}"].shape[0], arrays
        )
        best.label_names = self.model.label_names
        return best

    def _set_best(self, model: SlideModel) -> None:
        """Keep model's arrays as the best model's: in files when the trainer has a spill directory (the previous
        ones removed once the new ones are written), else in memory (without copying them)."""
        if self._spill_parent is None:
            self._best_arrays = model_arrays(model)
            return
        previous, self._best_files = self._best_files, self._spiller().write(model_arrays(model))
        if previous is not None:
            previous.remove()

    def _edit_training_model(self, edit: Callable[[SlideModel], Any]) -> None:
        """Apply a label edit to the model training continues from when run() left the best one as `model`."""
        if self._training_model is not None:
            edit(self._training_model)
        elif self._training_files is not None:
            model = self._training_files.load()
            edit(model)
            previous, self._training_files = self._training_files, self._spiller().write_model(model)
            previous.arrays.remove()

    def add_labels(self, examples, names) -> np.ndarray:
        """Add labels (see SlideModel.add_labels) to the model being trained and to the kept best one, with
        Adam's state of their rows at zero; they are in every later snapshot. Call between steps."""
        best = self._best_model_copy()
        if best is not None:
            labels.add_labels(best, examples, names)
            self._set_best(best)
            del best
        ids = labels.add_labels(self.model, examples, names)
        # run() returned: self.model is the best one, this the state to resume
        self._edit_training_model(lambda model: labels.add_labels(model, examples, names))
        self.config = self.config.replace(
            model=self.config.model.replace(sample_output=self.model.config.model.sample_output)
        )
        self._grow_optimizer()
        self._buffers_for = None  # the step buffers are sized by the layer
        self._serving_hubs_step = -1
        return ids

    def retire_labels(self, ids) -> np.ndarray:
        """Retire labels (see SlideModel.retire_labels) in the model being trained and the kept best one: they
        leave the buckets, training points stop carrying them and their Adam state is zeroed. Call between
        steps. Returns the ids that were live."""
        best = self._best_model_copy()
        if best is not None:
            labels.retire_labels(best, ids)
            self._set_best(best)
            del best
        was_live = labels.retire_labels(self.model, ids)
        self._edit_training_model(lambda model: labels.retire_labels(model, ids))
        out = self.model.depth - 1
        rows = np.asarray(list(ids), dtype=np.int64)
        self.adam.reset_rows(out, rows)
        self._retired = self._retired_labels()
        self._serving_hubs_step = -1
        return was_live

    def _grow_optimizer(self) -> None:
        self.adam = self.adam.grown([w.shape[0] for w in self.model.weights])

    def _serves_best(self) -> bool:
        """Whether the served model is a kept best one rather than the current training state."""
        kept = self._best_arrays is not None or self._best_files is not None
        return kept and self.best is not None and self.best["step"] != self.step

    def best_model(self) -> SlideModel:
        """The model with the best validation P@1 so far (the current one before any validation). A model kept in
        memory shares its arrays with the kept copy; one kept in files is read into memory of its own."""
        if not self._serves_best():
            return self.model
        return self._load_best(self._model_info(self.model))

    @staticmethod
    def _model_info(model: SlideModel) -> tuple:
        """What the kept best model takes from the trainer's model: shape, featurizer, label names."""
        return model.num_features, model.num_labels, model.featurizer, model.label_names

    def _load_best(self, info: tuple, copy: bool = False) -> SlideModel:
        """The kept best model with `_model_info` info. Arrays kept in memory are shared unless `copy`."""
        if self._best_files is not None:
            arrays = self._best_files.load()
        else:
            assert self._best_arrays is not None
            arrays = {name: a.copy() for name, a in self._best_arrays.items()} if copy else self._best_arrays
        num_features, num_labels, featurizer, label_names = info
        model = model_from_arrays(self.config, num_features, num_labels, arrays)
        model.serving_report = self._best_serving
        model.featurizer, model.label_names = featurizer, label_names
        return model

    def _keep_best(self) -> None:
        """Keep a copy of the current model as the best one: written into new files of the spill directory, or
        copied in memory without one."""
        if self._spill_parent is not None:
            self._set_best(self.model)  # write() makes the copy: files
        else:
            self._best_arrays = None  # the previous best goes before the new copy is made: one copy at a time
            self._best_arrays = {name: np.array(a, copy=True) for name, a in model_arrays(self.model).items()}
        self._best_serving = dict(self.model.serving_report)

    def _spiller(self) -> Spill:
        """The trainer's spill directory (made at first use)."""
        assert self._spill_parent is not None
        self._check_open()
        if self._spill is None:
            self._spill = Spill(self._spill_parent)
        return self._spill

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the trainer is closed")

    def close(self) -> None:
        """Remove the files of the models kept in the spill directory (see spill_dir; they also go when the trainer
        is collected or the process exits). `model` stays usable; training and publishing do not."""
        self._closed = True
        self._best_files = None
        self._training_files = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def refresh_serving_hubs(self) -> None:
        """Re-pick what predictions add to every candidate set from the current weights: the tables are
        only as fresh as the last rehash, and the longest rows change fastest (training is unaffected)."""
        if self._serving_hubs_step == self.step:
            return  # weights and input means change only in a step
        for layer in self.model.sampled_layers():
            self.model.update_hubs(layer, training=False, center=self.adam.input_mean[layer])
        self._serving_hubs_step = self.step

    @classmethod
    def resume(
        cls,
        store: SnapshotStore,
        train: Dataset,
        test: Dataset | None = None,
        label_names: Sequence[str] | None = None,
        featurizer: TextFeaturizer | None = None,
    ) -> Trainer:
        """A trainer continuing from the newest snapshot in `store` (same config, step and data order).

        label_names / featurizer: the training set's, for a run that started from another model (init_from):
        its data is mapped to the model's label and feature ids again, by name and by term."""
        latest = store.latest()
        if latest is None:
            raise FileNotFoundError(f"no snapshot to resume from in {store.root}")
        _, path = latest
        manifest = read_manifest(path)
        if manifest.get("shards"):
            shards = len(manifest["shards"])
            raise ValueError(f"{path} was written by sharded training: resume it with --shards {shards}")
        config = manifest_config(manifest)
        prefix = manifest["trainer_state"].get("training_arrays")
        served_files: dict[str, dict] = {}
        if prefix and not manifest.get("delta"):  # the served model's files are linked into the spill, not read
            served_files = {name: info for name, info in manifest["arrays"].items() if _MODEL_ARRAY.match(name)}
            for name, info in served_files.items():
                if _file_crc32(path / f"{name}.npy") != info["crc32"]:
                    raise SnapshotError(f"{path / name}.npy: checksum mismatch, the snapshot is corrupt")
        rest = [n for n in manifest["arrays"] if n not in served_files] if served_files else None
        arrays = load_arrays(path, rest, mmap=False, verify=True)
        served: dict | None = None
        if prefix:
            served = {name: arrays.pop(name) for name in list(arrays) if _MODEL_ARRAY.match(name)}
            arrays.update({name[len(prefix) :]: arrays.pop(name) for name in list(arrays) if name.startswith(prefix)})
        model = model_from_arrays(config, manifest["num_features"], manifest["num_labels"], arrays)
        attach_text(model, manifest, arrays)
        if label_names is not None or featurizer is not None:
            mapped = map_data(model, train, test, label_names, featurizer)
            train, test = mapped.train, mapped.test
        # labels added while the run went on make the model wider than its data
        if manifest["num_features"] != train.num_features or manifest["num_labels"] < train.num_labels:
            raise ValueError("the training set's dimensions differ from the snapshot's")
        st = manifest["trainer_state"]
        try:
            trainer = cls(config, train, test, store, model=model, optimizer=LazyAdamState.from_arrays(arrays))
        except ValueError as exc:
            raise ValueError(f"snapshot {path}: {exc}") from exc
        trainer.best = st.get("best")
        trainer.evals_since_best = int(st.get("evals_since_best", 0))
        trainer.lr_decays = int(st.get("lr_decays", 0))
        trainer.lr_epochs_before = float(st.get("lr_epochs_before", 0.0))
        trainer.dropout_raises = min(int(st.get("dropout_raises", 0)), len(trainer._dropout_rates) - 1)
        trainer.early_stopped = bool(st.get("early_stopped", False))
        if served_files:
            trainer._best_files = trainer._spiller().link(path, served_files)
            trainer._best_serving = dict(manifest.get("serving", {}))
        elif served is not None:
            if trainer._spill_parent is not None:
                trainer._best_files = trainer._spiller().write(served)
            else:
                trainer._best_arrays = served
            trainer._best_serving = dict(manifest.get("serving", {}))
        elif trainer.best is not None:
            model.serving_report = dict(manifest.get("serving", {}))
            trainer._keep_best()
        for key in ("step", "epoch", "batch_in_epoch", "samples_seen", "rehash_round", "next_rehash_step"):
            setattr(trainer, key, int(st[key]))
        trainer.train_seconds = float(st["train_seconds"])
        trainer.history = [TrainingMetrics.from_dict(h) for h in st.get("history", [])]
        return trainer

    # ---- data order and buffers ---------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The training rows of an epoch in order: the validation split's rows never appear."""
        order = epoch_order(self.config.seed, epoch, self._train_idx.size)
        return order if self._val_idx.size == 0 else self._train_idx[order]

    def _pick_eval_rows(self) -> np.ndarray | None:
        if self.test is None or self.test.num_points == 0:
            return None
        return eval_rows(self.test.num_points, self.config.schedule.eval_points, self.config.seed)

    def _buffers(self, batch: int) -> StepBuffers:
        if self._buffers_for == batch:
            return self._bufs
        model, cfg = self.model, self.config
        depth = model.depth
        max_labels = int(np.diff(self._train_rows.y_indptr).max(initial=0))
        hid = tuple(np.zeros((batch, w.shape[1] - 1), np.float32) for w in model.weights[1:])
        act_ids, act_val = [], []
        for layer in range(1, depth):
            out = model.weights[layer].shape[0]
            if model.layer_slot[layer] >= 0:
                n_hubs = model.tables[model.layer_slot[layer]].hubs.shape[0]
                n_tables = model.hashes[model.layer_slot[layer]].n_tables
                cap = min(
                    out,
                    n_tables * (1 + cfg.sampling.probes) * cfg.sampling.bucket_size
                    + n_hubs
                    + max_labels
                    + cfg.sampling.min_active
                    + (self._random_negatives if layer == depth - 1 else 0),
                )
                act_ids.append(np.zeros((batch, cap), np.int32))
            else:
                cap = out
                act_ids.append(np.zeros((batch, 1), np.int32))
            act_val.append(np.zeros((batch, cap), np.float32))
        threads = numba.config.NUMBA_NUM_THREADS
        sampled = model.sampled_layers()
        n_max = max([model.weights[layer].shape[0] for layer in sampled] or [1])
        n_codes = max([h.idx.shape[0] for h in model.hashes] or [1])
        n_tables_max = max([h.n_tables for h in model.hashes] or [1])
        width_max = max(w.shape[1] - 1 for w in model.weights[1:])

        def per_chunk(width: int, dtype: type) -> np.ndarray:
            return np.zeros((threads, width), dtype)

        self._bufs: StepBuffers = StepBuffers(
            act=Activations(
                hid=hid,
                act_ids=tuple(act_ids),
                act_val=tuple(act_val),
                nact=np.zeros((batch, depth), np.int32),
                nkept=np.zeros(batch, np.int32),
                delta0=np.zeros((batch, model.weights[0].shape[1]), np.float32),
                losses=np.zeros(batch, np.float32),
            ),
            lookup=Lookup(
                tags=per_chunk(n_max, np.int64),
                counts=per_chunk(max(a.shape[1] for a in act_ids), np.int32),
                gens=np.zeros(threads, np.int64),
                qmargins=per_chunk(n_codes, np.float64),
                qcodes=per_chunk(n_codes, np.int32),
                qbuck=per_chunk(n_tables_max * (1 + cfg.sampling.probes), np.int32),
            ),
            back=Backprop(gin=per_chunk(width_max, np.float32), gprev=per_chunk(width_max, np.float32)),
        )
        self._group_of_row = [np.full(w.shape[0], -1, np.int32) for w in model.weights]
        out = model.depth - 1
        self._update_chunks = max(_UPDATE_CHUNKS, threads)
        shape = (self._update_chunks, batch, model.weights[out].shape[1] - 1) if self._fused_output else (0, 0, 0)
        self._grad_inputs = np.zeros(shape, np.float32)
        self._buffers_for = batch
        return self._bufs

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self, points: np.ndarray) -> tuple[float, int, float]:
        """Train on one batch of dataset rows; returns (summed loss, labelled points, mean output active)."""
        cfg, model = self.config, self.model
        points = np.ascontiguousarray(points, dtype=np.int64)
        b = points.shape[0]
        if b == 0:
            raise ValueError("train_step needs at least one point")
        if b > cfg.optimizer.batch_size:
            raise ValueError(f"a batch holds at most batch_size={cfg.optimizer.batch_size} points, got {b}")
        bufs = self._buffers(cfg.optimizer.batch_size)
        act = bufs.first(b)
        n_chunks = max(1, min(b, numba.get_num_threads()))
        fused = self._fused_output
        data = self._train_rows.take(points)
        if self._retired is not None:
            data = labels.without_labels(data, self._retired)
        if cfg.model.normalize_input:
            data = normalize_rows(data)
        self._lr = self.step_size()
        slots = np.arange(b, dtype=np.int64)
        net = model.kernel_layers()
        train_batch(
            slots,
            self.samples_seen,
            Batch(data.x_indptr, data.x_indices, data.x_values, data.y_indptr, data.y_indices),
            net,
            model.kernel_tables(),
            *self._retrieval_and_sampling(cfg.seed),
            act,
            bufs.lookup,
            bufs.back,
            n_chunks,
            not fused,
        )
        hid, act_ids, act_val, nact, delta0, losses = (
            act.hid,
            act.act_ids,
            act.act_val,
            act.nact,
            act.delta0,
            act.losses,
        )
        out = model.depth - 1
        layers = list(range(1, model.depth))
        if fused:
            # the output layer first: its update is also the backward pass into the layers below
            grad_inputs = scratch_rows(self._grad_inputs, b)
            grad_inputs[:] = 0.0
            self._update_layer(out, act_ids, act_val, nact, hid, grad_inputs)
            backward_batch(grad_inputs, n_chunks, net, act, bufs.back, self._kept_scale)
            layers.remove(out)
        for layer in layers:
            self._update_layer(layer, act_ids, act_val, nact, hid, self._grad_inputs[:0])
        self._update_input_layer(data, slots, delta0, hid)
        self.step += 1
        self.samples_seen += b
        labelled = int(np.count_nonzero(self._labelled[points]))
        out_active = float(nact[:, model.depth - 1].mean()) if b else 0.0
        if self.step >= self.next_rehash_step:
            self.rehash()
        return float(losses.sum()), labelled, out_active

    def lr_epochs(self) -> float:
        """Epochs of training the step size has decayed over (schedule.lr_epoch_decay), a warm start's source's
        included."""
        return self.lr_epochs_before + self.step / max(1, self._steps_per_epoch)

    def step_size(self) -> float:
        """Adam's step size for the next step: optimizer.lr after the warm-up, the plateau cuts and the epochs."""
        cfg = self.config.schedule
        factor = schedule.lr_factor(
            self.step, self._warmup, self.lr_decays, cfg.lr_decay, self.lr_epochs(), cfg.lr_epoch_decay
        )
        return self.config.optimizer.lr * factor

    @property
    def hidden_dropout(self) -> float:
        """The hidden dropout rate training steps use now: optimizer.hidden_dropout, or auto's current step."""
        return self._dropout_rates[self.dropout_raises]

    @property
    def _kept_scale(self) -> float:
        """The factor hidden dropout applies to the units it keeps (backward_point)."""
        return 1.0 / (1.0 - self.hidden_dropout)

    def _retrieval_and_sampling(self, seed: int) -> tuple[Retrieval, Sampling]:
        """The kernels' retrieval and sampling parameters of a training step, its random draws keyed by `seed`."""
        cfg = self.config
        return (
            Retrieval(cfg.sampling.probes, cfg.sampling.active_threshold, self.model.max_active),
            Sampling(
                min_active=cfg.sampling.min_active,
                seed=seed,
                hard_negatives=self._hard_negatives,
                random_negatives=self._random_negatives,
                negative_group=cfg.sampling.random_negative_group,
                hidden_dropout=self.hidden_dropout,
                dropout_seed=cfg.seed,
                sigmoid=cfg.model.loss == "sigmoid",
            ),
        )

    def _snapshot_meta(self, state: dict, serving: dict) -> dict:
        """A snapshot manifest's description of the run: config, shape, trainer state and serving report."""
        return {
            "config": self.config.to_dict(),
            "num_features": self.model.num_features,
            "num_labels": self.model.num_labels,
            "trainer_state": state,
            "serving": serving,
        }

    def _update_input_layer(self, data, slots: np.ndarray, delta0: np.ndarray, hid) -> None:
        """Adam on the input layer's rows the batch touched (data: its CSR points, slots int64 (b,) their batch
        positions, delta0 float32 (b, h1) the gradient at layer 0) and on its bias; then the running mean of each
        sampled layer's inputs, which picks the hubs at the next rehash."""
        model, cfg = self.model, self.config
        group_start, pair_point, pair_nz, touched = group_by_feature(
            slots, data.x_indptr, data.x_indices, self._group_of_row[0]
        )
        lr, b1, b2, eps = self._lr, cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.eps
        update_input_layer(
            model.weights[0],
            self.adam.m[0],
            self.adam.v[0],
            self.adam.steps[0],
            data.x_values,
            delta0,
            group_start,
            pair_point,
            pair_nz,
            touched,
            lr,
            b1,
            b2,
            eps,
        )
        update_input_bias(model.b0, self.adam.mb0, self.adam.vb0, delta0, self.step + 1, lr, b1, b2, eps)
        for layer in model.sampled_layers():
            self.adam.input_mean[layer] *= _INPUT_MEAN_DECAY
            self.adam.input_mean[layer] += (1.0 - _INPUT_MEAN_DECAY) * hid[layer - 1].mean(axis=0, dtype=np.float64)

    def _update_layer(self, layer: int, act_ids, act_val, nact, hid, grad_inputs) -> None:
        """Adam on a layer (>= 1) from the batch's deltas; grad_inputs: see update_sampled_layer."""
        cfg, model = self.config, self.model
        w = model.weights[layer]
        lr, b1, b2, eps = self._lr, cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.eps
        if model.layer_slot[layer] >= 0:
            group_start, pair_point, pair_slot, touched = group_by_row(
                act_ids[layer - 1],
                nact[:, layer],
                self._group_of_row[layer],
                act_val[layer - 1],
                self._hard_negatives > 0 and layer == model.depth - 1,
            )
            update_sampled_layer(
                w,
                self.adam.m[layer],
                self.adam.v[layer],
                self.adam.steps[layer],
                self.adam.drift[layer],
                act_val[layer - 1],
                hid[layer - 1],
                group_start,
                pair_point,
                pair_slot,
                touched,
                lr,
                b1,
                b2,
                eps,
                self._update_chunks,
                grad_inputs,
            )
        else:
            update_dense_layer(
                w,
                self.adam.m[layer],
                self.adam.v[layer],
                self.adam.steps[layer],
                self.adam.drift[layer],
                act_val[layer - 1],
                hid[layer - 1],
                lr,
                b1,
                b2,
                eps,
            )

    def rehash(self) -> int:
        """Re-insert drifted (or all) neurons of every sampled layer; draw new functions every
        `rebuild_every` rounds. Schedules the next rehash N0 * e^(lambda * round) steps later."""
        cfg, model = self.config, self.model
        self.rehash_round += 1
        every = cfg.sampling.rebuild_every
        rebuild = every != "never" and self.rehash_round % int(every) == 0
        hashed = 0
        for layer in model.sampled_layers():
            model.tables[model.layer_slot[layer]].query_center[:] = self.adam.input_mean[layer]
            rng = np.random.default_rng([cfg.seed, 11, self.rehash_round, layer]) if rebuild else None
            rows = None
            if cfg.sampling.drift_threshold > 0 and not rebuild:
                norms = model.row_norms(layer)
                rows = np.flatnonzero(self.adam.drift[layer] > cfg.sampling.drift_threshold * np.maximum(norms, 1e-12))
            hashed += model.rehash_layer(layer, self.rehash_round, rows=rows, new_functions=rng, serving_hubs=False)
            if rows is None:
                self.adam.drift[layer][:] = 0.0
            else:
                self.adam.drift[layer][rows] = 0.0
        interval = min(
            cfg.sampling.rehash_max_interval,
            cfg.sampling.rehash_n0 * math.exp(cfg.sampling.rehash_lambda * self.rehash_round),
        )
        self.next_rehash_step = self.step + max(1, int(round(interval)))
        return hashed

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, mode: PredictMode = "auto", k: int = 5) -> dict:
        """P@1/P@5 of the model on the evaluation subset of the test set (reported only: nothing is selected
        by it), in `mode` (auto: as served; eval_mode says which mode answered)."""
        if self._eval_rows is None:
            return {"p_at_1": None, "p_at_5": None}
        assert self.test is not None and self._test_rows is not None  # eval rows are drawn from the test set
        self.refresh_serving_hubs()
        sub = (
            self.test.row_slice(0, self.test.num_points)
            if len(self._eval_rows) == self.test.num_points
            else self._test_rows.take(self._eval_rows)
        )
        return self._score(sub, mode, k, "")

    def _score(self, sub: Dataset, mode: PredictMode, k: int, prefix: str) -> dict:
        pred, _, _, used = self.model.predict_with_stats(
            sub.x_indptr, sub.x_indices, sub.x_values, k=min(k, self.model.num_labels), mode=mode
        )
        return {
            f"{prefix}p_at_1": precision_at_k(pred, sub.y_indptr, sub.y_indices, 1),
            f"{prefix}p_at_5": precision_at_k(pred, sub.y_indptr, sub.y_indices, 5),
            f"{prefix}eval_mode": used,
        }

    def validate(self, loss: float | None = None) -> dict:
        """Calibrate `auto` serving on the validation split (see SlideModel.calibrate_serving) and score it
        there as served; {} without a split. Updates the best model kept so far and, when the score brings no
        progress (schedule.is_progress: a new best by too little counts as none), either raises hidden dropout
        (auto, see schedule.raises_dropout; `loss`: the mean training loss since the previous evaluation) or
        reduces the step size and counts towards early stopping."""
        if self._val_data is None:
            return {}
        self.refresh_serving_hubs()
        val = self._val_data
        cal = val.row_slice(0, min(val.num_points, CALIBRATION_POINTS))
        self.model.calibrate_serving(cal.x_indptr, cal.x_indices, cal.x_values, cal.y_indptr, cal.y_indices)
        out = self._validation_scores(val)
        score = out["val_p_at_1"]
        best = None if self.best is None else self.best["val_p_at_1"]
        if schedule.is_improvement(score, best):
            self.best = {"val_p_at_1": score, "step": self.step, "epoch": self.epoch, "samples": self.samples_seen}
            self._keep_best()
        if schedule.is_progress(score, best):
            self.evals_since_best = 0
        elif schedule.raises_dropout(
            self.evals_since_best + 1, self.dropout_raises, self._dropout_rates, loss, self._previous_loss()
        ):
            # overfitting: go on from the best model with more dropout, and a fresh early-stopping count
            self.dropout_raises += 1
            self.evals_since_best = 0
            self._restore_best()
        else:
            self.evals_since_best += 1
            self.lr_decays += 1
        assert self.best is not None
        out["best_val_p_at_1"] = self.best["val_p_at_1"]
        return out

    def _previous_loss(self) -> float | None:
        """The training loss of the previous validating evaluation's window, if it trained at the current
        dropout rate (None otherwise)."""
        last = next((h for h in reversed(self.history) if h.val_p_at_1 is not None), None)
        if last is None:
            return None
        rate = last.hidden_dropout if last.hidden_dropout is not None else self._dropout_rates[0]
        return last.loss if rate == self.hidden_dropout else None

    def _restore_best(self) -> None:
        """Continue training from the best model kept (its weights and tables; the optimizer's state goes on), a copy
        of it: training must not change the kept one."""
        if not self._serves_best():
            return
        model = (
            self._load_best(self._model_info(self.model), copy=True)
            if self._best_files is None
            else self._swap_in_best()
        )
        model.serving_report = dict(self._best_serving)
        self.model = model
        self._buffers_for = None
        self._serving_hubs_step = -1

    def _swap_in_best(self) -> SlideModel:
        """The best model read from its files, once `model` is let go (one model in memory at a time)."""
        info = self._model_info(self.model)
        del self.model
        return self._load_best(info)

    def _validation_scores(self, val: Dataset) -> dict:
        """val_p_at_1, val_p_at_5 and val_eval_mode of the model as served (`auto`) on the validation split."""
        return self._score(val, "auto", 5, "val_")

    # ---- the loop -----------------------------------------------------------------------------
    def run(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        on_metrics: MetricsCallback | None = None,
        on_snapshot: SnapshotCallback | None = None,
        snapshot_every_s: float = 30.0,
        progress: Callable[[int], None] | None = None,
        time_budget_s: float | None = None,
        before_step: Callable[[], None] | None = None,
    ) -> dict:
        """Train until `config.schedule.epochs` are done, `should_stop()` is true (checked between batches) or the
        time budget is spent. Returns the last metrics with "stopped" (True when interrupted early).
        before_step: called before every step (the place to add or retire labels while training)."""
        self._check_open()
        cfg = self.config
        set_threads(cfg.threads)
        if self._training_model is not None:  # a previous run() left the best model in self.model
            self.model, self._training_model = self._training_model, None
            self._serving_hubs_step = -1
        elif self._training_files is not None:  # ... and the model training continues from in files
            spilled, self._training_files = self._training_files, None
            del self.model  # the best one is in its own files
            self.model = spilled.load()
            spilled.arrays.remove()
            self._serving_hubs_step = -1
        n = self._train_idx.size
        batches_per_epoch = self._steps_per_epoch
        window = {"loss": 0.0, "labelled": 0, "active": 0.0, "batches": 0, "samples": 0, "seconds": 0.0}
        last_snapshot = time.monotonic()
        start_seconds = self.train_seconds
        stopped = False
        interrupted = False
        last = None

        def report(select: bool = True) -> TrainingMetrics:
            """Metrics of the window; select: validate too (keep the best model, count towards stopping)."""
            window_metrics: dict[str, Any] = dict(
                step=int(self.step),
                epoch=int(self.epoch),
                samples=int(self.samples_seen),
                loss=float(window["loss"] / window["labelled"]) if window["labelled"] else None,
                samples_per_s=float(window["samples"] / window["seconds"]) if window["seconds"] > 0 else None,
                active_fraction=float(window["active"] / window["batches"] / self.model.num_labels)
                if window["batches"]
                else None,
                elapsed_s=float(self.train_seconds),
                lr=float(self._lr),  # the rate the window trained at (validate() may lower it)
                hidden_dropout=float(self.hidden_dropout),  # likewise (validate() may raise it)
            )
            validation = self.validate(window_metrics["loss"]) if select else {}
            metrics = TrainingMetrics(**window_metrics, **validation, **self.evaluate())
            self.history.append(metrics)
            if on_metrics:
                on_metrics(metrics)
            window.update(loss=0.0, labelled=0, active=0.0, batches=0, samples=0, seconds=0.0)
            return metrics

        def snapshot() -> None:
            published = self.publish()
            if published and on_snapshot:
                on_snapshot(*published)

        def stop_early() -> bool:
            self.early_stopped = self.early_stopped or schedule.should_stop_early(
                self.evals_since_best, cfg.schedule.early_stop_patience
            )
            return self.early_stopped

        while self.epoch < cfg.schedule.epochs and not self.early_stopped:
            order = self.epoch_order(self.epoch)
            while self.batch_in_epoch < batches_per_epoch:
                if before_step is not None:
                    before_step()  # e.g. labels added or retired meanwhile (add_labels, retire_labels)
                interrupted = should_stop()
                if interrupted or (time_budget_s is not None and self.train_seconds - start_seconds >= time_budget_s):
                    stopped = True
                    break
                s = self.batch_in_epoch * cfg.optimizer.batch_size
                t0 = time.perf_counter()
                loss, labelled, active = self.train_step(order[s : s + cfg.optimizer.batch_size])
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                self.batch_in_epoch += 1
                window["loss"] += loss
                window["labelled"] += labelled
                window["active"] += active
                window["batches"] += 1
                window["samples"] += min(cfg.optimizer.batch_size, n - s)
                window["seconds"] += dt
                if progress:
                    progress(min(cfg.optimizer.batch_size, n - s))
                if cfg.schedule.eval_every and self.step % cfg.schedule.eval_every == 0:
                    last = report()
                    if stop_early():
                        break
                if self.store is not None and time.monotonic() - last_snapshot >= snapshot_every_s:
                    snapshot()
                    last_snapshot = time.monotonic()
            if stopped or self.early_stopped:
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            if not cfg.schedule.eval_every:
                last = report()
                stop_early()
        if last is None or window["batches"]:
            # an interrupted run resumes later: selecting here would make its path differ from an uninterrupted one
            last = report(select=not interrupted)
        self.refresh_serving_hubs()
        snapshot()
        result = {**last.to_dict(), "stopped": stopped, "early_stopped": self.early_stopped}
        if self._serves_best():
            # the final model is the best one; the next run() continues from the training state
            if self._best_files is not None:  # both in files but the one in use
                self._training_files = self._spiller().write_model(self.model)
                self.model = self._swap_in_best()
            else:
                self._training_model = self.model
                self.model = self.best_model()
            self._serving_hubs_step = self.step
            result.update(self.evaluate())
        if self.best is not None:
            result.update(served_step=self.best["step"], best_val_p_at_1=self.best["val_p_at_1"])
        return result
