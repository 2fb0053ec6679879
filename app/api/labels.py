"""/v1/models/{id}/labels: add labels to a model online (imprinted from a few examples), retire them, list them."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Path, Response

from app.api.datasets import Cursor, Limit
from app.api.deps import LabelsDep
from app.errors import problem_responses
from app.schemas import Instance, LabelList, LabelPublic, LabelsAdd, LabelsAdded, PendingLabelRequest
from app.services.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor

router = APIRouter(prefix="/v1/models", tags=["labels"])


def _instance(i: Instance) -> str | tuple[list[int], list[float]]:
    if i.text is not None:
        return i.text
    assert i.indices is not None and i.values is not None  # Instance's validator: text, or both
    return (i.indices, i.values)


@router.post(
    "/{model_id}/labels",
    response_model=LabelsAdded,
    status_code=201,
    summary="Add labels, each imprinted from a few example points",
    responses={
        202: {"model": LabelsAdded, "description": "The job is training: its trainer applies them at its next step"},
        **problem_responses(400, 401, 404, 409, 422),
    },
)
async def add_labels(model_id: str, body: LabelsAdd, response: Response, labels: LabelsDep) -> LabelsAdded:
    """Each new label gets an output row imprinted from its examples (a mix of the rows of the labels the model
    scores highest on them, so it never outranks the best of those) and is inserted into every hash table; the
    model is published as a new version that answers from the very next request. New ids follow the model's
    existing ones, in the order given. On a job that is training the request goes to its trainer (202): it applies
    it before its next step, publishes a snapshot at once, keeps the labels in every later one and reports them as
    a `labels` event on `/v1/jobs/{id}/events`. 409 for a name the model has already; 422 for a label without
    examples."""
    request = [(label.name, [_instance(e) for e in label.examples]) for label in body.labels]
    result = await anyio.to_thread.run_sync(labels.add, model_id, request)
    if result["state"] == "pending":
        response.status_code = 202
    return LabelsAdded(**result)


@router.delete(
    "/{model_id}/labels/{label_id}",
    status_code=204,
    summary="Retire a label: never predicted again",
    responses={
        202: {"description": "The job is training: its trainer retires it at its next step"},
        **problem_responses(401, 404),
    },
)
async def retire_label(
    model_id: str, label_id: Annotated[int, Path(ge=0, le=2**31 - 1)], labels: LabelsDep
) -> Response:
    """The label's score becomes -inf in every mode (lsh, exact, auto), it leaves the hash tables' buckets, and a
    training job stops sampling it; published as a new version (this one and every later one never return it).
    Retiring a retired label is a no-op (204). On a job that is training: 202, applied at its next step."""
    done = await anyio.to_thread.run_sync(labels.retire, model_id, label_id)
    return Response(status_code=204 if done else 202)


@router.get(
    "/{model_id}/labels",
    response_model=LabelList,
    summary="The model's labels with their names and status",
    responses=problem_responses(401, 404, 422, 503),
)
async def list_labels(
    model_id: str, labels: LabelsDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
) -> LabelList:
    """Labels of the newest version in id order: name (null when the model has none) and `live` or `retired`; and
    the changes handed to a training job that no version serves yet (`pending`)."""
    after = decode_cursor(cursor, (int,))[0] if cursor else -1
    version, data, last = await anyio.to_thread.run_sync(labels.page, model_id, limit, after)
    pending = await anyio.to_thread.run_sync(labels.pending, model_id)
    return LabelList(
        model_id=model_id,
        model_version=version,
        data=[LabelPublic(**d) for d in data],
        count=len(data),
        next_cursor=encode_cursor(last) if last is not None else None,
        pending=[PendingLabelRequest(**p) for p in pending],
    )
