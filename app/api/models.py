"""/v1/models: one model per job (id = job id), served live from its newest snapshot or from an exact retained
version; its versions; evaluation over HTTP. /v1/evaluations/{id}: a background evaluation's state."""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Body, Path, Response

import engine
from app.api.datasets import Cursor, Limit
from app.api.deps import (
    AliasesDep,
    DatasetsDep,
    EvaluationsDep,
    JobsDep,
    RegistryDep,
    ServicesDep,
    SettingsDep,
)
from app.api.jobs import metric_point
from app.db import EvaluationRow, JobRow, ModelVersionRow
from app.domain import RESUMABLE_STATES, TRAINING_STATES, JobState
from app.errors import problem_responses
from app.schemas import (
    EvaluateRequest,
    EvaluationPublic,
    ModelList,
    ModelPublic,
    ModelVersionPublic,
    PredictRequest,
    PredictResponse,
    VersionList,
    VersionPublic,
)
from app.services.container import Services
from app.services.datasets import DatasetService
from app.services.errors import InvalidContent, NotFound, NotReady
from app.services.jobs import JobService
from app.services.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from app.services.registry import ModelRegistry, PredictResult
from app.settings import Settings
from engine.metrics import softmax_rows

router = APIRouter(prefix="/v1/models", tags=["models"])
evaluations_router = APIRouter(prefix="/v1/evaluations", tags=["models"])

PREDICT_EXAMPLES = {
    "one": {
        "summary": "One query, scored as the model's calibration chose (auto)",
        "value": {"instances": [{"indices": [0, 2, 5], "values": [1.0, 0.5, 0.25]}], "k": 5, "mode": "auto"},
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
PredictBody = Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)]
# Through an alias the model is often one trained on text.
TEXT_PREDICT_EXAMPLES = {
    "text": {
        "summary": "A text query (model trained on a JSONL text dataset), with probabilities",
        "value": {"instances": [{"text": "red running shoes"}], "k": 3, "probabilities": True},
    },
    **PREDICT_EXAMPLES,
}
TextPredictBody = Annotated[PredictRequest, Body(openapi_examples=TEXT_PREDICT_EXAMPLES)]


def instances_of(body: PredictRequest) -> list[Any]:
    return [i.text if i.text is not None else (i.indices, i.values) for i in body.instances]


def predict_response(model_id: str, result: PredictResult, body: PredictRequest, alias: str | None = None) -> Response:
    """The PredictResponse as JSON, encoded directly: the values come from the engine and are already of the
    schema's types, so validating them again through the response model would only cost time."""
    probabilities = softmax_rows(result.scores) if body.probabilities else None
    names, notes = result.names, result.notes
    content = {
        "model_id": model_id,
        "model_version": result.version,
        "mode": result.mode,
        "alias": alias,
        "predictions": [
            {
                "labels": labels,
                "names": names[r] if names is not None else None,
                "scores": _finite(scores),
                "probabilities": _finite(probabilities[r]) if probabilities is not None else None,
                "note": notes[r] if notes is not None else None,
            }
            for r, (labels, scores) in enumerate(zip(result.labels, result.scores, strict=True))
        ],
        "warnings": _short_answers(result, body.k),
    }
    return Response(
        json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(),
        media_type="application/json",
    )


def _finite(xs: list[float]) -> list[float | None]:
    """JSON has no NaN or infinity: null for them, as pydantic encodes them."""
    if all(math.isfinite(x) for x in xs):
        return xs  # type: ignore[return-value]
    return [x if math.isfinite(x) else None for x in xs]


def run_predict(
    services: Services, model_id: str, body: PredictRequest, version: int | None, loaded: Any = None
) -> PredictResult:
    """The blocking part of a predict request (in the predict pool; on the event loop for a small request to a
    model already loaded, `loaded`, whose job was looked up before)."""
    jobs, registry = services.jobs, services.registry
    names_from = registry.dataset_dir(model_id) if loaded is not None else None
    job_state = None
    if names_from is None:
        job = _job_of(jobs, model_id)  # 404 for an unknown id
        names_from, job_state = services.settings.dataset_dir(job.train_dataset_id), job.state
        registry.remember_dataset_dir(model_id, names_from)
    start = time.perf_counter()
    try:
        result = registry.predict(
            model_id,
            instances_of(body),
            body.k,
            body.mode,
            version=version,
            loaded=loaded,
            names_from=names_from,
            job_state=job_state,
        )
    except NotReady as exc:
        raise _not_ready(jobs, model_id, exc) from exc
    services.telemetry.observe_predict(model_id, body.mode, len(body.instances), time.perf_counter() - start)
    return result


