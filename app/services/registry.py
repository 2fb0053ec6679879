"""Model registry: the newest snapshot of each job's model, memory-mapped read-only, swapped when a newer one
is published (a label edit's delta version applied to the model held, see engine.delta).

A request takes a reference to the current `(version, SlideModel)` pair and predicts with it; a newer version
replaces the pair for later requests while earlier ones finish on the old maps (the kernel keeps unlinked
files alive while they are mapped). Nothing is copied per request.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

import engine
from app.domain import ACTIVE_STATES
from app.services.errors import Conflict, InvalidContent, NotFound, NotReady, ServiceError
from app.settings import Settings

log = logging.getLogger("app.registry")


def _threadsafe_numba() -> bool:
    """Numba's fallback `workqueue` threading layer aborts the process when two threads run parallel kernels at
    once; TBB and OpenMP do not. Predict requests run in a thread pool, so without either they take turns."""
    import numba

    if numba.config.THREADING_LAYER == "workqueue":
        return False
    for module in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            continue
    return False


@dataclass(frozen=True)
class LoadedModel:
    job_id: str
    version: int
    model: Any  # engine.SlideModel
    loaded_at: float
    owned_bytes: int = 0
    """Bytes the model holds in process memory beyond its mapped snapshot files (engine.owned_bytes)."""


@dataclass(frozen=True)
class PredictResult:
    version: int
    mode: Literal["lsh", "exact"]
    """The mode that answered (a request's `auto` resolves to one of them)."""
    labels: list[list[int]]
    scores: list[list[float]]
    num_labels: int = 0
    """The model's number of labels (k is capped at it)."""
    names: list[list[str | None]] | None = None
    notes: list[str | None] | None = None


PINNED_CACHE = 8
"""Most exact versions (pinned by an alias, or asked for by number) held loaded at once, besides each newest;
fewer when they hold more than Settings.pinned_cache_memory beyond their mapped files."""
NEGLIGIBLE_BYTES = 4096
"""A cached version holding no more than this beyond its mapped files (a page) frees nothing when dropped."""
INLINE_MAX_NNZ = 4096
"""Most feature ids of one instance answered on the event loop."""
INLINE_MAX_EXACT_WEIGHTS = 1 << 21
"""Largest output layer (labels x inputs) scored exactly on the event loop (~0.5 ms a query on one core)."""


def _mtime_ns(path: Any) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


class ModelRegistry:
    def __init__(self, settings: Settings, check_interval_s: float = 0.0):
        self.settings = settings
        self.check_interval_s = check_interval_s
        self._models: dict[str, LoadedModel] = {}
        self._checked: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._predict_guard: Any = nullcontext() if _threadsafe_numba() else threading.Lock()
        self.concurrency = settings.predict_concurrency or max(2, 2 * (os.cpu_count() or 1))
        self._limiter: Any = None
        self._versions: dict[tuple[str, int], LoadedModel] = {}  # insertion order = least recently used first
        self._names: dict[str, tuple[float, Any]] = {}  # dataset dir -> (mtime of text.json, LabelNames)
        self._listed: dict[str, int] = {}  # job id -> mtime (ns) of its snapshot dir when its newest was last found
        self._dataset_dirs: dict[str, Any] = {}  # job id -> its training dataset's dir (label names), once looked up
        if not isinstance(self._predict_guard, nullcontext):
            log.warning("Numba has no thread-safe threading layer (TBB or OpenMP): predictions run one at a time")

    def _lock_for(self, job_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(job_id, threading.Lock())

    def current(self, job_id: str, job_state: str | None = None) -> LoadedModel:
        """The newest published version (loading it if it is newer than the one held). Blocking. Without a snapshot:
        NotReady while the job (in `job_state`) is queued or training, else Conflict (none will come)."""
        held = self._models.get(job_id)
        if held is not None and time.monotonic() - self._checked.get(job_id, 0.0) < self.check_interval_s:
            return held
        store = engine.SnapshotStore(self.settings.snapshots_dir(job_id))
        listed_at = _mtime_ns(store.root)  # before listing: a version published meanwhile changes it again
        latest = store.latest()
        self._checked[job_id] = time.monotonic()
        if latest is None:
            if held is not None:
                return held
            if job_state is not None and job_state not in ACTIVE_STATES:
                raise Conflict(
                    f"model {job_id} has no snapshot and its job is {job_state}, so none is coming: resume the job "
                    f"(POST /v1/jobs/{job_id}/resume) or start a new one (POST /v1/jobs)",
                    state=job_state,
                )
            raise NotReady(
                f"model {job_id} has no snapshot yet: its job publishes the first one within "
                f"{self.settings.snapshot_interval_s:g}s of training (SLIDE_SNAPSHOT_INTERVAL_S); retry then",
                retry_after_s=max(1, int(min(self.settings.snapshot_interval_s, 30))),
            )
        if held is not None and held.version >= latest[0]:
            self._listed[job_id] = listed_at
            return held
        with self._lock_for(job_id):
            held = self._models.get(job_id)
            if held is not None and held.version >= latest[0]:
                return held
            loaded = self._load(job_id, store, held)
            self._models[job_id] = loaded
            if loaded.version >= latest[0]:
                self._listed[job_id] = listed_at
            return loaded

    def held_current(self, job_id: str) -> LoadedModel | None:
        """The model `current` would answer with, when that is known without reading the snapshot dir: it is held
        and the dir has not changed since its newest version was found (one stat). A dir changed within the last
        second is listed again (`current`), since file systems stamp times coarsely. None otherwise."""
        held = self._models.get(job_id)
        listed = self._listed.get(job_id)
        if held is None or listed is None:
            return None
        now_ns = time.time_ns()
        mtime = _mtime_ns(self.settings.snapshots_dir(job_id))
        if mtime != listed or now_ns - mtime < 1_000_000_000:
            return None
        return held

    def held_version(self, job_id: str, version: int) -> LoadedModel | None:
        """Exactly `version` when it is held or cached (no disk access), else None (`version` loads it)."""
        held = self._models.get(job_id)
        if held is not None and held.version == version:
            return held
        with self._guard:
            return self._versions.get((job_id, int(version)))

    def remember_dataset_dir(self, job_id: str, dataset_dir: Any) -> None:
        """The job's training dataset dir (where label names may be stored), as its row said."""
        self._dataset_dirs[job_id] = dataset_dir

    def dataset_dir(self, job_id: str) -> Any:
        return self._dataset_dirs.get(job_id)

    def predicts_inline(self, loaded: LoadedModel, instances: list[Any], mode: str, max_instances: int) -> bool:
        """Whether a request is small enough to answer on the event loop (no thread hop): at most `max_instances`
        instances of at most INLINE_MAX_NNZ feature ids (texts are bounded by their schema), scored through the
        hash tables or against an output layer of at most INLINE_MAX_EXACT_WEIGHTS weights: well under a
        millisecond each. Never when predictions must take turns (no thread-safe Numba layer)."""
        if not isinstance(self._predict_guard, nullcontext) or not 0 < len(instances) <= max_instances:
            return False
        for inst in instances:
            if not isinstance(inst, str) and len(inst[0]) > INLINE_MAX_NNZ:
                return False
        model = loaded.model
        if model.resolve_mode(mode)[1] == "lsh":
            return True
        return int(model.weights[-1].size) <= INLINE_MAX_EXACT_WEIGHTS

    def _load(self, job_id: str, store: Any, held: LoadedModel | None) -> LoadedModel:
        last_exc: Exception | None = None
        for _ in range(3):  # a version can be pruned between listing and opening: take the next newest
            latest = store.latest()
            if latest is None:
                break
            version, path = latest
            try:  # a label edit (a delta version) is applied to the version held, which stays as it is
                model = engine.load_model(path, mmap=True, base=held.model if held is not None else None)
            except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: engine.snapshot.SnapshotError
                log.warning(
                    "model %s: snapshot v%d could not be opened: %s: %s", job_id, version, type(exc).__name__, exc
                )
                last_exc = exc
                continue
            log.info("model %s: serving snapshot v%d", job_id, version)
            return LoadedModel(job_id, int(version), model, time.time())
        if held is not None:
            return held
        raise NotReady(
            f"model {job_id}: its newest snapshot could not be opened ({last_exc}); retry shortly", retry_after_s=1
        )

    @property
    def limiter(self) -> Any:
        """An anyio CapacityLimiter of `concurrency` threads for predict requests (made on first use, in the event
        loop). In the default thread pool (40) every concurrent request would hold its own scratch buffers and
        thread: 64 concurrent lsh queries at 670k labels cost ~200 MB more than with 4-8 slots, for no more
        throughput."""
        if self._limiter is None:
            import anyio

            self._limiter = anyio.CapacityLimiter(self.concurrency)
        return self._limiter

    def version(self, job_id: str, version: int) -> LoadedModel:
        """Exactly `version` of a model (the newest held, a cached one, or loaded now). Raises VersionGone when it
        is not on disk (never published, or pruned). Blocking."""
        held = self._models.get(job_id)
        if held is not None and held.version == version:
            return held
        key = (job_id, int(version))
        with self._guard:
            cached = self._versions.pop(key, None)
            if cached is not None:
                self._versions[key] = cached
                return cached
        store = engine.SnapshotStore(self.settings.snapshots_dir(job_id))
        path = store.path(int(version))
        try:
            model = engine.load_model(path, mmap=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise VersionGone(job_id, int(version), store.versions()) from exc
        loaded = LoadedModel(job_id, int(version), model, time.time(), engine.owned_bytes(model))
        with self._guard:
            self._versions[key] = loaded
            while len(self._versions) > PINNED_CACHE:
                self._versions.pop(next(iter(self._versions)))
            budget = int(self.settings.pinned_cache_memory)
            holding = [k for k, v in self._versions.items() if v.owned_bytes > NEGLIGIBLE_BYTES and k != key]
            while holding and sum(v.owned_bytes for v in self._versions.values()) > budget:
                self._versions.pop(holding.pop(0))  # the least recently used that frees memory
        return loaded

    def cached_versions(self) -> list[tuple[str, int, int]]:
        """(job id, version, bytes it holds beyond its mapped files) of the exact versions cached for pinned
        requests, least recently used first."""
        with self._guard:
            return [(v.job_id, v.version, v.owned_bytes) for v in self._versions.values()]

    def label_names(self, loaded: LoadedModel, dataset_dir: Any = None) -> Any:
        """The model's label names: its snapshot's, else those stored with its training dataset (named after the
        job started); None when neither has any."""
        if loaded.model.label_names is not None or dataset_dir is None:
            return loaded.model.label_names
        from pathlib import Path

        meta = Path(dataset_dir) / "text.json"
        try:
            mtime = meta.stat().st_mtime
        except OSError:
            return None
        cached = self._names.get(str(dataset_dir))
        if cached is not None and cached[0] == mtime:
            names = cached[1]
        else:
            from engine.text import load_text_info

            try:
                names = load_text_info(dataset_dir)[1]
            except (OSError, ValueError):
                return None
            self._names[str(dataset_dir)] = (mtime, names)
        if names is not None and len(names) != int(loaded.model.num_labels):
            return None
        return names

    def refresh(self, job_id: str, job_state: str | None = None) -> LoadedModel:
        """The newest version, looked for now (after a publication of this process): `current` without waiting for
        its check interval; a label edit's delta is applied to the version held."""
        self._checked.pop(job_id, None)
        self._listed.pop(job_id, None)
        return self.current(job_id, job_state)

    def peek(self, job_id: str) -> LoadedModel | None:
        return self._models.get(job_id)

    def evict(self, job_id: str) -> None:
        self._models.pop(job_id, None)
        self._checked.pop(job_id, None)
        self._listed.pop(job_id, None)
        self._dataset_dirs.pop(job_id, None)
        with self._guard:
            for key in [k for k in self._versions if k[0] == job_id]:
                self._versions.pop(key, None)

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    # ---- prediction -----------------------------------------------------------------------------------
    def predict(
        self,
        job_id: str,
        instances: list[Any],
        k: int,
        mode: str,
        *,
        version: int | None = None,
        loaded: LoadedModel | None = None,
        names_from: Any = None,
        job_state: str | None = None,
    ) -> PredictResult:
        """Validate against the model's dimensions (errors name the instance and position), build CSR arrays,
        predict with the current model (or exactly `version`, or `loaded`). An instance is `(indices, values)` or
        a text `str` (featurized with the model's own featurizer). CPU work: call from a thread, never from
        `async def`."""
        st = self.settings
        if len(instances) > st.predict_max_instances:
            raise InvalidContent(
                f"instances: at most {st.predict_max_instances} per request "
                f"(SLIDE_PREDICT_MAX_INSTANCES); got {len(instances)}",
                loc=("body", "instances"),
            )
        if k > st.predict_max_k:
            raise InvalidContent(f"k: at most {st.predict_max_k} (SLIDE_PREDICT_MAX_K); got {k}", loc=("body", "k"))
        if loaded is None:
            loaded = self.current(job_id, job_state) if version is None else self.version(job_id, version)
        model = loaded.model
        num_features = int(model.num_features)
        texts = [i for i, inst in enumerate(instances) if isinstance(inst, str)]
        unknown_words: set[int] = set()
        if texts:
            featurizer = model.featurizer
            if featurizer is None:
                raise InvalidContent(
                    f"instances[{texts[0]}].text: model {job_id} was not trained on a text dataset, so it has no "
                    "featurizer; send `indices` and `values`",
                    loc=("body", "instances", texts[0], "text"),
                )
            rows = []
            for i, inst in enumerate(instances):
                if isinstance(inst, str):
                    ids, vals = featurizer.transform_one(inst)
                    if ids.size == 0:
                        unknown_words.add(i)
                    rows.append((ids, vals))
                else:
                    rows.append((np.asarray(inst[0], dtype=np.int64), np.asarray(inst[1], dtype=np.float32)))
            lengths = np.fromiter((len(r[0]) for r in rows), dtype=np.int64, count=len(rows))
            indptr = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=indptr[1:])
            indices = np.concatenate([r[0] for r in rows]).astype(np.int64, copy=False)
            values = np.concatenate([r[1] for r in rows]).astype(np.float32, copy=False)
        else:
            lengths = np.fromiter((len(ix) for ix, _ in instances), dtype=np.int64, count=len(instances))
            indptr = np.zeros(len(instances) + 1, dtype=np.int64)
            np.cumsum(lengths, out=indptr[1:])
            nnz = int(indptr[-1])
            indices = np.fromiter((i for ix, _ in instances for i in ix), dtype=np.int64, count=nnz)
            values = np.fromiter((v for _, vs in instances for v in vs), dtype=np.float32, count=nnz)
        bad = np.flatnonzero(indices >= num_features)
        if bad.size:
            pos = int(bad[0])
            row = int(np.searchsorted(indptr, pos, side="right") - 1)
            raise InvalidContent(
                f"instances[{row}].indices[{pos - int(indptr[row])}]: feature id {int(indices[pos])} is out of range; "
                f"model {job_id} has {num_features} features (ids 0..{num_features - 1})",
                loc=("body", "instances", row, "indices", pos - int(indptr[row])),
            )
        kk = min(int(k), int(model.num_labels))
        with self._predict_guard:
            labels, scores, _, used = model.predict_with_stats(
                indptr, indices.astype(np.int32), values, k=kk, mode=mode
            )
        labels = np.asarray(labels)
        scores = np.asarray(scores)
        out_labels: list[list[int]] = []
        out_scores: list[list[float]] = []
        notes: list[str | None] = []
        for r in range(labels.shape[0]):
            keep = labels[r] >= 0
            out_labels.append(labels[r][keep].tolist())
            out_scores.append([float(x) for x in scores[r][keep]])
            notes.append(_note(len(out_labels[-1]), int(k), int(model.num_labels), mode, r in unknown_words))
        names = self.label_names(loaded, names_from)
        out_names = [names.names(row) for row in out_labels] if names is not None else None
        return PredictResult(
            loaded.version,
            "lsh" if used == "lsh" else "exact",
            out_labels,
            out_scores,
            int(model.num_labels),
            out_names,
            notes,
        )


def _note(returned: int, k: int, num_labels: int, mode: str, no_known_words: bool) -> str | None:
    parts = []
    if no_known_words:
        parts.append("no word of the text is in the model's vocabulary, so the labels come from the biases alone")
    if returned < k:
        if returned == num_labels:
            parts.append(f"{returned} of k={k} labels: the model has only {num_labels} labels")
        else:
            parts.append(
                f"{returned} of k={k} labels: the hash tables retrieved only {returned} candidate labels in "
                f"{mode} mode; mode=exact scores every label"
            )
    return "; ".join(parts) or None


class VersionGone(NotFound):
    """A version that is not (or no longer) on disk."""

    def __init__(self, job_id: str, version: int, retained: list[int]):
        ServiceError.__init__(
            self,
            f"model {job_id} has no version {version}: it was never published or has been pruned (retained: "
            f"{retained or 'none'}); pin a version with an alias to keep it",
            resource="model version",
            id=f"{job_id}/v{version}",
            retained=retained,
        )
