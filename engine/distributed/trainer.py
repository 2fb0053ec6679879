"""Label-sharded training and serving on a Ray cluster.

P Ray actors each hold a `ShardTrainer`: the replicated hidden layers and a slice of the output labels.
A `DistributedTrainer` is the driver: it is a Trainer (same epochs, data order, validation, early
stopping, metrics and snapshots) whose step runs the shards' four stages with two batch-sized
reductions of the softmax (max, then sum of exponentials) and one sum of the gradients at the output
layer's inputs (batch x width floats), so its traffic per step does not grow with the label count.
Predictions fan out to the shards and the driver merges their P x k candidates (`ShardedModel`).

Snapshots are ordinary versions in a SnapshotStore whose manifest lists the shards; each shard writes its
slice into its own subdirectory (a shared filesystem across the cluster's nodes), and
`engine.snapshot.load_model` serves a version merged on one machine.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..adam import LazyAdamState
from ..config import SlideConfig
from ..network import Predictions, PredictMode, check_csr, layer_slots
from ..resolve import Resolved
from ..snapshot import SnapshotStore, manifest_config, read_manifest
from ..sparse import Dataset, load_dataset
from ..trainer import TRAINING_ARRAYS, Trainer
from .shard import SHARD_DIR, ShardTrainer, label_ranges, shard_config

DEFAULT_OBJECT_STORE_BYTES = 200 * 2**20
"""Object store of a Ray instance started with address `local`: the shards exchange batch-sized arrays."""


START_TIMEOUT_S = 300.0
"""How long the shards may take to be placed and load their data before starting fails."""


class ShardLostError(RuntimeError):
    """A shard's actor or node died: training stops; resume from the last snapshot."""


