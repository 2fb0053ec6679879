"""Types the services, the database layer, the schemas and the trainer process share.

Standard library only: the trainer process imports this module before anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """Where a job is in its life. The API returns these values; the jobs table stores them."""

    QUEUED = "queued"
    """Waiting for a training slot (SLIDE_MAX_CONCURRENT_JOBS)."""
    RUNNING = "running"
    """A trainer process is training it."""
    STOPPING = "stopping"
    """Asked to stop: its trainer writes a checkpoint, then records `stopped`."""
    STOPPED = "stopped"
    """Stopped by the user; it can be resumed."""
    COMPLETED = "completed"
    """Trained all its epochs."""
    FAILED = "failed"
    """Its trainer failed (the job's `error` says why); it can be resumed."""
    INTERRUPTED = "interrupted"
    """The service stopped while it trained; it can be resumed."""


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.STOPPING)
"""States in which a trainer process runs or is about to."""
RESUMABLE_STATES = (JobState.STOPPED, JobState.FAILED, JobState.INTERRUPTED)
TERMINAL_STATES = (JobState.STOPPED, JobState.COMPLETED, JobState.FAILED, JobState.INTERRUPTED)
"""States no trainer process leaves on its own."""
TRAINING_STATES = (JobState.RUNNING, JobState.STOPPING)
"""States in which a trainer process runs."""
DATA_READING_STATES = tuple(s for s in JobState if s is not JobState.COMPLETED)
"""States in which a job may still read its datasets (it runs, or it can be resumed)."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a trainer process needs to run one job (it is pickled into the process)."""

    job_id: str
    job_dir: str
    snapshots_dir: str
    train_path: str
    eval_path: str | None
    config: dict[str, Any]
    """The job's engine settings, as stored (engine.SlideConfig.from_dict reads them)."""
    database_url: str
    snapshot_interval_s: float
    snapshot_keep: int
    trainer_threads: int
    """Numba threads for the trainer; 0 = Numba's default."""
    nice: int
    """Added to the trainer process's niceness before any thread starts (0 = unchanged)."""
    progress_interval_s: float
    parent_pid: int
    """The service process: the trainer checkpoints and exits if it goes away."""
    run: int
    """The job's `runs` value for this process: its database writes are fenced by it."""
    memory_estimate: int | None = None
    """Bytes the trainer is estimated to need (engine.memory); its memory ceiling is set from it. None = none."""
    memory_estimate_text: str | None = None
    """The estimate's breakdown, for the trainer's log and its out-of-memory message."""
    init_from: str | None = None
    """A snapshot version directory the job starts from (fine-tuning), or None for a fresh model."""
    ray_address: str | None = None
    """The Ray cluster of a job with a ray backend (None: the job trains in its own process)."""
    shards: int = 0
    """Label shards of a job with a ray backend (0: the job trains in its own process)."""
    shard_memory: int | None = None
    """Bytes each shard reserves from Ray's `memory` resource (its estimate), or None."""


TRAINER_LOCK = "trainer.lock"
"""File in a job's directory that its trainer process holds locked (flock) while it runs."""
LABEL_REQUESTS = "label-requests"
"""Directory in a job's directory where label additions and retirements wait for its trainer (one JSON file each)."""
LABEL_QUEUE_LOCK = "label-requests.lock"
"""File in a job's directory locked (flock) while a label request is handed over, and by a trainer from its last look
at LABEL_REQUESTS until it exits (after it released TRAINER_LOCK): a request is either seen by the trainer or
handed over after the trainer lock is free, when the service applies it to the newest snapshot itself."""
LABEL_EVENTS = "label-events.jsonl"
"""File in a job's directory: one JSON line per label change applied (the events stream's `labels` events)."""
BACKEND = "backend.json"
"""File in a job's directory saying where it trains (POST /v1/jobs `backend`); absent = this machine."""
INIT_FROM = "init-from.json"
"""File in a job's directory naming the model version it starts from (POST /v1/jobs `init_from`)."""


def request_instance(example: Any) -> Any:
    """A predict instance as a label request (LABEL_REQUESTS) stores it: text, or {"indices", "values"} (or an
    [indices, values] pair), as engine.labels.featurize_instances takes it."""
    if isinstance(example, dict):
        return example["text"] if example.get("text") is not None else (example["indices"], example["values"])
    return example
