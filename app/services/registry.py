"""Model registry: the newest snapshot of each job's model, memory-mapped read-only, swapped when a newer one
is published.

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
from app.services.errors import Conflict, InvalidContent, NotReady
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


@dataclass(frozen=True)
class PredictResult:
    version: int
    mode: Literal["lsh", "exact"]
    """The mode that answered (a request's `auto` resolves to one of them)."""
    labels: list[list[int]]
    scores: list[list[float]]
    num_labels: int = 0
    """The model's number of labels (k is capped at it)."""


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
            return held
        with self._lock_for(job_id):
            held = self._models.get(job_id)
            if held is not None and held.version >= latest[0]:
                return held
            loaded = self._load(job_id, store, held)
            self._models[job_id] = loaded
            return loaded

    def _load(self, job_id: str, store: Any, held: LoadedModel | None) -> LoadedModel:
        last_exc: Exception | None = None
        for _ in range(3):  # a version can be pruned between listing and opening: take the next newest
            latest = store.latest()
            if latest is None:
                break
            version, path = latest
            try:
                model = engine.load_model(path, mmap=True)
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

    def peek(self, job_id: str) -> LoadedModel | None:
        return self._models.get(job_id)

    def evict(self, job_id: str) -> None:
        self._models.pop(job_id, None)
        self._checked.pop(job_id, None)

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    # ---- prediction -----------------------------------------------------------------------------------
    def predict(
        self,
        job_id: str,
        instances: list[tuple[list[int], list[float]]],
        k: int,
        mode: str,
        job_state: str | None = None,
    ) -> PredictResult:
        """Validate against the model's dimensions (errors name the instance and position), build CSR arrays,
        predict with the current model. CPU work: call from a thread, never from `async def`."""
        st = self.settings
        if len(instances) > st.predict_max_instances:
            raise InvalidContent(
                f"instances: at most {st.predict_max_instances} per request "
                f"(SLIDE_PREDICT_MAX_INSTANCES); got {len(instances)}",
                loc=("body", "instances"),
            )
        if k > st.predict_max_k:
            raise InvalidContent(f"k: at most {st.predict_max_k} (SLIDE_PREDICT_MAX_K); got {k}", loc=("body", "k"))
        loaded = self.current(job_id, job_state)
        model = loaded.model
        num_features = int(model.num_features)
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
        for r in range(labels.shape[0]):
            keep = labels[r] >= 0
            out_labels.append(labels[r][keep].tolist())
            out_scores.append([float(x) for x in scores[r][keep]])
        return PredictResult(
            loaded.version, "lsh" if used == "lsh" else "exact", out_labels, out_scores, int(model.num_labels)
        )
