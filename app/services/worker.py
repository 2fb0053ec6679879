"""What runs inside a job's own process (multiprocessing spawn context).

The child opens its datasets with `engine.load_dataset(mmap=True)`, builds `engine.Trainer` (or
`Trainer.resume` from the job's snapshot store), and writes its own progress, metrics, model versions and final
state to the database through its own SQLAlchemy engine: nothing depends on the web process staying up to drain
a queue. It stops, after a checkpoint, when

- the parent sets `stop_event` (user stop -> `stopped`) or `interrupt_event` (service shutdown -> `interrupted`),
- the job's row says `stopping` or is gone (a stop or delete issued through any API process),
- it receives SIGTERM, or its parent process disappears (-> `interrupted`, resumed at the next start-up).

A lock file in the job directory makes sure two trainers never write the same snapshot store.

Nothing heavy is imported at module level: the thread cap must be in the environment before Numba loads.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import gc
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from app.domain import (
    LABEL_EVENTS,
    LABEL_QUEUE_LOCK,
    LABEL_REQUESTS,
    TRAINER_LOCK,
    TRAINING_STATES,
    JobSpec,
    JobState,
    request_instance,
)

if TYPE_CHECKING:
    from sqlalchemy import CursorResult

    from engine.progress import TrainingMetrics

log = logging.getLogger("app.worker")

LOCK_FILE = TRAINER_LOCK
LOCK_TIMEOUT_S = 120.0  # how long a new trainer waits for an exiting one to release the job
LOG_FILE = "trainer.log"


def run_job(spec: JobSpec, stop_event: Any, interrupt_event: Any, training_event: Any) -> None:
    """Process entry point (must stay a picklable top-level function)."""
    nice = spec.nice
    if nice > 0:  # before any thread starts: Linux keeps niceness per thread, and new threads inherit it
        os.nice(nice)
    threads = spec.trainer_threads
    if threads > 0:
        os.environ["NUMBA_NUM_THREADS"] = str(min(threads, os.cpu_count() or threads))
    job_dir = Path(spec.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    _redirect_output(job_dir / LOG_FILE)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s [job " + spec.job_id[:8] + "] %(message)s",
    )
    # Ctrl-C in a terminal reaches the whole process group: the parent decides what happens to its trainers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    local_interrupt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: local_interrupt.set())
    JobProcess(spec, stop_event, interrupt_event, local_interrupt, training_event).main()


MEMORY_MARGIN = 0.25
"""The trainer may allocate this fraction more than its estimate (plus MEMORY_SLACK) before allocations fail."""
MEMORY_SLACK = 512 * 2**20
"""Bytes on top: a cold Numba compile of the kernels takes ~260 MB, the database client and logging a little."""
MEMORY_HOG_ENV = "SLIDE_TEST_MEMORY_HOG_SEED"
"""Tests only: a job whose config seed equals this value allocates memory without bound after its first snapshot in
its first run, to show what crossing the ceiling does."""


def apply_memory_ceiling(estimate: int | None, threads: int) -> int:
    """Cap this process's private writable memory (RLIMIT_DATA) at what it holds now plus the rest of its estimate
    with a margin; returns the cap (0 = none). Past it an allocation fails with MemoryError, which fails the job
    cleanly, long before the kernel's OOM killer would pick a process. RLIMIT_AS would count the address space
    Numba/LLVM and the thread stacks reserve without using; RLIMIT_DATA counts what can become resident, and each
    thread's stack once (`threads` of them)."""
    import resource

    if not estimate:
        return 0
    status = _proc_status()
    data, rss = status.get("VmData", 0), status.get("VmRSS", 0)
    stack, _ = resource.getrlimit(resource.RLIMIT_STACK)
    stack = stack if 0 < stack < 2**30 else 8 * 2**20
    pool = threads or os.cpu_count() or 1
    ceiling = data + int(max(0, estimate - rss) * (1 + MEMORY_MARGIN)) + MEMORY_SLACK + pool * stack
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and ceiling > hard:
        ceiling = hard
    resource.setrlimit(resource.RLIMIT_DATA, (ceiling, hard))
    log.info(
        "memory: estimate %s bytes, RLIMIT_DATA %s bytes (%s in use now)", f"{estimate:,}", f"{ceiling:,}", f"{data:,}"
    )
    return ceiling


def _proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def peak_rss() -> int:
    """This process's peak resident size in bytes."""
    return _proc_status().get("VmHWM", 0)


