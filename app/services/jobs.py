"""Training jobs: the API-facing service (create / stop / resume / delete) and the supervisor that runs them.

State lives in the database, so any API process can take a request; one process per data dir (the holder of
`<data_dir>/supervisor.lock`) runs the supervisor thread, which starts queued jobs, each in its own process
(multiprocessing spawn context, see `app.services.worker`), notices processes that died and recovers jobs
that were training when the service went down.

States: queued -> running -> (stopping ->) stopped | completed | failed; `interrupted` when the service went
down mid-training (resumed automatically at start-up when `auto_resume` is on). stopped, failed and
interrupted jobs can be resumed from their last snapshot, under the same id.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

import engine
from app.db import AliasRow, Database, DatasetRow, JobRow, MetricRow, ModelVersionRow, utcnow
from app.domain import BACKEND, INIT_FROM, RESUMABLE_STATES, TERMINAL_STATES, TRAINING_STATES, JobSpec, JobState
from app.services.admission import QueueSlot, check_fits, estimate_job, plan_queue, shard_estimate
from app.services.errors import Conflict, InvalidContent, NotFound, require_id
from app.services.worker import LOG_FILE, run_job
from app.settings import Settings
from engine import ConfigError, SlideConfig
from engine.distributed.shard import shard_config
from engine.memory import MemoryEstimate
from engine.resolve import resolve
from engine.snapshot import manifest_config, read_manifest
from engine.warmstart import warm_start_config

log = logging.getLogger("app.jobs")


def _transition(s: Any, job_id: str, from_states: tuple[JobState, ...], **values: Any) -> bool:
    """Compare-and-set on the state column: concurrent writers (API, supervisor, trainer) never undo each other."""
    result = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state.in_(from_states)).values(**values))
    return bool(result.rowcount > 0)


class JobService:
    def __init__(self, settings: Settings, db: Database, supervisor: Supervisor):
        self.settings = settings
        self.db = db
        self.supervisor = supervisor

    # ---- create ---------------------------------------------------------------------------------------
    def create(
        self,
        train_dataset_id: str,
        eval_dataset_id: str | None,
        config: dict[str, Any],
        idempotency_key: str | None = None,
        init_from: dict[str, Any] | None = None,
        backend: dict[str, Any] | None = None,
    ) -> tuple[JobRow, bool]:
        """Returns (job, created). The same Idempotency-Key with the same request returns the first job.
        init_from: {"model_id", "version"} of a model to start from (version None = its newest). backend: {"kind":
        "local" | "ray", "shards": P} (None = local)."""
        backend = backend if backend is not None and backend.get("kind") == "ray" else None
        request = {"train": train_dataset_id, "eval": eval_dataset_id, "config": config, "init_from": init_from}
        if backend is not None:
            request["backend"] = backend
        request_hash = hashlib.sha256(
            json.dumps(
                request,
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()
        if idempotency_key is not None:
            existing = self._by_key(idempotency_key, request_hash)
            if existing is not None:
                return existing, False
        try:
            cfg = SlideConfig.from_dict(config)
        except ConfigError as exc:
            message = str(exc).split(": ", 1)[-1]
            raise InvalidContent(
                f"config.{exc.field}: {message}", loc=("body", "config", *exc.field.split("."))
            ) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidContent(f"config: {exc}", loc=("body", "config")) from exc
        if cfg.threads is None and self.settings.trainer_threads:
            cfg = cfg.replace(threads=self.settings.trainer_threads)
        with self.db.session() as s:
            train = s.get(DatasetRow, train_dataset_id) if _is_id(train_dataset_id) else None
            if train is None:
                raise InvalidContent(
                    f"train_dataset_id: no dataset with id {train_dataset_id!r}; upload one with POST /v1/datasets",
                    loc=("body", "train_dataset_id"),
                )
            test = None
            if eval_dataset_id is not None:
                test = s.get(DatasetRow, eval_dataset_id) if _is_id(eval_dataset_id) else None
                if test is None:
                    raise InvalidContent(
                        f"eval_dataset_id: no dataset with id {eval_dataset_id!r}", loc=("body", "eval_dataset_id")
                    )
                if test.num_features > train.num_features or test.num_labels > train.num_labels:
                    raise InvalidContent(
                        f"eval_dataset_id: the eval set has {test.num_features} features and {test.num_labels} "
                        f"labels but the training set only {train.num_features} and {train.num_labels}; they must "
                        "share one feature and label space",
                        loc=("body", "eval_dataset_id"),
                    )
        shards = self._check_backend(backend, init_from, train.num_labels, cfg)
        source = self._source(init_from, cfg) if init_from is not None else None
        if source is not None:
            cfg = source[2]  # the structure settings are the source's
        else:
            try:  # the settings that depend on the data's shape (a layer's auto tables bound active_threshold)
                resolve(cfg, train.num_features, train.num_labels, train.num_points)
            except ConfigError as exc:
                message = str(exc).split(": ", 1)[-1]
                raise InvalidContent(
                    f"config.{exc.field}: {message}", loc=("body", "config", *exc.field.split("."))
                ) from exc
        check_fits(cfg, train, test, self.settings, init_from=str(source[1]) if source else None, shards=shards)
        job = JobRow(
            id=uuid.uuid4().hex,
            train_dataset_id=train_dataset_id,
            eval_dataset_id=eval_dataset_id,
            config=cfg.to_dict(),
            state=JobState.QUEUED,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            step=0,
            epoch=0,
            samples=0,
            runs=0,
            interruptions=0,
        )
        try:
            with self.db.session() as s:
                s.add(job)
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self._by_key(idempotency_key, request_hash)  # lost a race with the same key
            if existing is None:
                raise
            return existing, False
        self.settings.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        if shards:
            (self.settings.job_dir(job.id) / BACKEND).write_text(json.dumps({"kind": "ray", "shards": shards}))
        if source is not None and init_from is not None:
            model_id, version = init_from["model_id"], source[0]
            # the source version stays on disk until this job is deleted (a queued job reads it when it starts)
            engine.SnapshotStore(self.settings.snapshots_dir(model_id)).pin(f"init-{job.id}", version)
            info = {"model_id": model_id, "version": version, "path": str(source[1])}
            (self.settings.job_dir(job.id) / INIT_FROM).write_text(json.dumps(info))
        self.supervisor.wake()
        log.info("job %s queued on dataset %s", job.id, train_dataset_id)
        return job, True

    def _source(self, init_from: dict[str, Any], cfg: SlideConfig) -> tuple[int, Path, SlideConfig]:
        """(version, path, the job's config with the source's structure) of a job's `init_from`; 422 naming the
        field when the model or version does not exist."""
        model_id, version = init_from.get("model_id"), init_from.get("version")
        if not isinstance(model_id, str) or not _is_id(model_id):
            raise InvalidContent(f"init_from.model_id: no model {model_id!r}", loc=("body", "init_from", "model_id"))
        with self.db.session() as s:
            if s.get(JobRow, model_id) is None:
                raise InvalidContent(
                    f"init_from.model_id: no model {model_id!r}", loc=("body", "init_from", "model_id")
                )
        store = engine.SnapshotStore(self.settings.snapshots_dir(model_id))
        if version is None:
            latest = store.latest()
            if latest is None:
                raise InvalidContent(
                    f"init_from.model_id: model {model_id} has no snapshot yet to start from",
                    loc=("body", "init_from", "model_id"),
                )
            version = latest[0]
        path = store.path(int(version))
        try:
            manifest = read_manifest(path)
        except engine.SnapshotError:
            raise InvalidContent(
                f"init_from.version: model {model_id} has no version {version} (retained: {store.versions()})",
                loc=("body", "init_from", "version"),
            ) from None
        if manifest.get("shards"):
            raise InvalidContent(
                f"init_from.model_id: model {model_id} was trained on Ray label shards; fine-tuning starts from a "
                "model trained on this machine",
                loc=("body", "init_from", "model_id"),
            )
        return int(version), path, warm_start_config(manifest_config(manifest), cfg, int(manifest["num_labels"]))

    def _check_backend(
        self, backend: dict[str, Any] | None, init_from: dict[str, Any] | None, labels: int, cfg: SlideConfig
    ) -> int:
        """A job's label shards on Ray (0 = it trains on this machine); 422 when this service has no Ray cluster, or
        for what shards cannot train (more shards than labels, a warm start, a setting shard_config refuses)."""
        if backend is None:
            return 0
        shards = int(backend.get("shards", 1))
        if self.settings.ray_address is None:
            raise InvalidContent(
                "backend.kind: this service has no Ray cluster for ray jobs. Start it with SLIDE_RAY_ADDRESS set "
                "(ray://head:10001 for a cluster, e.g. KubeRay's head service, or local to start Ray on this "
                "machine) and the ray extra installed (pip install -e '.[ray]'), or leave backend out to train here",
                loc=("body", "backend", "kind"),
            )
        if importlib.util.find_spec("ray") is None:
            raise InvalidContent(
                "backend.kind: SLIDE_RAY_ADDRESS is set but Ray is not installed: pip install -e '.[ray]'",
                loc=("body", "backend", "kind"),
            )
        if shards > labels:
            raise InvalidContent(
                f"backend.shards: {shards} shards for {labels} labels; a shard needs at least one label",
                loc=("body", "backend", "shards"),
            )
        if init_from is not None:
            raise InvalidContent(
                "backend: init_from (fine-tuning) trains on this machine only; leave one of them out",
                loc=("body", "backend", "kind"),
            )
        try:
            shard_config(cfg, labels)
        except ConfigError as exc:
            raise InvalidContent(
                f"config.{exc} (a job on Ray label shards)", loc=("body", "config", *exc.field.split("."))
            ) from exc
        return shards

    def backend(self, job_id: str) -> dict[str, Any]:
        """Where a job trains: {"kind": "local" | "ray", "shards": P}."""
        try:
            info = json.loads((self.settings.job_dir(job_id) / BACKEND).read_text())
            return {"kind": "ray", "shards": int(info["shards"])}
        except (OSError, ValueError, KeyError, TypeError):
            return {"kind": "local", "shards": 1}

    def shards(self, job_id: str) -> int:
        """A ray job's label shards; 0 for a job that trains on this machine."""
        backend = self.backend(job_id)
        return int(backend["shards"]) if backend["kind"] == "ray" else 0

    def init_source(self, job_id: str) -> str | None:
        """The snapshot version path a job starts from (None for a fresh model)."""
        try:
            return str(json.loads((self.settings.job_dir(job_id) / INIT_FROM).read_text())["path"])
        except (OSError, ValueError, KeyError):
            return None

    def _by_key(self, key: str, request_hash: str) -> JobRow | None:
        with self.db.session() as s:
            job = s.scalars(select(JobRow).where(JobRow.idempotency_key == key)).first()
        if job is not None and job.request_hash != request_hash:
            raise Conflict(
                f"Idempotency-Key {key!r} was already used for a different request (job {job.id}); "
                "use a new key for a new job",
                job_id=job.id,
            )
        return job

    # ---- read -----------------------------------------------------------------------------------------
    def list(self) -> list[JobRow]:
        with self.db.session() as s:
            return list(s.scalars(select(JobRow).order_by(JobRow.created_at.desc())))

    def page(self, limit: int, cursor: str | None) -> tuple[Sequence[JobRow], str | None]:
        """One page of jobs, newest first, and the cursor of the next (None on the last)."""
        from app.services.pagination import page_by_created

        with self.db.session() as s:
            return page_by_created(s, JobRow, limit, cursor)

    def get(self, job_id: str) -> JobRow:
        require_id("job", job_id)
        with self.db.session() as s:
            job = s.get(JobRow, job_id)
        if job is None:
            raise NotFound("job", job_id)
        return job

    def memory(self, jobs: builtins.list[JobRow]) -> dict[str, MemoryEstimate]:
        """Each job's memory estimate (jobs whose dataset is gone have none)."""
        ids = {d for j in jobs for d in (j.train_dataset_id, j.eval_dataset_id) if d}
        with self.db.session() as s:
            rows = {r.id: r for r in s.scalars(select(DatasetRow).where(DatasetRow.id.in_(ids)))} if ids else {}
        out: dict[str, MemoryEstimate] = {}
        for j in jobs:
            train = rows.get(j.train_dataset_id)
            if train is None or (j.eval_dataset_id and j.eval_dataset_id not in rows):
                continue
            try:
                test = rows.get(j.eval_dataset_id or "")
                out[j.id] = estimate_job(
                    j.config, train, test, self.settings, self.init_source(j.id), self.shards(j.id)
                )
            except (ConfigError, TypeError, ValueError):
                continue
        return out

    def queue(self) -> dict[str, QueueSlot]:
        """Each queued job's place in the queue and why it waits (see admission.plan_queue)."""
        with self.db.session() as s:
            running = list(s.scalars(select(JobRow).where(JobRow.state.in_(TRAINING_STATES))))
            queued = list(s.scalars(select(JobRow).where(JobRow.state == JobState.QUEUED).order_by(JobRow.created_at)))
        if not queued:
            return {}
        est = self.memory(running + queued)
        return plan_queue(
            [_total(est.get(j.id)) for j in running], [(j, _total(est.get(j.id))) for j in queued], self.settings
        )

    def queue_positions(self) -> dict[str, int]:
        """Queued jobs -> their place in the queue (1 = started next), in the order the supervisor starts them."""
        return {job_id: slot.position for job_id, slot in self.queue().items()}

    def latest_versions(self, job_ids: builtins.list[str] | None = None) -> dict[str, int]:
        with self.db.session() as s:
            q = select(ModelVersionRow.job_id, func.max(ModelVersionRow.version)).group_by(ModelVersionRow.job_id)
            if job_ids is not None:
                q = q.where(ModelVersionRow.job_id.in_(job_ids))
            return {j: v for j, v in s.execute(q)}

    def versions(self, job_id: str) -> builtins.list[ModelVersionRow]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(ModelVersionRow).where(ModelVersionRow.job_id == job_id).order_by(ModelVersionRow.version)
                )
            )

    def metrics(self, job_id: str, since_step: int = -1, limit: int = 10_000) -> builtins.list[MetricRow]:
        """Metric points with step > since_step, oldest first."""
        self.get(job_id)
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(MetricRow)
                    .where(MetricRow.job_id == job_id, MetricRow.step > since_step)
                    .order_by(MetricRow.step, MetricRow.id)
                    .limit(limit)
                )
            )

    # ---- control --------------------------------------------------------------------------------------
    def stop(self, job_id: str) -> JobRow:
        """Running -> stopping (the trainer checkpoints, then records `stopped`); queued/interrupted -> stopped.
        Idempotent: a stopping or stopped job is returned as it is. Completed and failed jobs are a Conflict."""
        require_id("job", job_id)
        for _ in range(10):  # the supervisor may start it (queued -> running) between our read and our write
            with self.db.session() as s:
                job = s.get(JobRow, job_id)
                if job is None:
                    raise NotFound("job", job_id)
                state = job.state
                if job.state in (JobState.STOPPING, JobState.STOPPED):
                    return job
                if job.state not in (JobState.QUEUED, JobState.RUNNING, JobState.INTERRUPTED):
                    raise Conflict(
                        f"job {job_id} is {job.state}; only queued, running or interrupted jobs can be stopped",
                        state=job.state,
                    )
                if _transition(s, job_id, (JobState.RUNNING,), state=JobState.STOPPING) or _transition(
                    s, job_id, (JobState.QUEUED, JobState.INTERRUPTED), state=JobState.STOPPED, finished_at=utcnow()
                ):
                    break
        else:
            raise Conflict(f"job {job_id} kept changing state; retry the stop", state=state)
        self.supervisor.request_stop(job_id)
        return self.get(job_id)

    def resume(self, job_id: str) -> JobRow:
        """stopped / failed / interrupted -> queued; the trainer continues from the newest snapshot. Refused like a
        new job when its estimate exceeds SLIDE_MAX_JOB_MEMORY."""
        require_id("job", job_id)
        with self.db.session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise NotFound("job", job_id)
            missing = [d for d in (job.train_dataset_id, job.eval_dataset_id) if d and s.get(DatasetRow, d) is None]
            if missing:
                raise Conflict(f"job {job_id} cannot resume: its dataset {missing[0]} was deleted", state=job.state)
            train = s.get(DatasetRow, job.train_dataset_id)
            test = s.get(DatasetRow, job.eval_dataset_id) if job.eval_dataset_id else None
            assert train is not None  # not missing, checked above
            if job.state in RESUMABLE_STATES:
                cfg = SlideConfig.from_dict(job.config)
                if self.shards(job_id) and self.settings.ray_address is None:
                    raise Conflict(
                        f"job {job_id} trains on Ray and this service has no Ray cluster: start it with "
                        "SLIDE_RAY_ADDRESS set to resume the job",
                        state=job.state,
                    )
                check_fits(
                    cfg,
                    train,
                    test,
                    self.settings,
                    what=f"job {job_id}",
                    init_from=self.init_source(job_id),
                    shards=self.shards(job_id),
                )
            if not _transition(s, job_id, RESUMABLE_STATES, state=JobState.QUEUED, error=None, finished_at=None):
                hint = {
                    JobState.STOPPING: "it is writing its checkpoint; resume it once it is stopped",
                    JobState.COMPLETED: "it completed its epochs; start a new job to train further",
                }.get(job.state, "it is already queued or training")
                raise Conflict(f"job {job_id} is {job.state}: {hint}", state=job.state)
        self.supervisor.wake()
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Remove the job, its metrics, versions and snapshots; a trainer still running is killed first (no
        checkpoint: its files go too). The rows go first, so the supervisor cannot start the job meanwhile.
        Conflict while an alias points at the model: clients calling it would get 404s, so the aliases are
        moved or deleted first, deliberately."""
        self.get(job_id)  # NotFound for an unknown or malformed id
        with self.db.session() as s:
            names = list(s.scalars(select(AliasRow.name).where(AliasRow.model_id == job_id).order_by(AliasRow.name)))
            if names:
                shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                which = f"the alias {shown} points" if len(names) == 1 else f"the aliases {shown} point"
                raise Conflict(
                    f"job {job_id} cannot be deleted: {which} at its model; move them to another model "
                    "(PUT /v1/aliases/{alias}) or delete them (DELETE /v1/aliases/{alias}) first",
                    aliases=names,
                )
            s.execute(delete(MetricRow).where(MetricRow.job_id == job_id))
            s.execute(delete(ModelVersionRow).where(ModelVersionRow.job_id == job_id))
            s.execute(delete(JobRow).where(JobRow.id == job_id))
        try:
            source = json.loads((self.settings.job_dir(job_id) / INIT_FROM).read_text())
            engine.SnapshotStore(self.settings.snapshots_dir(source["model_id"])).unpin(f"init-{job_id}")
        except (OSError, ValueError, KeyError):
            pass
        self.supervisor.cancel(job_id)
        _remove_tree(self.settings.job_dir(job_id))
        log.info("job %s deleted", job_id)


# ----------------------------------------------------------------------------------------------- supervisor


@dataclass
class _Handle:
    process: Any
    stop_event: Any
    interrupt_event: Any
    training_event: Any  # set by the child once its trainer is built: from then on it has progress to save
    estimate: int | None = None  # bytes, by engine.memory: what admission counts while it runs


class Supervisor:
    """Starts queued jobs in their own processes, reaps dead ones, recovers after a restart. One per data dir."""

    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.ctx = multiprocessing.get_context("spawn")
        self._handles: dict[str, _Handle] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file: Any = None
        self.error: str | None = None
        self.exit_hooks: builtins.list[Callable[[str], None]] = []
        """Called with a job's id once its trainer process has exited and been reaped, and at start-up, after
        recovery, with every job left without a trainer (app.services.labels.settle)."""

    @property
    def active(self) -> bool:
        """True in the process that supervises this data dir."""
        return self._lock_file is not None

    @property
    def healthy(self) -> bool:
        return not self.active or (self._thread is not None and self._thread.is_alive())

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.settings.data_dir / "supervisor.lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            log.warning("another process supervises %s; this one serves requests only", self.settings.data_dir)
            return
        self._lock_file = fh
        self.recover()
        self.sweep()
        self._after_recovery()
        self._thread = threading.Thread(target=self._loop, name="job-supervisor", daemon=True)
        self._thread.start()

    def recover(self) -> None:
        """Jobs the previous service process left running: it died (or stopped) with them."""
        with self.db.session() as s:
            jobs = list(
                s.scalars(
                    select(JobRow).where(JobRow.state.in_((JobState.RUNNING, JobState.STOPPING, JobState.INTERRUPTED)))
                )
            )
            for job in jobs:
                state = job.state  # read before the update: the session refreshes `job` with the new values
                if state == JobState.STOPPING:  # the user asked to stop; its last snapshot is where it stopped
                    _transition(s, job.id, (JobState.STOPPING,), state=JobState.STOPPED, pid=None, finished_at=utcnow())
                    continue
                values: dict[str, Any] = {"pid": None}
                if state == JobState.RUNNING:
                    values["interruptions"] = job.interruptions + 1
                if self.settings.auto_resume:
                    _transition(s, job.id, (state,), state=JobState.QUEUED, **values)
                    log.info("job %s was %s when the service stopped: resuming it", job.id, state)
                else:
                    _transition(s, job.id, (state,), state=JobState.INTERRUPTED, finished_at=utcnow(), **values)
                    log.info("job %s was %s when the service stopped: left interrupted", job.id, state)

    def _after_recovery(self) -> None:
        """Run the exit hooks of every job that no trainer runs and none will until it is resumed: a trainer that
        went down with the previous service process was never reaped, and the hooks of one reaped just before may
        not have finished. Jobs that recovery queued again are left to their new trainers."""
        with self.db.session() as s:
            idle = list(s.scalars(select(JobRow.id).where(JobRow.state.in_(TERMINAL_STATES))))
        for job_id in idle:
            self._exited(job_id)

    def sweep(self) -> None:
        """Job dirs without a row are leftovers of a delete that did not finish."""
        root = self.settings.jobs_dir
        if not root.is_dir():
            return
        with self.db.session() as s:
            known = set(s.scalars(select(JobRow.id)))
        for entry in root.iterdir():
            if entry.name.startswith(".trash-") or (entry.is_dir() and entry.name not in known):
                _remove_tree(entry)

    def shutdown(self) -> None:
        """Trainers checkpoint and exit as `interrupted` (resumed at the next start); killed after the grace time."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            handles = dict(self._handles)
        for job_id, h in handles.items():
            h.interrupt_event.set()
            if not h.training_event.is_set() and h.process.is_alive():
                log.info("job %s had not started training: stopping its process now", job_id)
                h.process.kill()  # still importing or loading data: nothing to checkpoint
        end = time.monotonic() + self.settings.shutdown_grace_s
        for job_id, h in handles.items():
            h.process.join(timeout=max(0.1, end - time.monotonic()))
            if h.process.is_alive():
                log.warning(
                    "job %s did not checkpoint within SLIDE_SHUTDOWN_GRACE_S=%gs: killing it",
                    job_id,
                    self.settings.shutdown_grace_s,
                )
                h.process.kill()
                h.process.join(timeout=5)
            if h.process.exitcode is not None and h.process.exitcode < 0:  # killed: it recorded nothing
                with self.db.session() as s:
                    _transition(s, job_id, (JobState.STOPPING,), state=JobState.STOPPED, pid=None, finished_at=utcnow())
                    _transition(
                        s,
                        job_id,
                        (JobState.RUNNING,),
                        state=JobState.INTERRUPTED,
                        pid=None,
                        finished_at=utcnow(),
                        interruptions=JobRow.interruptions + 1,
                    )
        with self._lock:
            self._handles.clear()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ---- requests from the API ------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def request_stop(self, job_id: str) -> None:
        with self._lock:
            h = self._handles.get(job_id)
        if h is not None:
            h.stop_event.set()
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Kill the job's process (no checkpoint: the job is being deleted) and wait for it."""
        with self._lock:
            h = self._handles.pop(job_id, None)
        if h is not None and h.process.is_alive():
            h.process.kill()
            h.process.join(timeout=10)

    def running(self) -> builtins.list[str]:
        with self._lock:
            return [j for j, h in self._handles.items() if h.process.is_alive()]

    # ---- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._reap()
                self._launch()
                self.error = None
            except Exception as exc:  # noqa: BLE001 - a DB hiccup must not kill the supervisor
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("supervisor pass failed")
            self._wake.wait(self.settings.supervisor_poll_s)
            self._wake.clear()

    def _reap(self) -> None:
        with self._lock:
            dead = {j: h for j, h in self._handles.items() if not h.process.is_alive()}
            for j in dead:
                del self._handles[j]
        for job_id, h in dead.items():
            h.process.join(timeout=1)
            code = h.process.exitcode
            with self.db.session() as s:
                failed = _transition(
                    s,
                    job_id,
                    TRAINING_STATES,
                    state=JobState.FAILED,
                    pid=None,
                    finished_at=utcnow(),
                    error=f"the trainer process exited with code {code} without finishing"
                    f"{_signal_hint(code)}; last log lines: {_log_tail(self.settings.job_dir(job_id))}",
                )
            if failed:
                log.error("job %s: trainer process died (exit code %s)", job_id, code)
            self._exited(job_id)
        # Stop requests that reached the DB through another API process.
        with self._lock:
            owned = list(self._handles)
        if owned:
            with self.db.session() as s:
                stopping = set(
                    s.scalars(select(JobRow.id).where(JobRow.id.in_(owned), JobRow.state == JobState.STOPPING))
                )
            for job_id in stopping:
                self.request_stop(job_id)

    def _exited(self, job_id: str) -> None:
        for hook in self.exit_hooks:
            try:
                hook(job_id)
            except Exception:  # noqa: BLE001 - the other hooks and jobs go on
                log.exception("job %s: a hook on its trainer's exit failed", job_id)

    def _launch(self) -> None:
        """Start queued jobs, oldest first, each when a slot is free and it fits beside the running jobs in
        SLIDE_MAX_JOB_MEMORY (by their estimates); fail one whose estimate alone exceeds the limit."""
        with self._lock:
            free = self.settings.max_concurrent_jobs - len(self._handles)
            running = [h.estimate for h in self._handles.values()]
        if free <= 0 or self._stopping.is_set():
            return
        with self.db.session() as s:
            queued = list(s.scalars(select(JobRow).where(JobRow.state == JobState.QUEUED).order_by(JobRow.created_at)))
        if not queued:
            return
        estimates = JobService(self.settings, self.db, self).memory(queued)
        plan = plan_queue(running, [(j, _total(estimates.get(j.id))) for j in queued], self.settings)
        for job in queued:
            slot = plan[job.id]
            if slot.too_large:
                with self.db.session() as s:
                    _transition(
                        s,
                        job.id,
                        (JobState.QUEUED,),
                        state=JobState.FAILED,
                        finished_at=utcnow(),
                        error=f"not started: it {slot.reason}; lower its settings in a new job, or raise the limit "
                        "and resume it",
                    )
                log.warning("job %s not started: it %s", job.id, slot.reason)
                continue
            if not slot.start:
                continue
            est = estimates.get(job.id)
            # Under the lock from the transition until the handle is registered: cancel() (a delete) waits for a
            # launch in progress, so it always finds the process it must kill.
            with self._lock:
                with self.db.session() as s:
                    if not _transition(
                        s,
                        job.id,
                        (JobState.QUEUED,),
                        state=JobState.RUNNING,
                        runs=job.runs + 1,
                        started_at=utcnow(),
                        finished_at=None,
                        error=None,
                    ):
                        continue
                try:
                    self._spawn(job, est)
                except Exception as exc:  # noqa: BLE001
                    log.exception("could not start job %s", job.id)
                    with self.db.session() as s:
                        _transition(
                            s,
                            job.id,
                            (JobState.RUNNING,),
                            state=JobState.FAILED,
                            finished_at=utcnow(),
                            error=f"could not start the trainer process: {type(exc).__name__}: {exc}",
                        )

    def _ray_spec(self, job: JobRow) -> dict[str, Any]:
        """The JobSpec fields of a job with a ray backend (none for a local job)."""
        shards = JobService(self.settings, self.db, self).shards(job.id)
        if not shards:
            return {}
        memory = None
        with self.db.session() as s:
            train = s.get(DatasetRow, job.train_dataset_id)
            if train is not None:
                cfg = SlideConfig.from_dict(job.config)
                memory = shard_estimate(cfg, train, None, shards)
        return {"ray_address": self.settings.ray_address, "shards": shards, "shard_memory": memory}

    def _spawn(self, job: JobRow, est: MemoryEstimate | None = None) -> None:
        st = self.settings
        spec = JobSpec(
            memory_estimate=est.trainer if est is not None else None,
            memory_estimate_text=est.describe() if est is not None else None,
            job_id=job.id,
            job_dir=str(st.job_dir(job.id)),
            snapshots_dir=str(st.snapshots_dir(job.id)),
            train_path=str(st.dataset_dir(job.train_dataset_id)),
            eval_path=str(st.dataset_dir(job.eval_dataset_id)) if job.eval_dataset_id else None,
            config=job.config,
            database_url=st.database_url,
            snapshot_interval_s=st.snapshot_interval_s,
            snapshot_keep=st.snapshot_keep,
            trainer_threads=int(job.config.get("threads") or st.trainer_threads or 0),
            nice=st.trainer_nice,
            progress_interval_s=st.progress_interval_s,
            parent_pid=os.getpid(),
            run=job.runs + 1,  # what _launch just wrote: the child's writes are fenced by it
            init_from=JobService(st, self.db, self).init_source(job.id),
            **self._ray_spec(job),
        )
        st.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        stop_event, interrupt_event, training_event = self.ctx.Event(), self.ctx.Event(), self.ctx.Event()
        process = self.ctx.Process(
            target=run_job,
            args=(spec, stop_event, interrupt_event, training_event),
            name=f"slide-job-{job.id[:8]}",
            daemon=True,
        )
        process.start()
        with self._lock:
            self._handles[job.id] = _Handle(
                process, stop_event, interrupt_event, training_event, est.total if est is not None else None
            )
        with self.db.session() as s:
            s.execute(update(JobRow).where(JobRow.id == job.id).values(pid=process.pid))
        log.info("job %s: trainer process %d started (run %d)", job.id, process.pid, job.runs + 1)


def _is_id(value: str) -> bool:
    try:
        require_id("dataset", value)
    except NotFound:
        return False
    return True


def _total(est: MemoryEstimate | None) -> int | None:
    return est.total if est is not None else None


def _signal_hint(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f" (killed by {signal.Signals(-code).name}{', out of memory?' if -code == 9 else ''})"
        except ValueError:
            return ""
    return ""


def _log_tail(job_dir: Path, lines: int = 5, max_chars: int = 1500) -> str:
    try:
        with open(job_dir / LOG_FILE, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
    return tail[-max_chars:] or "(empty log)"


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)