async def predict_now_or_in_pool(
    services: Services, model_id: str, body: PredictRequest, version: int | None
) -> PredictResult:
    """Answer a small request to a loaded model here, on the event loop (well under a millisecond of work: see
    ModelRegistry.predicts_inline), anything else in a thread of the bounded predict pool."""
    registry = services.registry
    max_inline = services.settings.predict_inline_max_instances
    if max_inline and registry.dataset_dir(model_id) is not None:
        loaded = registry.held_current(model_id) if version is None else registry.held_version(model_id, version)
        if loaded is not None and registry.predicts_inline(loaded, instances_of(body), body.mode, max_inline):
            # it holds one of the pool's tokens too, so SLIDE_PREDICT_CONCURRENCY bounds both paths together
            try:
                registry.limiter.acquire_nowait()
            except anyio.WouldBlock:
                pass  # every token is taken: wait for one in the pool
            else:
                try:
                    return run_predict(services, model_id, body, version, loaded)
                finally:
                    registry.limiter.release()
    return await anyio.to_thread.run_sync(run_predict, services, model_id, body, version, limiter=registry.limiter)


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
    job: JobRow,
    jobs: JobService,
    datasets: DatasetService,
    registry: ModelRegistry,
    settings: Settings,
    with_resolved: bool = False,
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
    public = _model_public(job, jobs.versions(job.id), on_disk, dims)
    if with_resolved and on_disk:
        try:
            path = engine.SnapshotStore(settings.snapshots_dir(job.id)).path(max(on_disk))
            public.resolved = engine.manifest_resolved(engine.read_manifest(path))
        except (engine.SnapshotError, engine.ConfigError, KeyError):
            pass  # pruned meanwhile, or unreadable: the rest of the answer stands
    return public


@router.get(
    "",
    response_model=ModelList,
    summary="List models (one per job), newest first",
    responses=problem_responses(401, 422),
)
def list_models(
    jobs: JobsDep,
    datasets: DatasetsDep,
    registry: RegistryDep,
    settings: SettingsDep,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> ModelList:
    rows, next_cursor = jobs.page(limit, cursor)
    data = [_describe(j, jobs, datasets, registry, settings) for j in rows]
    return ModelList(data=data, count=len(data), next_cursor=next_cursor)


@router.get(
    "/{model_id}",
    response_model=ModelPublic,
    summary="Get a model and its snapshot versions",
    responses=problem_responses(401, 404),
)
def get_model(
    model_id: str, jobs: JobsDep, datasets: DatasetsDep, registry: RegistryDep, settings: SettingsDep
) -> ModelPublic:
    return _describe(_job_of(jobs, model_id), jobs, datasets, registry, settings, with_resolved=True)


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    summary="Top-k labels from the live model",
    responses=problem_responses(400, 401, 404, 409, 422, 503),
)
async def predict(model_id: str, services: ServicesDep, body: PredictBody) -> Response:
    """Served from the newest published snapshot of the job's weights and hash tables: while the job trains,
    answers improve as new snapshots appear (`model_version` says which one answered). 503 before the first while the
    job is queued or training (the detail says whether it is still queued, and where); 409 when the job has no
    snapshot and is not training (resume it or start a new one). `scores` are raw logits; `warnings` says why a
    prediction has fewer than k labels. An instance is `{"indices", "values"}` or, for a model trained on a text
    dataset, `{"text"}`; each prediction has the label ids, their `names` (null when the model has none) and
    scores, and a `note` when it has fewer than k labels or no word of the text is known."""
    result = await predict_now_or_in_pool(services, model_id, body, None)
    return predict_response(model_id, result, body)


@router.post(
    "/{model_id}/versions/{version}/predict",
    response_model=PredictResponse,
    summary="Top-k labels from one exact retained version",
    responses=problem_responses(400, 401, 404, 422),
)
async def predict_version(
    model_id: str, version: Annotated[int, Path(ge=1, le=2**31 - 1)], services: ServicesDep, body: PredictBody
) -> Response:
    """As `POST /v1/models/{id}/predict`, from exactly `version`. 404 when that version is not retained (pruned
    beyond SLIDE_SNAPSHOT_KEEP; an alias pinned to a version keeps it)."""
    result = await predict_now_or_in_pool(services, model_id, body, version)
    return predict_response(model_id, result, body)