def _exhaust_memory() -> None:
    import numpy as np

    blocks = []
    try:
        while True:
            blocks.append(np.ones(16 * 2**20, dtype=np.float32))  # 64 MiB, touched
    except MemoryError as exc:
        held = len(blocks) * 64
        blocks.clear()
        raise MemoryError(f"{exc} (after {held} MiB more than the model)") from None


def _redirect_output(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
    return out


class JobProcess:
    def __init__(
        self,
        spec: JobSpec,
        stop_event: Any,
        interrupt_event: Any,
        local_interrupt: threading.Event,
        training_event: Any,
    ):
        from app.db import Database

        self.spec = spec
        self.job_id = spec.job_id
        self.job_dir = Path(spec.job_dir)
        self.stop_event = stop_event
        self.interrupt_event = interrupt_event
        self.local_interrupt = local_interrupt
        self.training_event = training_event
        self.user_stop = threading.Event()  # set by the heartbeat when the row says `stopping` or is gone
        self.row_gone = False
        self.parent_pid = spec.parent_pid
        self.run = spec.run  # the job's `runs` value for this process: writes are fenced by it
        self.db = Database(spec.database_url)
        self.trainer: Any = None
        self.progress: dict[str, Any] | None = None  # kept when the trainer is let go (out of memory)
        self.ceiling = 0
        self._done = threading.Event()
        self._hog = os.environ.get(MEMORY_HOG_ENV)
        self._labels_checked = 0.0
        self._queue_lock: IO[str] | None = None

    # ---- stop conditions ------------------------------------------------------------------------------
    def interrupted(self) -> bool:
        return self.local_interrupt.is_set() or self.interrupt_event.is_set()

    def should_stop(self) -> bool:
        return self.stop_event.is_set() or self.user_stop.is_set() or self.interrupted()

    # ---- main -----------------------------------------------------------------------------------------
    def main(self) -> None:
        lock = self._lock()
        if lock is None:
            return
        failure: tuple[str, bool] | None = None
        try:
            self._clear_unfinished_publications()
            self._train()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the job row
            log.error("training failed:\n%s", traceback.format_exc())
            failure = (self._failure_message(exc), isinstance(exc, MemoryError))
        try:
            if failure is not None:
                if failure[1]:  # out of memory: let the model and its traceback go before writing the row
                    self._done.set()
                    self.progress = self._progress()
                    self.trainer = None
                    gc.collect()
                self._finish(JobState.FAILED, error=failure[0])
        finally:
            self._done.set()
            if self.row_gone or self._row_state() is None:
                shutil.rmtree(self.job_dir, ignore_errors=True)  # deleted while we ran: leave nothing behind
            self.db.dispose()
            lock.close()
            if self._queue_lock is not None:  # after the trainer lock (see domain.LABEL_QUEUE_LOCK)
                self._queue_lock.close()

    def _lock(self) -> IO[str] | None:
        fh = open(self.job_dir / LOCK_FILE, "a+")
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fh
            except BlockingIOError:
                if os.getppid() != self.parent_pid:  # the service died while we waited: nothing to do here
                    fh.close()
                    return None
                if time.monotonic() > deadline or self.interrupted():
                    fh.close()
                    self._finish(
                        JobState.FAILED,
                        error="another trainer process still holds this job's lock "
                        f"({self.job_dir / LOCK_FILE}); resume the job once it has exited",
                    )
                    return None
                time.sleep(0.2)

    def _clear_unfinished_publications(self) -> None:
        """Remove the temp dirs of snapshot publications a killed trainer never finished (readers ignore them, but
        they hold disk space). Safe: this process holds the job's lock, so no other trainer writes this store."""
        root = Path(self.spec.snapshots_dir)
        if root.is_dir():
            for entry in root.glob(".publish-*"):
                log.warning("removing %s, left by a publication that did not finish", entry.name)
                shutil.rmtree(entry, ignore_errors=True)

    def _failure_message(self, exc: BaseException) -> str:
        """The job's `error`: the exception, and for a full or unwritable data dir or the memory ceiling what is kept
        and what to do."""
        from app.services.errors import storage_cause

        text = f"{type(exc).__name__}: {exc}"
        cause = storage_cause(exc)
        if cause is None and not isinstance(exc, MemoryError):
            return text
        try:
            import engine

            latest = engine.SnapshotStore(self.spec.snapshots_dir).latest()
        except Exception:  # noqa: BLE001
            latest = None
        kept = (
            f"snapshot v{latest[0]} is intact and keeps serving predictions"
            if latest is not None
            else "no snapshot had been written yet"
        )
        if cause is None:
            ceiling = f"its memory ceiling of {self.ceiling:,} bytes" if self.ceiling else "the memory available"
            return (
                f"out of memory: the trainer reached {ceiling} (RLIMIT_DATA, set from the job's estimate "
                f"{self.spec.memory_estimate_text or 'unknown'} plus a margin) and stopped ({text}); {kept}. "
                "Resume the job to continue from its newest snapshot, or start a smaller one"
            )
        return (
            f"storage error: {cause[0]} ({cause[1]}) while writing to the data dir ({text}); {kept}. Free space "
            "or make the data dir writable, then resume the job: it continues from its newest snapshot"
        )

    def _train(self) -> None:
        import engine
        import engine.trainer  # noqa: F401 - numpy and Numba loaded: the baseline the memory ceiling starts from

        spec = self.spec
        if spec.shards:
            self._train_on_ray()
            return
        self.ceiling = apply_memory_ceiling(self.spec.memory_estimate, self.spec.trainer_threads)
        train = engine.load_dataset(spec.train_path, mmap=True)
        test = engine.load_dataset(spec.eval_path, mmap=True) if spec.eval_path else None
        store = engine.SnapshotStore(spec.snapshots_dir, keep=spec.snapshot_keep)
        if spec.init_from:  # the source's featurizer and names, grown to this set's (by term and by name)
            from engine.text import load_text_info

            featurizer, names, _ = load_text_info(spec.train_path)
            name_list = names.to_list() if names is not None else None
        if store.latest() is not None:
            if spec.init_from:
                trainer = engine.Trainer.resume(store, train, test, label_names=name_list, featurizer=featurizer)
            else:
                trainer = engine.Trainer.resume(store, train, test)
            log.info("resumed from snapshot v%d at step %d", store.latest()[0], trainer.step)
        else:
            config = engine.SlideConfig.from_dict(spec.config)
            if spec.init_from:
                trainer = engine.Trainer(
                    config, train, test, store, init_from=spec.init_from, label_names=name_list, featurizer=featurizer
                )
                log.info("started from %s: %d labels", spec.init_from, trainer.model.num_labels)
            else:
                trainer = engine.Trainer(config, train, test, store)
            log.info(
                "started: %d points, %d features, %d labels", train.num_points, train.num_features, train.num_labels
            )
        if not spec.init_from:
            self._attach_text(trainer, spec.train_path)
        try:
            self._run(trainer, store, labels=True)
        finally:
            trainer.close()  # the files of the models it kept beside the snapshots (engine.spill)

    def _train_on_ray(self) -> None:
        """A job with a ray backend: DistributedTrainer, its shards on the Ray cluster (no memory ceiling here: a
        local Ray instance's processes would inherit it; the shards reserve their estimates from Ray instead)."""
        import engine
        from engine.distributed import DistributedTrainer

        spec = self.spec
        assert spec.ray_address is not None
        train = engine.load_dataset(spec.train_path, mmap=True)
        test = engine.load_dataset(spec.eval_path, mmap=True) if spec.eval_path else None
        store = engine.SnapshotStore(spec.snapshots_dir, keep=spec.snapshot_keep)
        options = {"memory": spec.shard_memory} if spec.shard_memory else None
        if store.latest() is not None:
            trainer = DistributedTrainer.resume(store, train, test, spec.shards, spec.ray_address, options)
            log.info("resumed from snapshot v%d at step %d on %d shards", store.latest()[0], trainer.step, spec.shards)
        else:
            config = engine.SlideConfig.from_dict(spec.config)
            trainer = DistributedTrainer(config, train, test, store, spec.shards, spec.ray_address, options)
            log.info(
                "started on %d shards (Ray at %s): %d points, %d features, %d labels",
                spec.shards,
                spec.ray_address,
                train.num_points,
                train.num_features,
                train.num_labels,
            )
        try:
            self._attach_text(trainer, spec.train_path)
            self._run(trainer, store, labels=False)
        finally:
            trainer.close()

    def _run(self, trainer: Any, store: Any, labels: bool) -> None:
        """Train until done or stopped, then record the job's final state."""
        spec = self.spec
        self.trainer = trainer
        self._forget_beyond(trainer.step, trainer.epoch, store.versions())
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        heartbeat.start()
        self.training_event.set()
        result = trainer.run(
            should_stop=self.should_stop,
            on_metrics=self._on_metrics,
            on_snapshot=self._on_snapshot,
            snapshot_every_s=spec.snapshot_interval_s,
            before_step=self._apply_label_requests if labels else None,
        )
        if labels:
            # those that came after the last step; from here until this process exits no request is handed over
            # (the queue lock is released after the trainer lock, so the service then applies them itself)
            self._close_label_queue()
            self._apply_label_requests(force=True)
        self._done.set()
        heartbeat.join(timeout=5)
        if not result.get("stopped"):
            state = JobState.COMPLETED
        elif self.interrupted() and not (self.stop_event.is_set() or self.user_stop.is_set()):
            state = JobState.INTERRUPTED
        else:
            state = JobState.STOPPED
        log.info(
            "finished: %s at step %d; peak resident memory %s bytes, estimate %s",
            state,
            trainer.step,
            f"{peak_rss():,}",
            spec.memory_estimate_text or "unknown",
        )
        self._finish(state, metrics=_json_safe(result))

    def _close_label_queue(self) -> None:
        """Hold the job's label queue lock until this process exits (waits while the service hands a request over)."""
        fh = open(self.job_dir / LABEL_QUEUE_LOCK, "a+")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        self._queue_lock = fh

    def _apply_label_requests(self, force: bool = False) -> None:
        """Apply the label additions and retirements waiting in the job directory (app.services.labels), publish a
        snapshot with them at once and report each as a `labels` event. Looks at most every 0.2 s."""
        now = time.monotonic()
        if not force and now - self._labels_checked < 0.2:
            return
        self._labels_checked = now
        queue = self.job_dir / LABEL_REQUESTS
        requests = sorted(queue.glob("*.json")) if queue.is_dir() else []
        if not requests:
            return
        import json

        from engine.labels import featurize_instances

        trainer = self.trainer
        events = []
        for path in requests:
            try:
                request = json.loads(path.read_text())
                event: dict[str, Any] = {"request_id": request.get("request_id"), "op": request.get("op")}
                if request.get("op") == "add":
                    names = [label["name"] for label in request["labels"]]
                    examples = [
                        featurize_instances(trainer.model, [request_instance(e) for e in label["examples"]])
                        for label in request["labels"]
                    ]
                    event.update(names=names, label_ids=trainer.add_labels(examples, names).tolist())
                else:
                    event.update(label_ids=trainer.retire_labels(request["ids"]).tolist())
            except (ValueError, KeyError, TypeError) as exc:  # engine.labels.LabelError is a ValueError
                event = {"request_id": path.stem.split("-", 1)[-1], "error": f"{type(exc).__name__}: {exc}"}
            events.append((path, event))
        published = trainer.publish()
        if published is not None:
            self._on_snapshot(*published)
        with open(self.job_dir / LABEL_EVENTS, "a") as fh:
            for _, event in events:
                fh.write(
                    json.dumps(
                        {
                            "at": time.time(),
                            **event,
                            "step": int(trainer.step),
                            "model_version": published[0] if published else None,
                        }
                    )
                    + "\n"
                )
        for path, _ in events:
            path.unlink(missing_ok=True)
        log.info("applied %d label request(s) at step %d", len(events), trainer.step)

    @staticmethod
    def _attach_text(trainer: Any, train_path: str) -> None:
        """The training set's featurizer and label names go into every snapshot (names set after a job started
        arrive when it resumes)."""
        from engine.text import load_text_info

        try:
            featurizer, names, _ = load_text_info(train_path)
            trainer.attach_text(featurizer, names)
        except (OSError, ValueError) as exc:
            log.warning("the training set's featurizer or label names are not usable: %s", exc)

    # ---- database writes ------------------------------------------------------------------------------
    def _row_state(self) -> str | None:
        from app.db import JobRow

        try:
            with self.db.session() as s:
                row = s.get(JobRow, self.job_id)
                return row.state if row is not None else None
        except Exception:  # noqa: BLE001
            log.exception("could not read the job row")
            return "unknown"

    def _progress(self) -> dict[str, Any]:
        t = self.trainer
        return {"step": int(t.step), "epoch": int(t.epoch), "samples": int(t.samples_seen)}

    def _forget_beyond(self, step: int, epoch: int, versions: list[int]) -> None:
        """After a resume, metrics newer than the checkpoint will be produced again: drop the old copies (a
        checkpoint taken on an epoch's last batch precedes that epoch's report at the same step, so a point at
        the checkpoint's step but a later epoch is newer too). Record snapshot versions that exist on disk but have
        no row (the process died between publish and insert)."""
        from sqlalchemy import and_, delete, or_, select

        from app.db import MetricRow, ModelVersionRow

        with self.db.session() as s:
            newer = or_(MetricRow.step > step, and_(MetricRow.step == step, MetricRow.epoch > epoch))
            s.execute(delete(MetricRow).where(MetricRow.job_id == self.job_id, newer))
            known = set(s.scalars(select(ModelVersionRow.version).where(ModelVersionRow.job_id == self.job_id)))
            for v in versions:
                if v not in known:
                    s.add(ModelVersionRow(job_id=self.job_id, version=v, **self._progress()))

    def _heartbeat(self) -> None:
        from sqlalchemy import update

        from app.db import JobRow, utcnow

        interval = self.spec.progress_interval_s
        last_t, last_samples = time.monotonic(), int(self.trainer.samples_seen)
        rate: float | None = None
        while not self._done.wait(interval):
            if os.getppid() != self.parent_pid:
                log.warning("the service process went away: checkpointing and exiting")
                self.local_interrupt.set()
            now, samples = time.monotonic(), int(self.trainer.samples_seen)
            if samples != last_samples or rate is not None:
                rate = (samples - last_samples) / (now - last_t) if now > last_t else rate
            last_t, last_samples = now, samples
            try:
                with self.db.session() as s:
                    result = cast(
                        "CursorResult[Any]",
                        s.execute(
                            update(JobRow)
                            .where(JobRow.id == self.job_id, JobRow.runs == self.run)
                            .values(**self._progress(), samples_per_s=rate, heartbeat_at=utcnow())
                        ),
                    )
                    if result.rowcount == 0:  # deleted, or another process owns the job now
                        self.row_gone = s.get(JobRow, self.job_id) is None
                        self.user_stop.set()
                        continue
                    row = s.get(JobRow, self.job_id)
                    state = row.state if row is not None else None
                if state == JobState.STOPPING:
                    self.user_stop.set()
            except Exception:  # noqa: BLE001 - a busy database must not stop training
                log.exception("heartbeat: database write failed")

    def _on_metrics(self, metrics: TrainingMetrics) -> None:
        from sqlalchemy import update

        from app.db import METRIC_FIELDS, JobRow, MetricRow

        m = _json_safe(metrics.to_dict())
        try:
            with self.db.session() as s:
                s.add(MetricRow(job_id=self.job_id, **{k: m.get(k) for k in METRIC_FIELDS}))
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == self.job_id, JobRow.runs == self.run)
                    .values(
                        latest_metrics={k: m.get(k) for k in METRIC_FIELDS},
                        step=int(m.get("step") or 0),
                        epoch=int(m.get("epoch") or 0),
                        samples=int(m.get("samples") or 0),
                    )
                )
        except Exception:  # noqa: BLE001
            log.exception("could not record metrics at step %s", m.get("step"))

    def _on_snapshot(self, version: int, path: Path) -> None:
        self._record_snapshot(version)
        if self._hog and self.run == 1 and int(self.trainer.config.seed) == int(self._hog):
            _exhaust_memory()  # test hook, see MEMORY_HOG_ENV

    def _record_snapshot(self, version: int) -> None:
        from app.db import ModelVersionRow

        try:
            with self.db.session() as s:
                s.merge(
                    ModelVersionRow(
                        job_id=self.job_id,
                        version=int(version),
                        **self._progress(),
                        created_at=dt.datetime.now(dt.UTC),
                    )
                )
        except Exception:  # noqa: BLE001
            log.exception("could not record snapshot v%s", version)

    def _finish(self, state: JobState, *, error: str | None = None, metrics: dict[str, Any] | None = None) -> None:
        from sqlalchemy import update

        from app.db import METRIC_FIELDS, JobRow, utcnow

        values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "pid": None, "error": error}
        if state == JobState.INTERRUPTED:
            values["interruptions"] = JobRow.interruptions + 1
        if self.trainer is not None:
            values.update(self._progress())
        elif self.progress is not None:
            values.update(self.progress)
        if metrics:
            values["latest_metrics"] = {k: metrics.get(k) for k in METRIC_FIELDS}
        for attempt in range(5):
            try:
                with self.db.session() as s:
                    s.execute(
                        update(JobRow)
                        .where(JobRow.id == self.job_id, JobRow.runs == self.run, JobRow.state.in_(TRAINING_STATES))
                        .values(**values)
                    )
                return
            except Exception:  # noqa: BLE001
                log.exception("could not record the final state (attempt %d)", attempt + 1)
                time.sleep(1 + attempt)