def require_ray():
    """The ray module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sharded training needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.9')") from exc
    return ray


def connect(address: str, num_cpus: int | None = None, object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES) -> bool:
    """Connect this process to Ray: `local` starts an instance (num_cpus CPUs), anything else is a cluster's
    address (`ray://host:10001`, `host:6379` or `auto`). Returns whether this call started or joined Ray
    (False: the process was connected already, e.g. by a test's cluster)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(
            address="local",  # a new instance, even when another one runs on this machine
            num_cpus=num_cpus,
            object_store_memory=object_store_bytes,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    elif address.startswith("ray://"):
        ray.init(address)  # Ray Client: a driver outside the cluster (e.g. the service beside a KubeRay cluster)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


class _Shard:
    """What a Ray actor runs: one ShardTrainer and calls into it by name."""

    def __init__(
        self,
        config: dict,
        data: Any,
        shard: int,
        shards: int,
        resume_dir: str | None = None,
        state: dict | None = None,
    ):
        from .._numba import set_threads

        cfg = SlideConfig.from_dict(config)
        set_threads(cfg.threads)
        self.seconds: dict[str, float] = {}
        train = load_dataset(data) if isinstance(data, str) else data
        if resume_dir is None:
            self.trainer = ShardTrainer(cfg, train, shard, shards)
        else:
            assert state is not None
            self.trainer = ShardTrainer.from_snapshot(cfg, train, shard, shards, resume_dir, state)

    def call(self, method: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = getattr(self.trainer, method)(*args)
        self.seconds[method] = self.seconds.get(method, 0.0) + time.perf_counter() - t0
        return out

    def timings(self) -> dict[str, float]:
        """Seconds this shard has spent in each method called through `call` (its compute, without Ray's)."""
        return dict(self.seconds)

    def predict(self, indptr, indices, values, k: int, mode: PredictMode, probes: int | None, best: bool):
        """Top-k of this shard's labels (global ids; -1 / -inf pad when the shard has fewer than k)."""
        tr = self.trainer
        model = tr.serving_model(best)
        local_k = min(k, model.num_labels)
        labels, scores, n_scored, used = model.predict_with_stats(indptr, indices, values, local_k, mode, probes)
        labels = np.where(labels >= 0, labels + tr.lo, -1).astype(np.int32)
        return labels, scores, n_scored, used

    def calibrate(self, indptr, indices, values, y_indptr, y_indices) -> dict:
        """calibrate_serving of this shard's slice on the given points, with their labels in this shard."""
        tr = self.trainer
        y_indptr_local = y_indices_local = None
        if y_indptr is not None:
            y = np.asarray(y_indices)
            mine = (y >= tr.lo) & (y < tr.hi)
            n = len(y_indptr) - 1
            row = np.repeat(np.arange(n), np.diff(y_indptr))
            y_indptr_local = np.zeros(n + 1, np.int64)
            np.cumsum(np.bincount(row[mine], minlength=n), out=y_indptr_local[1:])
            y_indices_local = (y[mine] - tr.lo).astype(np.int32)
        return tr.model.calibrate_serving(indptr, indices, values, y_indptr_local, y_indices_local)

    def ping(self) -> int:
        return os.getpid()


class ShardGroup:
    """The P actors of a sharded model, and calls to all of them with failures turned into ShardLostError."""

    def __init__(self, actors: list, ranges: list[tuple[int, int]], started_ray: bool):
        self.actors = actors
        self.ranges = ranges
        self.started_ray = started_ray
        self.bytes_sent = 0
        """Bytes of arrays sent between the driver and the shards so far (both directions)."""
        self._inflight: list = []

    @classmethod
    def start(
        cls,
        config: SlideConfig,
        train: Dataset,
        shards: int,
        address: str,
        resume_dir: Path | None = None,
        state: dict | None = None,
        actor_options: dict | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> ShardGroup:
        """Start P shard actors (each asks Ray for config.threads CPUs, 1 when threads is auto)."""
        ray = require_ray()
        ranges = label_ranges(train.num_labels, shards)
        cpus = max(1, int(config.threads or 1))
        started = connect(address, num_cpus=max(cpus * shards, 1))
        data: Any = _dataset_dir(train)
        if data is None:
            data = ray.put(train)
        remote = ray.remote(_Shard)
        options = {"num_cpus": cpus, "max_restarts": 0, **(actor_options or {})}
        actors = [
            remote.options(**options).remote(
                config.to_dict(),
                data,
                p,
                shards,
                None if resume_dir is None else str(resume_dir / SHARD_DIR.format(p)),
                state,
            )
            for p in range(shards)
        ]
        group = cls(actors, ranges, started)
        try:
            group.get([a.ping.remote() for a in actors], timeout=start_timeout_s)
        except BaseException:
            group.close()
            raise
        return group

    @property
    def shards(self) -> int:
        return len(self.actors)

    def get(self, refs: list, timeout: float | None = None) -> list:
        """ray.get, with a dead actor or node reported as ShardLostError (a shard's own exception is raised as
        it is); `timeout` only when the shards start (they may not fit in the cluster)."""
        ray = require_ray()
        lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OwnerDiedError,
        )
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise ShardLostError(
                f"{self.shards} shards did not start within {timeout:g} s: each needs the threads setting's CPUs "
                "(1 when threads is auto) free on a node of the Ray cluster (`ray status` shows what is free)"
            ) from exc
        except lost as exc:
            raise ShardLostError(
                f"a shard of the model ({self.shards} shards on Ray) was lost: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Training stopped; resume it to continue from "
                "the last snapshot"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            raise cause from None

    def all(self, method: str, *args: Any) -> list:
        """Call `method` on every shard with the same arguments (after the calls still in flight)."""
        return self.each(method, [args] * self.shards)

    def each(self, method: str, args: Sequence[tuple]) -> list:
        """Call `method` on shard p with args[p]; returns the results in shard order."""
        self.flush()
        refs = [a.call.remote(method, *a_args) for a, a_args in zip(self.actors, args, strict=True)]
        return self.get(refs)

    def submit(self, method: str, *args: Any) -> None:
        """Call `method` on every shard without waiting (the next call waits, and raises its errors)."""
        self._inflight.extend(a.call.remote(method, *args) for a in self.actors)

    def flush(self) -> list:
        refs, self._inflight = self._inflight, []
        return self.get(refs) if refs else []

    def put(self, value: Any) -> Any:
        """An object every shard reads (sent once to the object store)."""
        return require_ray().put(value)

    def close(self) -> None:
        """Stop the actors (and the Ray instance this group started)."""
        ray = require_ray()
        self._inflight = []
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor already gone is what we want
                pass
        self.actors = []
        if self.started_ray:
            ray.shutdown()


def _dataset_dir(data: Dataset) -> str | None:
    """The directory of a dataset opened with load_dataset (memory-mapped): shards open it themselves."""
    filename = getattr(data.x_indptr, "filename", None)
    if not isinstance(data.x_indptr, np.memmap) or filename is None:
        return None
    return str(Path(filename).parent)


def _nbytes(values: Sequence[Any]) -> int:
    return sum(int(getattr(v, "nbytes", 8)) for v in values)


class ShardedModel:
    """A model served from its shards: predictions fan out and the driver merges the P x k candidates.

    Scores are output logits, the same numbers a merged model gives (the hidden layers are replicas), so
    `exact` predictions equal those of the whole model; `lsh` and `auto` use each shard's own tables."""

    def __init__(self, group: ShardGroup, config: SlideConfig, num_features: int, num_labels: int, best: bool = False):
        self.group = group
        self.config = config
        self.num_features = int(num_features)
        self.num_labels = int(num_labels)
        self.layer_slot = layer_slots(config, num_labels)
        self.best = best
        self.featurizer: Any = None
        self.label_names: Any = None
        self.serving_report: dict = {}

    @property
    def depth(self) -> int:
        return len(self.layer_slot)

    def sampled_layers(self) -> list[int]:
        return [int(layer) for layer in np.flatnonzero(self.layer_slot >= 0)]

    def predict(self, indptr, indices, values, k: int = 5, mode: PredictMode = "auto", probes: int | None = None):
        labels, scores, _, _ = self.predict_with_stats(indptr, indices, values, k, mode, probes)
        return labels, scores

    def predict_with_stats(
        self, indptr, indices, values, k: int = 5, mode: PredictMode = "auto", probes: int | None = None
    ) -> Predictions:
        if not 1 <= int(k) <= min(1000, self.num_labels):
            raise ValueError(f"k must be in [1, {min(1000, self.num_labels)}], got {k}")
        indptr, indices, values = check_csr(indptr, indices, values, self.num_features)
        group = self.group
        group.flush()
        refs = [a.predict.remote(indptr, indices, values, int(k), mode, probes, self.best) for a in group.actors]
        parts = group.get(refs)
        group.bytes_sent += group.shards * _nbytes([indptr, indices, values]) + sum(_nbytes(part[:3]) for part in parts)
        return merge_predictions(parts, int(k))

    def calibrate_serving(self, indptr, indices, values, y_indptr=None, y_indices=None) -> dict:
        """Each shard calibrates `auto` serving of its own slice (see SlideModel.calibrate_serving)."""
        indptr, indices, values = check_csr(indptr, indices, values, self.num_features)
        self.group.flush()
        refs = [a.calibrate.remote(indptr, indices, values, y_indptr, y_indices) for a in self.group.actors]
        reports = self.group.get(refs)
        self.serving_report = reports[0] if len(reports) == 1 else {"shards": reports}
        return self.serving_report


def merge_predictions(parts: Sequence[tuple], k: int) -> Predictions:
    """The top k of the shards' candidates (labels, scores, n_scored, mode per shard), by score; ties go to
    the lower shard, then to the order within a shard."""
    labels = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    n_scored = np.sum([p[2] for p in parts], axis=0).astype(np.int64)
    used = "lsh" if any(p[3] == "lsh" for p in parts) else "exact"
    return Predictions(
        np.take_along_axis(labels, order, axis=1).astype(np.int32),
        np.take_along_axis(scores, order, axis=1).astype(np.float32),
        n_scored,
        used,
    )


class DistributedTrainer(Trainer):
    """A Trainer whose model is sharded over P Ray actors by output label (see the module docstring).

    `run`, metrics, validation, early stopping and snapshots are the Trainer's; `close()` stops the actors.
    With one shard the numbers are those of the single-process Trainer, bit for bit (threads fixed)."""

    def __init__(
        self,
        config: SlideConfig,
        train: Dataset,
        test: Dataset | None = None,
        store: SnapshotStore | None = None,
        shards: int = 1,
        address: str = "local",
        actor_options: dict | None = None,
        _group: ShardGroup | None = None,
    ):
        # the shards train the softmax (shard_config refuses "sigmoid"): the run's config and snapshots say so
        config = config.replace(model=config.model.replace(loss=shard_config(config, train.num_labels).model.loss))
        group = _group or ShardGroup.start(config, train, shards, address, actor_options=actor_options)
        self.group = group
        self.stage_seconds: dict[str, float] = {}
        """Driver seconds per stage of the steps so far (the shards' compute plus Ray's calls), for benchmarks."""
        try:
            model = ShardedModel(group, config, train.num_features, train.num_labels)
            super().__init__(config, train, test, store, model=model)  # type: ignore[arg-type]
        except BaseException:
            group.close()
            raise

    def _retired_labels(self) -> np.ndarray | None:
        return None  # labels are not added or retired in a sharded run

    # the optimizer's state lives in the shards
    def _init_optimizer(self, state: LazyAdamState | None = None) -> None:
        return None

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("a sharded model's arrays live in its shards: see publish()")

    def resolved(self) -> Resolved:
        """Shard 0's resolved settings (its output layer is its slice), with every shard's label count."""
        first: Resolved = self.group.each("resolved", [()] * self.group.shards)[0]
        return dataclasses.replace(
            first,
            sample_output=bool(self.model.layer_slot[-1] >= 0),
            shard_labels=tuple(hi - lo for lo, hi in self.group.ranges),
        )

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, points: np.ndarray) -> tuple[float, int, float]:
        cfg, group = self.config, self.group
        points = np.ascontiguousarray(points, dtype=np.int64)
        b = points.shape[0]
        if not 1 <= b <= cfg.optimizer.batch_size:
            raise ValueError(f"a batch holds 1 to batch_size={cfg.optimizer.batch_size} points, got {b}")
        self._lr = self.step_size()
        pending = group._inflight
        group._inflight = []
        clock = self.stage_seconds
        t0 = time.perf_counter()
        if pending:  # the previous step's backward stage: its answers come back before this step's
            refs = pending + [a.call.remote("forward", points, self._lr) for a in group.actors]
            answers = group.get(refs)
            self.rehash_round, self.next_rehash_step = answers[0]
            tops = answers[len(pending) :]
        else:
            tops = group.all("forward", points, self._lr)
        top = tops[0] if len(tops) == 1 else np.max(np.stack(tops), axis=0)
        t1 = time.perf_counter()
        sums = group.all("exps", top)
        total = sums[0]
        for s in sums[1:]:
            total = total + s
        t2 = time.perf_counter()
        parts = group.all("update", total)
        losses = parts[0][0]
        grads = parts[0][1]
        for part in parts[1:]:
            losses = losses + part[0]
            grads = grads + part[1]
        grads_ref = group.put(grads)
        group.submit("backward", grads_ref)
        t3 = time.perf_counter()
        for stage, seconds in (("backward+forward", t1 - t0), ("exps", t2 - t1), ("update", t3 - t2)):
            clock[stage] = clock.get(stage, 0.0) + seconds
        p = group.shards
        # sent: points, max, sum and summed gradients to every shard; received: maxima, sums, losses, gradients
        group.bytes_sent += p * (_nbytes([points, top, total, grads]) + 8) + _nbytes(
            [*tops, *sums, *(q[0] for q in parts), *(q[1] for q in parts)]
        )
        self.step += 1
        self.samples_seen += b
        labelled = int(np.count_nonzero(self._labelled[points]))
        out_active = float(sum(q[2] for q in parts))
        return float(losses.astype(np.float32).sum()), labelled, out_active

    def rehash(self) -> int:
        """Shards rehash their own layers on their own schedule (the same for all of them)."""
        return 0

    def sync(self) -> None:
        """Wait for the step in flight; the shards' rehash counters become the driver's."""
        answers = self.group.flush()
        if answers:
            self.rehash_round, self.next_rehash_step = answers[0]

    # ---- selection and serving ----------------------------------------------------------------
    def validate(self, loss: float | None = None) -> dict:
        self.sync()
        raises = self.dropout_raises
        out = super().validate(loss)
        if self.dropout_raises != raises:  # the shards' next forward pass drops at the new rate
            self._sync_schedule()
        return out

    def _sync_schedule(self) -> None:
        self.group.all("sync", self.lr_decays, self.evals_since_best, self.early_stopped, self.dropout_raises)

    def _restore_best(self) -> None:
        if self._serves_best():
            self.group.all("restore_best")
            self._serving_hubs_step = -1

    def _keep_best(self) -> None:
        self.group.all("set_best", self.best, True)
        self._best_arrays = {}  # the copies live in the shards
        self._best_serving = dict(self.model.serving_report)

    def best_model(self) -> Any:
        if not self._serves_best():
            return self.model
        model = ShardedModel(self.group, self.config, self.model.num_features, self.model.num_labels, best=True)
        model.serving_report = self._best_serving
        model.featurizer, model.label_names = self.model.featurizer, self.model.label_names
        return model

    def refresh_serving_hubs(self) -> None:
        if self._serving_hubs_step == self.step:
            return
        self.sync()
        self.group.all("refresh_serving_hubs")
        self._serving_hubs_step = self.step

    def publish(self) -> tuple[int, Path] | None:
        """A sharded version: each shard writes its slice into the version's directory (shared storage), the
        manifest lists them with the run's progress."""
        if self.store is None:
            return None
        self.sync()
        self.refresh_serving_hubs()
        self._sync_schedule()
        state = self.state()
        serving = self.model.serving_report
        if self._serves_best():
            state["training_arrays"] = TRAINING_ARRAYS
            serving = self._best_serving
        meta = self._snapshot_meta(state, serving)
        arrays: dict[str, np.ndarray] = {}
        if self.model.featurizer is not None:
            meta["text"] = self.model.featurizer.meta()
            arrays.update(self.model.featurizer.to_arrays())
        if self.model.label_names is not None:
            arrays.update(self.model.label_names.to_arrays())

        def write_shards(tmp: Path) -> dict:
            args = [(str(tmp / SHARD_DIR.format(p)),) for p in range(self.group.shards)]
            return {"shards": self.group.each("write", args)}

        return self.store.publish(arrays, meta, parts=write_shards)

    # ---- resume and shutdown ------------------------------------------------------------------
    @classmethod
    def resume(  # type: ignore[override]
        cls,
        store: SnapshotStore,
        train: Dataset,
        test: Dataset | None = None,
        shards: int | None = None,
        address: str = "local",
        actor_options: dict | None = None,
    ) -> DistributedTrainer:
        """A trainer continuing from the newest (sharded) snapshot in `store`, with as many shards as it has."""
        latest = store.latest()
        if latest is None:
            raise FileNotFoundError(f"no snapshot to resume from in {store.root}")
        _, path = latest
        manifest = read_manifest(path)
        entries = manifest.get("shards")
        if not entries:
            raise ValueError(f"{path} is a single-process snapshot: resume it without --shards")
        if shards is not None and shards != len(entries):
            raise ValueError(f"{path} has {len(entries)} shards; resume it with --shards {len(entries)}")
        config = manifest_config(manifest)
        if (manifest["num_features"], manifest["num_labels"]) != (train.num_features, train.num_labels):
            raise ValueError("the training set's dimensions differ from the snapshot's")
        st = manifest["trainer_state"]
        group = ShardGroup.start(config, train, len(entries), address, path, st, actor_options)
        trainer = cls(config, train, test, store, _group=group)
        from ..progress import TrainingMetrics
        from ..snapshot import attach_text, load_arrays

        attach_text(trainer.model, manifest, load_arrays(path))
        trainer.best = st.get("best")
        trainer.evals_since_best = int(st.get("evals_since_best", 0))
        trainer.lr_decays = int(st.get("lr_decays", 0))
        trainer.lr_epochs_before = float(st.get("lr_epochs_before", 0.0))
        trainer.dropout_raises = min(int(st.get("dropout_raises", 0)), len(trainer._dropout_rates) - 1)
        trainer.early_stopped = bool(st.get("early_stopped", False))
        if trainer.best is not None:
            trainer._best_arrays = {}
            trainer._best_serving = dict(manifest.get("serving", {}))
        trainer.model.serving_report = dict(manifest.get("serving", {}))
        for key in ("step", "epoch", "batch_in_epoch", "samples_seen", "rehash_round", "next_rehash_step"):
            setattr(trainer, key, int(st[key]))
        trainer.train_seconds = float(st["train_seconds"])
        trainer.history = [TrainingMetrics.from_dict(h) for h in st.get("history", [])]
        return trainer

    def shard_timings(self) -> list[dict[str, float]]:
        """Each shard's compute seconds per stage so far (see `stage_seconds` for the driver's view)."""
        self.sync()
        return self.group.get([a.timings.remote() for a in self.group.actors])

    def close(self) -> None:
        self.group.close()

    def __enter__(self) -> DistributedTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether a snapshot version was written by sharded training."""
    return bool(read_manifest(path).get("shards"))


__all__ = [
    "DistributedTrainer",
    "ShardGroup",
    "ShardLostError",
    "ShardedModel",
    "connect",
    "is_sharded",
    "merge_predictions",
    "require_ray",
]
