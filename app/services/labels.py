"""Labels added and retired online (engine.labels).

A model whose job has no trainer running is edited here: the change is published as the next version, a delta on
top of the newest (engine.delta; under the job's trainer lock, so no trainer starts meanwhile), and the registry
applies it to the model it holds and serves it from the next request. A job that is training gets the request as a
file in its job directory; its trainer applies it before its next step, publishes a snapshot at once and reports it
as a `labels` event (domain.LABEL_EVENTS).
Handing over happens under the job's label queue lock, which a trainer takes for its last look at the requests
and keeps until it has exited: a request comes either before that look or after the trainer lock is free, and
then it is applied here. Requests a trainer never saw (it was killed or failed) are applied here to the job's
newest version once the supervisor has reaped its process, or at the next start when the service went down with
it and the job is not resumed (`settle`; a resumed job's new trainer applies them), or by the next change made while
no trainer runs, whichever comes first. Until then the label list shows them as `pending`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import engine
import engine.delta
from app.db import JobRow, ModelVersionRow
from app.domain import ACTIVE_STATES, LABEL_EVENTS, LABEL_QUEUE_LOCK, LABEL_REQUESTS, TRAINER_LOCK, request_instance
from app.services.errors import Conflict, InvalidContent, NotFound, NotReady
from app.services.jobs import JobService
from app.services.registry import ModelRegistry
from app.settings import Settings
from engine.labels import LabelError, edit_snapshot, label_names_list, retired_mask
from engine.snapshot import read_manifest

log = logging.getLogger("app.labels")

Instance = Any
"""A predict instance: text (str) or an (indices, values) pair."""
QUEUE_WAIT_S = 30.0
"""Longest a label change waits for a finishing trainer to exit (it holds the queue lock until then)."""


class LabelService:
    def __init__(self, settings: Settings, jobs: JobService, registry: ModelRegistry):
        self.settings = settings
        self.jobs = jobs
        self.registry = registry
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # ---- the trainer lock -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _without_trainer(self, job_id: str) -> Iterator[bool]:
        """Holds the job's trainer lock (True) when no trainer process holds it; False when one does. Edits and
        compactions of one model in this process take turns first (one waits for the other, rather than taking
        the other's hold of the trainer lock for a trainer's)."""
        with self._guard:
            turn = self._locks.setdefault(job_id, threading.Lock())
        with turn:
            job_dir = self.settings.job_dir(job_id)
            job_dir.mkdir(parents=True, exist_ok=True)
            fh: IO[str] = open(job_dir / TRAINER_LOCK, "a+")
            try:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                yield True
            finally:
                fh.close()

    @contextlib.contextmanager
    def _queue_locked(self, job_id: str) -> Iterator[None]:
        """Holds the job's label queue lock (domain.LABEL_QUEUE_LOCK); NotReady (503) if a finishing trainer keeps
        it longer than QUEUE_WAIT_S."""
        job_dir = self.settings.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        fh: IO[str] = open(job_dir / LABEL_QUEUE_LOCK, "a+")
        try:
            deadline = time.monotonic() + QUEUE_WAIT_S
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise NotReady(f"model {job_id}'s trainer is finishing; retry", retry_after_s=1) from None
                    time.sleep(0.05)
            yield
        finally:
            fh.close()

    def _job(self, model_id: str) -> JobRow:
        try:
            return self.jobs.get(model_id)
        except NotFound:
            raise NotFound("model", model_id) from None

    def _editable(self, model_id: str) -> JobRow:
        """The job of a model whose labels may change: not one trained on Ray shards (its snapshots are sharded)."""
        job = self._job(model_id)
        if self.jobs.shards(model_id):
            raise Conflict(
                f"model {model_id} is trained on Ray label shards: adding or retiring its labels is not supported; "
                "train the catalog on this machine to change its labels online"
            )
        return job

    def _dataset_names(self, job: JobRow, held: Any = None) -> Any:
        """The names stored with the job's training dataset, for a model whose snapshot has none; not read when the
        held model has its own (an edit would not use them)."""
        from engine.text import load_text_info

        if held is not None and held.label_names is not None:
            return None
        try:
            return load_text_info(self.settings.dataset_dir(job.train_dataset_id))[1]
        except (OSError, ValueError):
            return None

    # ---- add and retire ----------------------------------------------------------------------------------
    def add(self, model_id: str, labels: list[tuple[str, list[Instance]]]) -> dict[str, Any]:
        """{"label_ids", "model_version", "state": "applied"} or, for a training job, {"state": "pending",
        "request_id"}. Conflict (409) for a name in use, InvalidContent (422) for bad examples."""
        job = self._editable(model_id)
        names = [n for n, _ in labels]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidContent(f"labels: the name {repeated[0]!r} is given twice", loc=("body", "labels"))
        store = engine.SnapshotStore(self.settings.snapshots_dir(model_id), keep=self.settings.snapshot_keep)
        with self._queue_locked(model_id), self._without_trainer(model_id) as free:
            if free and (store.latest() is not None or job.state not in ACTIVE_STATES):
                self._apply_left_over(job, store)
                try:
                    held = self._held(job)
                    edit = edit_snapshot(store, add=labels, label_names=self._dataset_names(job, held), model=held)
                except LabelError as exc:
                    raise _http_error(exc) from None
                self._published(job, edit.version)
                self._event(model_id, {"op": "add", "names": names, "label_ids": edit.added.tolist()}, edit.version)
                return {"label_ids": edit.added.tolist(), "model_version": edit.version, "state": "applied"}
            known: set[str] = set(self._names(job)) | set(self._pending_names(model_id))
            taken = [n for n in names if n in known]
            if taken:
                raise Conflict(f"label {taken[0][:80]!r} exists already (or is pending) in model {model_id}")
            request = {"op": "add", "labels": [{"name": n, "examples": e} for n, e in labels]}
            request_id = self._hand_over(model_id, request)
        return {"label_ids": None, "model_version": None, "state": "pending", "request_id": request_id}

    def retire(self, model_id: str, label_id: int) -> bool:
        """Retire a label: True when done now, False when handed to the training job. NotFound for an unknown id."""
        job = self._editable(model_id)
        store = engine.SnapshotStore(self.settings.snapshots_dir(model_id), keep=self.settings.snapshot_keep)
        with self._queue_locked(model_id), self._without_trainer(model_id) as free:
            if free and (store.latest() is not None or job.state not in ACTIVE_STATES):
                self._apply_left_over(job, store)
                try:
                    edit = edit_snapshot(store, retire=[label_id], model=self._held(job))
                except LabelError as exc:
                    if exc.field == "ids":
                        raise NotFound("label", str(label_id)) from None
                    raise _http_error(exc) from None
                if edit.version is not None:
                    self._published(job, edit.version)
                    self._event(model_id, {"op": "retire", "label_ids": edit.retired.tolist()}, edit.version)
                return True
            loaded = self.registry.current(model_id, job.state)
            if not 0 <= label_id < int(loaded.model.num_labels) + len(self._pending_names(model_id)):
                raise NotFound("label", str(label_id))
            self._hand_over(model_id, {"op": "retire", "ids": [int(label_id)]})
        return False

    def page(self, model_id: str, limit: int, after: int) -> tuple[int, list[dict[str, Any]], int | None]:
        """(version, labels with id > after, up to limit, the id to continue after or None)."""
        job = self._job(model_id)
        loaded = self.registry.current(model_id, job.state)
        model = loaded.model
        names = self.registry.label_names(loaded, self.settings.dataset_dir(job.train_dataset_id))
        retired = retired_mask(model)
        start = max(0, after + 1)
        stop = min(int(model.num_labels), start + limit)
        page_names = names.names(range(start, stop)) if names is not None else [None] * (stop - start)
        data = [
            {"id": i, "name": page_names[i - start], "status": "retired" if retired[i] else "live"}
            for i in range(start, stop)
        ]
        return loaded.version, data, (stop - 1 if stop < model.num_labels and data else None)

    def pending(self, model_id: str) -> list[dict[str, Any]]:
        """The requests handed to the job's trainer that no version serves yet, oldest first."""
        out: list[dict[str, Any]] = []
        for path, request in self._queued(model_id):
            entry: dict[str, Any] = {"request_id": path.stem.split("-", 1)[-1], "op": request.get("op")}
            if entry["op"] == "add":
                entry["names"] = [str(label.get("name")) for label in request.get("labels", [])]
            elif entry["op"] == "retire":
                entry["label_ids"] = [int(i) for i in request.get("ids", [])]
            else:
                continue
            out.append(entry)
        return out

    def settle(self, job_id: str) -> None:
        """Apply, in a thread, the requests left by the job's trainer process, which has exited (the supervisor
        calls this when it reaps one, and at start-up for every job recovery left without a trainer): a killed
        trainer, or one that failed before its last look at them, never applies them, and nothing else would until
        the next label change or resume."""
        if self._queued(job_id):
            threading.Thread(target=self._settle, args=(job_id,), name=f"labels-{job_id[:8]}", daemon=True).start()

    def _settle(self, job_id: str) -> None:
        try:
            job = self._job(job_id)
            store = engine.SnapshotStore(self.settings.snapshots_dir(job_id), keep=self.settings.snapshot_keep)
            with self._queue_locked(job_id), self._without_trainer(job_id) as free:
                if free and store.latest() is not None:  # else a trainer (resumed meanwhile) applies them
                    self._apply_left_over(job, store)
        except NotFound:
            return  # deleted meanwhile, requests and all
        except Exception:  # noqa: BLE001 - the next label change or resume applies them instead
            log.exception("model %s: could not apply the label requests its trainer left", job_id)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _queued(self, model_id: str) -> list[tuple[Path, dict[str, Any]]]:
        """(file, request) of every request waiting in the job's queue, oldest first (unreadable ones skipped)."""
        queue = self.settings.job_dir(model_id) / LABEL_REQUESTS
        out = []
        for path in sorted(queue.glob("*.json")) if queue.is_dir() else []:
            try:
                request = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(request, dict):
                out.append((path, request))
        return out

    def _names(self, job: JobRow) -> list[str]:
        try:
            loaded = self.registry.current(job.id, job.state)
        except Exception:  # noqa: BLE001 - no snapshot yet: nothing to clash with
            return []
        model = loaded.model
        if model.label_names is None:
            names = self.registry.label_names(loaded, self.settings.dataset_dir(job.train_dataset_id))
            if names is not None:
                return list(names.to_list())
        return label_names_list(model)

    def _pending_names(self, model_id: str) -> list[str]:
        return [label["name"] for _, request in self._queued(model_id) for label in request.get("labels", [])]

    def _hand_over(self, model_id: str, request: dict[str, Any]) -> str:
        """Write a request for the job's trainer (atomically: a temp file renamed into the queue directory)."""
        request_id = uuid.uuid4().hex
        queue = self.settings.job_dir(model_id) / LABEL_REQUESTS
        queue.mkdir(parents=True, exist_ok=True)
        tmp = queue / f".{request_id}.tmp"
        tmp.write_text(json.dumps({"request_id": request_id, **request}))
        os.replace(tmp, queue / f"{time.time_ns():020d}-{request_id}.json")
        log.info("model %s: label request %s handed to its trainer", model_id, request_id)
        return request_id

    def _held(self, job: JobRow) -> Any:
        """The model the registry serves (edits start from it rather than reading it again), None if none."""
        held = self.registry.peek(job.id)
        return held.model if held is not None else None

    def _apply_left_over(self, job: JobRow, store: engine.SnapshotStore) -> None:
        """Apply the requests handed to a trainer that stopped before it saw them (killed, or failed), oldest first,
        each reported as a `labels` event as its trainer would have. The caller holds both of the job's locks."""
        queue = self.settings.job_dir(job.id) / LABEL_REQUESTS
        for path in sorted(queue.glob("*.json")) if queue.is_dir() else []:
            event: dict[str, Any] = {"request_id": path.stem.split("-", 1)[-1]}
            version = None
            try:
                request = json.loads(path.read_text())
                event["op"] = request.get("op")
                if request.get("op") == "add":
                    names = [label["name"] for label in request["labels"]]
                    add = [
                        (label["name"], [request_instance(e) for e in label["examples"]]) for label in request["labels"]
                    ]
                    held = self._held(job)
                    edit = edit_snapshot(store, add=add, label_names=self._dataset_names(job, held), model=held)
                    event.update(names=names, label_ids=edit.added.tolist())
                else:
                    edit = edit_snapshot(store, retire=[int(i) for i in request["ids"]], model=self._held(job))
                    event.update(label_ids=edit.retired.tolist())
                version = edit.version
                self._published(job, version)
            except (ValueError, KeyError, TypeError) as exc:  # engine.labels.LabelError is a ValueError
                event["error"] = f"{type(exc).__name__}: {exc}"
            self._event(job.id, event, version)
            path.unlink(missing_ok=True)
            log.info("model %s: label request %s applied to its newest snapshot", job.id, event["request_id"])

    def _published(self, job: JobRow, version: int | None) -> None:
        if version is None:
            return
        try:  # served from the next request: the edit applied to the model held
            self.registry.refresh(job.id, job.state)
        except Exception:  # noqa: BLE001 - the version is on disk: the next request loads it
            log.exception("model %s: could not load version %s", job.id, version)
            self.registry.evict(job.id)
        path = self.settings.snapshots_dir(job.id) / f"v{int(version):06d}"
        try:
            full_chain = engine.delta.depth(read_manifest(path)) >= engine.delta.MAX_DEPTH
        except engine.SnapshotError:
            full_chain = False
        if full_chain:  # compacted now, after this answer, so that no edit waits for it
            threading.Thread(target=self._compact, args=(job.id,), name=f"compact-{job.id[:8]}", daemon=True).start()
        try:
            with self.jobs.db.session() as s:
                s.merge(
                    ModelVersionRow(
                        job_id=job.id, version=int(version), step=job.step, epoch=job.epoch, samples=job.samples
                    )
                )
        except Exception:  # noqa: BLE001 - the version is on disk either way; listing reads the disk
            log.exception("model %s: could not record version %s", job.id, version)

    def _compact(self, job_id: str) -> None:
        """Make the newest version, a delta that ends a full chain, a full version under its own number
        (engine.delta.compact): the next edit is a delta again, and clients see the version the edit answered, as
        it was. Left to a trainer when one runs (its snapshots are full versions)."""
        try:
            job = self._job(job_id)
            store = engine.SnapshotStore(self.settings.snapshots_dir(job_id), keep=self.settings.snapshot_keep)
            with self._without_trainer(job_id) as free:
                if free:
                    version = engine.delta.compact(store, model=self._held(job))
                    if version is not None:
                        log.info("model %s: version %d compacted into a full version", job_id, version)
        except Exception:  # noqa: BLE001 - the next edit compacts instead
            log.exception("model %s: could not compact its label edits", job_id)

    def _event(self, model_id: str, event: dict[str, Any], version: int | None) -> None:
        append_label_event(self.settings.job_dir(model_id), {**event, "model_version": version})


def append_label_event(job_dir: Path, event: dict[str, Any]) -> None:
    """One line of the job's label events (read by the events stream)."""
    with open(job_dir / LABEL_EVENTS, "a") as fh:
        fh.write(json.dumps({"at": time.time(), **event}) + "\n")


def _http_error(exc: LabelError) -> Exception:
    if exc.conflict:
        return Conflict(str(exc))
    return InvalidContent(f"labels: {exc}", loc=("body", "labels"))
