"""/v1/models: one model per job (id = job id), served live from its newest snapshot."""

from __future__ import annotations

import time
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Body

import engine
from app.api.deps import DatasetsDep, JobsDep, RegistryDep, SettingsDep, TelemetryDep
from app.db import JobRow, ModelVersionRow
from app.domain import RESUMABLE_STATES, TRAINING_STATES, JobState
from app.errors import problem_responses
from app.schemas import ModelList, ModelPublic, ModelVersionPublic, Prediction, PredictRequest, PredictResponse
from app.services.datasets import DatasetService
from app.services.errors import NotFound, NotReady
from app.services.jobs import JobService
from app.services.registry import ModelRegistry, PredictResult
from app.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"])


def _model_public(
    job: JobRow, versions: list[ModelVersionRow], on_disk: list[int], dims: tuple[int, int] | None
) -> ModelPublic:
    by_version = {v.version: v for v in versions}
    listed = []
    for number in sorted(set(by_version) | set(on_disk)):
        row = by_version.get(number)
        listed.append(
            ModelVersionPublic(
                version=number,
                step=row.step if row else None,
                epoch=row.epoch if row else None,
                samples=row.samples if row else None,
                created_at=row.created_at if row else None,
                available=number in on_disk,
            )
        )
    return ModelPublic(
        id=job.id,
        job_state=job.state,
        ready=bool(on_disk),
        latest_version=max(on_disk) if on_disk else None,
        num_features=dims[0] if dims else None,
        num_labels=dims[1] if dims else None,
        train_dataset_id=job.train_dataset_id,
        versions=listed,
    )


def _describe(
    job: JobRow, jobs: JobService, datasets: DatasetService, registry: ModelRegistry, settings: Settings
) -> ModelPublic:
    on_disk = engine.SnapshotStore(settings.snapshots_dir(job.id)).versions()
    held = registry.peek(job.id)
    dims = None
    if held is not None:
        dims = (int(held.model.num_features), int(held.model.num_labels))
    else:
        try:
            ds = datasets.get(job.train_dataset_id)
            dims = (ds.num_features, ds.num_labels)
        except NotFound:
            pass
    return _model_public(job, jobs.versions(job.id), on_disk, dims)


@router.get("", response_model=ModelList, summary="List models (one per job)", responses=problem_responses(401))
def list_models(jobs: JobsDep, datasets: DatasetsDep, registry: RegistryDep, settings: SettingsDep) -> ModelList:
    data = [_describe(j, jobs, datasets, registry, settings) for j in jobs.list()]
    return ModelList(data=data, count=len(data))


@router.get(
    "/{model_id}",
    response_model=ModelPublic,
    summary="Get a model and its snapshot versions",
    responses=problem_responses(401, 404),
)
def get_model(
    model_id: str, jobs: JobsDep, datasets: DatasetsDep, registry: RegistryDep, settings: SettingsDep
) -> ModelPublic:
    return _describe(_job_of(jobs, model_id), jobs, datasets, registry, settings)


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    summary="Top-k labels from the live model",
    responses=problem_responses(400, 401, 404, 409, 422, 503),
)
async def predict(
    model_id: str,
    jobs: JobsDep,
    registry: RegistryDep,
    telemetry: TelemetryDep,
    body: Annotated[
        PredictRequest,
        Body(
            openapi_examples={
                "one": {
                    "summary": "One query, scored as the model's calibration chose (auto)",
                    "value": {
                        "instances": [{"indices": [0, 2, 5], "values": [1.0, 0.5, 0.25]}],
                        "k": 5,
                        "mode": "auto",
                    },
                },
                "exact": {
                    "summary": "Two queries, all labels scored",
                    "value": {
                        "instances": [{"indices": [1, 2], "values": [1.0, 1.0]}, {"indices": [3], "values": [0.7]}],
                        "k": 3,
                        "mode": "exact",
                    },
                },
            }
        ),
    ],
) -> PredictResponse:
    """Served from the newest published snapshot of the job's weights and hash tables: while the job trains,
    answers improve as new snapshots appear (`model_version` says which one answered). 503 before the first while the
    job is queued or training (the detail says whether it is still queued, and where); 409 when the job has no
    snapshot and is not training (resume it or start a new one). `scores` are raw logits; `warnings` says why a
    prediction has fewer than k labels."""

    def work() -> PredictResult:
        job = _job_of(jobs, model_id)  # 404 for an unknown id
        start = time.perf_counter()
        instances = [(i.indices, i.values) for i in body.instances]
        try:
            result = registry.predict(model_id, instances, body.k, body.mode, job_state=job.state)
        except NotReady as exc:
            raise _not_ready(jobs, model_id, exc) from exc
        telemetry.observe_predict(model_id, body.mode, len(body.instances), time.perf_counter() - start)
        return result

    # One hop to a thread of the predict pool (bounded: see ModelRegistry.limiter); the response is built here.
    result = await anyio.to_thread.run_sync(work, limiter=registry.limiter)
    return PredictResponse(
        model_id=model_id,
        model_version=result.version,
        mode=result.mode,
        predictions=[Prediction(labels=ls, scores=ss) for ls, ss in zip(result.labels, result.scores, strict=True)],
        warnings=_short_answers(result, body.k),
    )


def _job_of(jobs: JobService, model_id: str) -> JobRow:
    try:
        return jobs.get(model_id)
    except NotFound:
        raise NotFound("model", model_id) from None


def _not_ready(jobs: JobService, model_id: str, exc: NotReady) -> NotReady:
    """A model without a snapshot: say what its job is doing, so a client knows whether retrying helps."""
    job = jobs.get(model_id)
    settings = jobs.settings
    if job.state == JobState.QUEUED:
        slot = jobs.queue().get(model_id)
        position, reason = (slot.position, slot.reason) if slot is not None else (None, None)
        place = f", {_ordinal(position)} in the queue" if position else ""
        why = f" ({reason})" if reason else ""
        detail = (
            f"model {model_id} has no snapshot yet: its job is queued{place}{why}; once it runs, it publishes "
            f"its first snapshot within {settings.snapshot_interval_s:g}s (SLIDE_SNAPSHOT_INTERVAL_S); retry then"
        )
        return NotReady(
            detail, retry_after_s=exc.retry_after_s, job_state=job.state, queue_position=position, queue_reason=reason
        )
    if job.state in TRAINING_STATES:
        return NotReady(exc.detail, retry_after_s=exc.retry_after_s, job_state=job.state)
    detail = f"model {model_id} has no snapshot yet: its job is {job.state} and never published one" + (
        "; resume it (POST /v1/jobs/{id}/resume) to train" if job.state in RESUMABLE_STATES else ""
    )
    return NotReady(detail, retry_after_s=exc.retry_after_s, job_state=job.state)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _short_answers(result: PredictResult, k: int) -> list[str]:
    warnings = []
    expected = min(k, result.num_labels) if result.num_labels else k
    if result.num_labels and k > result.num_labels:
        warnings.append(
            f"k={k} is more than the model's {result.num_labels} labels: "
            f"each prediction has at most {result.num_labels}"
        )
    short = [i for i, labels in enumerate(result.labels) if len(labels) < expected]
    if short:
        shown = ", ".join(map(str, short[:10])) + (f" and {len(short) - 10} more" if len(short) > 10 else "")
        warnings.append(
            f"instances {shown}: the hash tables retrieved fewer than {expected} labels; "
            "mode `exact` scores every label"
        )
    return warnings