@router.get(
    "/{model_id}/versions",
    response_model=VersionList,
    summary="Retained versions of a model, newest first",
    responses=problem_responses(401, 404, 422),
)
def list_versions(
    model_id: str,
    jobs: JobsDep,
    aliases: AliasesDep,
    evaluations: EvaluationsDep,
    settings: SettingsDep,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> VersionList:
    """The versions on disk (the newest SLIDE_SNAPSHOT_KEEP, plus any an alias pins), each with its training
    progress, the training-time evaluation nearest before it, and its HTTP evaluations."""
    jobs.get(model_id)
    on_disk = sorted(engine.SnapshotStore(settings.snapshots_dir(model_id)).versions(), reverse=True)
    if cursor:
        (before,) = decode_cursor(cursor, (int,))
        on_disk = [v for v in on_disk if v < before]
    page = on_disk[:limit]
    next_cursor = encode_cursor(page[-1]) if len(on_disk) > limit else None
    rows = {v.version: v for v in jobs.versions(model_id)}
    points = [p for p in jobs.metrics(model_id) if p.p_at_1 is not None or p.loss is not None]
    pinned: dict[int, list[str]] = {}
    for a in aliases.by_model(model_id):
        if a.version is not None:
            pinned.setdefault(a.version, []).append(a.name)
    evals: dict[int, list[EvaluationPublic]] = {}
    for e in evaluations.for_model(model_id):
        if e.model_version is not None:
            evals.setdefault(e.model_version, []).append(evaluation_public(e))
    data = []
    for number in page:
        row = rows.get(number)
        before_it = [p for p in points if row is not None and p.step <= row.step]
        data.append(
            VersionPublic(
                version=number,
                step=row.step if row else None,
                epoch=row.epoch if row else None,
                samples=row.samples if row else None,
                created_at=row.created_at if row else None,
                aliases=pinned.get(number, []),
                metrics=metric_point(before_it[-1]) if before_it else None,
                evaluations=evals.get(number, []),
            )
        )
    return VersionList(model_id=model_id, data=data, count=len(data), next_cursor=next_cursor)


def evaluation_public(row: EvaluationRow) -> EvaluationPublic:
    metrics = row.metrics or {}
    return EvaluationPublic(
        id=row.id,
        model_id=row.model_id,
        dataset_id=row.dataset_id,
        model_version=row.model_version,
        mode=row.mode,
        k=row.k,
        state=row.state,  # type: ignore[arg-type]
        **{key: metrics.get(key) for key in ("p_at_1", "p_at_3", "p_at_5", "ndcg_at_5", "psp_at_5", "points")},
        recall_vs_exact=metrics.get("recall_vs_exact"),
        seconds=row.seconds,
        error=row.error,
        created_at=row.created_at,
        finished_at=row.finished_at,
        status_url=f"/v1/evaluations/{row.id}",
    )


@router.post(
    "/{model_id}/evaluate",
    response_model=EvaluationPublic,
    summary="Evaluate a model version on a dataset",
    responses={
        202: {"model": EvaluationPublic, "description": "A large set: running in the background; poll status_url"},
        **problem_responses(400, 401, 404, 422, 503),
    },
)
async def evaluate(
    model_id: str, body: EvaluateRequest, response: Response, evaluations: EvaluationsDep
) -> EvaluationPublic:
    """P@1, P@3, P@5, nDCG@5, PSP@5 (propensities from the model's training set) over every point of
    `dataset_id`, plus `recall_vs_exact` for lsh / auto. Sets of up to 2,000 points answer 200 with the result;
    larger ones answer 202 with `status_url` (also the Location header) to poll."""
    row, finished = await anyio.to_thread.run_sync(
        evaluations.start, model_id, body.dataset_id, body.k, body.mode, body.version
    )
    if finished and row.state == "failed":
        raise InvalidContent(f"the evaluation failed: {row.error}", loc=("body",))
    if not finished:
        response.status_code = 202
    response.headers["Location"] = f"/v1/evaluations/{row.id}"
    return evaluation_public(row)


@evaluations_router.get(
    "/{evaluation_id}",
    response_model=EvaluationPublic,
    summary="An evaluation's state and result",
    responses=problem_responses(401, 404),
)
def get_evaluation(evaluation_id: str, evaluations: EvaluationsDep) -> EvaluationPublic:
    return evaluation_public(evaluations.get(evaluation_id))


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
