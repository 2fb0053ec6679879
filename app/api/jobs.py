"""/v1/jobs: start (with Idempotency-Key), list, get, stop, resume, delete, metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response
from pydantic import ValidationError

from app.api.datasets import Cursor, Limit
from app.api.deps import JobsDep, RegistryDep
from app.db import METRIC_FIELDS, JobRow, MetricRow
from app.domain import JobState
from app.errors import problem_responses
from app.schemas import (
    EXAMPLE_ID,
    JOB_CONFIG_EXAMPLE,
    JobBackend,
    JobCreate,
    JobList,
    JobProgress,
    JobPublic,
    MetricPoint,
    MetricSeries,
    SlideConfigModel,
)
from app.services.admission import QueueSlot
from app.services.jobs import JobService
from app.services.pagination import DEFAULT_LIMIT
from engine.config import upgrade_settings
from engine.memory import MemoryEstimate

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_CONFIG_FIELDS = set(SlideConfigModel.model_fields)
MAX_STEP = 2**63 - 1  # steps are BIGINT in the database: a larger bound cannot even be compared there


def job_publics(jobs: JobService, rows: list[JobRow]) -> list[JobPublic]:
    """The public form of each job: its latest model version, memory estimate and (queued) place in the queue."""
    versions = jobs.latest_versions([r.id for r in rows])
    memory = jobs.memory(rows)
    queue = jobs.queue() if any(r.state == JobState.QUEUED for r in rows) else {}
    return [job_public(r, versions.get(r.id), memory.get(r.id), queue.get(r.id), jobs.backend(r.id)) for r in rows]


def _config(config: dict[str, Any]) -> Any:
    try:
        return SlideConfigModel.model_validate(config)
    except ValidationError:  # stored before a bound it breaks existed: shown as it is
        return SlideConfigModel.model_construct(**config)


def job_public(
    row: JobRow,
    model_version: int | None,
    memory: MemoryEstimate | None = None,
    queue: QueueSlot | None = None,
    backend: dict[str, Any] | None = None,
) -> JobPublic:
    # a job created before the groups, null and words shows what it meant
    stored, _ = upgrade_settings(row.config or {})
    config: dict[str, Any] = {k: v for k, v in stored.items() if k in _CONFIG_FIELDS}
    latest = row.latest_metrics or None
    slot = queue if queue is not None and row.state == JobState.QUEUED else None
    return JobPublic(
        id=row.id,
        state=row.state,
        train_dataset_id=row.train_dataset_id,
        eval_dataset_id=row.eval_dataset_id,
        config=_config(config),
        backend=JobBackend.model_validate(backend or {}),
        progress=JobProgress(
            epoch=row.epoch or 0,
            epochs=int((config.get("schedule") or {}).get("epochs", 0)),
            step=row.step or 0,
            samples=row.samples or 0,
            samples_per_s=row.samples_per_s,
        ),
        latest_metrics=MetricPoint.model_validate(latest) if latest and latest.get("step") is not None else None,
        model_version=model_version,
        error=row.error,
        estimated_memory_bytes=memory.total if memory is not None else None,
        memory_breakdown=memory.breakdown() if memory is not None else None,
        queue_position=slot.position if slot is not None else None,
        queue_reason=slot.reason if slot is not None else None,
        runs=row.runs or 0,
        interruptions=row.interruptions or 0,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def metric_point(row: MetricRow) -> MetricPoint:
    return MetricPoint.model_validate({k: getattr(row, k) for k in METRIC_FIELDS})


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retry-safe creation: the same key with the same body returns the same job (200), never a "
        "second one; the same key with a different body is a 409.",
    ),
]


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    summary="Start a training job",
    responses={
        200: {"model": JobPublic, "description": "Replay: the job created earlier with this Idempotency-Key"},
        **problem_responses(400, 401, 409, 422),
    },
)
def create_job(
    jobs: JobsDep,
    response: Response,
    body: Annotated[
        JobCreate,
        Body(
            openapi_examples={
                "small": {
                    "summary": "A small run (paste the id of an uploaded dataset)",
                    "value": {"train_dataset_id": EXAMPLE_ID, "config": JOB_CONFIG_EXAMPLE},
                },
                "with_eval": {
                    "summary": "With a held-out set for P@1 / P@5",
                    "value": {
                        "train_dataset_id": EXAMPLE_ID,
                        "eval_dataset_id": "<id of the test set>",
                        "config": {"schedule": {"epochs": 10}, "sampling": {"hash_l": 32}},
                    },
                },
            }
        ),
    ],
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """The job trains in its own process; it is `queued` until a slot is free (SLIDE_MAX_CONCURRENT_JOBS), then
    `running`. Omitted config fields take the engine's defaults; a bad one is a 422 naming it. With `init_from` the
    job fine-tunes that model (its structure settings replace the config's)."""
    job, created = jobs.create(
        body.train_dataset_id,
        body.eval_dataset_id,
        body.config.model_dump(),
        idempotency_key=idempotency_key,
        init_from=body.init_from.model_dump() if body.init_from is not None else None,
        backend=body.backend.model_dump(),
    )
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    public = job_publics(jobs, [job])[0]
    flat = body.config.flat_name_notes()
    public.deprecations = flat + upgrade_settings(body.config.model_dump(exclude_unset=True))[1]
    return public


@router.get("", response_model=JobList, summary="List jobs, newest first", responses=problem_responses(401, 422))
def list_jobs(jobs: JobsDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> JobList:
    rows, next_cursor = jobs.page(limit, cursor)
    return JobList(data=job_publics(jobs, list(rows)), count=len(rows), next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    summary="Get a job: state, progress, latest metrics",
    responses=problem_responses(401, 404),
)
def get_job(job_id: str, jobs: JobsDep) -> JobPublic:
    return job_publics(jobs, [jobs.get(job_id)])[0]


@router.post(
    "/{job_id}/stop",
    status_code=202,
    response_model=JobPublic,
    summary="Stop a job (checkpoints first)",
    responses=problem_responses(401, 404, 409),
)
def stop_job(job_id: str, jobs: JobsDep) -> JobPublic:
    """A running job becomes `stopping`, writes a checkpoint, then `stopped`; poll the job to see it. A queued or
    interrupted job is `stopped` at once. Idempotent: stopping a stopping or stopped job is a 202 too; a completed
    or failed job is a 409."""
    return job_publics(jobs, [jobs.stop(job_id)])[0]


@router.post(
    "/{job_id}/resume",
    status_code=202,
    response_model=JobPublic,
    summary="Resume a stopped, failed or interrupted job from its checkpoint",
    responses=problem_responses(401, 404, 409),
)
def resume_job(job_id: str, jobs: JobsDep) -> JobPublic:
    """409 for a job that is queued, running, still `stopping` (retry once it is `stopped`) or completed."""
    return job_publics(jobs, [jobs.resume(job_id)])[0]


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Cancel and remove a job, its metrics and its model",
    responses=problem_responses(401, 404, 409),
)
def delete_job(job_id: str, jobs: JobsDep, registry: RegistryDep) -> Response:
    """In any state: a trainer still running is killed first (no checkpoint), then the job's rows and files go.
    409 while an alias points at the job's model (`aliases` lists them): move or delete those aliases first, so
    that no client calling an alias is left with 404s."""
    jobs.delete(job_id)
    registry.evict(job_id)
    return Response(status_code=204)


@router.get(
    "/{job_id}/metrics",
    response_model=MetricSeries,
    summary="The job's metric time series",
    responses=problem_responses(401, 404),
)
def job_metrics(
    job_id: str,
    jobs: JobsDep,
    since_step: Annotated[
        int, Query(ge=-1, le=MAX_STEP, description="Only points with step > since_step (-1 = all).")
    ] = -1,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> MetricSeries:
    rows = jobs.metrics(job_id, since_step=since_step, limit=limit)
    return MetricSeries(job_id=job_id, data=[metric_point(r) for r in rows], count=len(rows))
