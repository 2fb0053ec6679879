"""/v1/datasets: streamed uploads (Extreme Classification Repository format, or JSONL text), label names, list,
get, delete."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response

from app.api.deps import DatasetsDep, SettingsDep
from app.db import DatasetRow
from app.errors import problem_responses
from app.schemas import DatasetList, DatasetPublic
from app.services.datasets import DatasetService
from app.services.errors import PayloadTooLarge
from app.services.pagination import DEFAULT_LIMIT, MAX_LIMIT

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="The `next_cursor` of the previous page; omit for the first page."),
]

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The dataset file. `format=xmc` (default), Extreme Classification Repository format: a header line "
            "`N_points N_features N_labels`, then one point per line, `l1,l2 f:v f:v ...` (0-based ids; a line "
            'starting with a space has no labels). `format=jsonl`: one JSON object per line, `{"text": "...", '
            '"labels": ["name", ...]}`. Send it as the `file` field of multipart/form-data (Swagger\'s file '
            "picker), or as the raw body: `text/plain` or `application/x-ndjson`, or gzipped with `Content-Type: "
            "application/gzip` or `Content-Encoding: gzip`."
        ),
        "content": {
            # First: Swagger's "Try it out" opens on it, with the example in the box (a 6-feature, 3-label set
            # the predict examples fit).
            "text/plain": {
                "schema": {"type": "string"},
                "example": "4 6 3\n0,2 0:1.0 3:0.5\n1 1:0.25 4:1.0\n 2:1.0\n0 0:0.5 5:2.0\n",
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "train.txt or train.txt.gz"}
                    },
                }
            },
            "application/gzip": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _public(row: DatasetRow, datasets: DatasetService) -> DatasetPublic:
    public = DatasetPublic.model_validate(row, from_attributes=True)
    meta = datasets.text_meta(row.id)
    if meta:
        public.format = meta.get("format") or "xmc"
        public.label_names = bool(meta.get("label_names")) or bool(meta.get("like_dataset_id"))
        public.like_dataset_id = meta.get("like_dataset_id")
        public.unknown_labels = meta.get("unknown_labels")
    return public


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    summary="Upload a dataset (streamed)",
    openapi_extra=_UPLOAD_BODY,
    responses=problem_responses(401, 404, 413, 415, 422, 507),
)
async def upload_dataset(
    request: Request,
    response: Response,
    datasets: DatasetsDep,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            pattern=r"^[^\x00-\x1f\x7f]+$",
            description="A label for people (no control characters); not unique, never part of a path.",
            openapi_examples={"tiny": {"value": "tiny-train"}},
        ),
    ] = None,
    format: Annotated[
        Literal["xmc", "jsonl"],
        Query(description="`xmc` (feature ids) or `jsonl` (text and label names)."),
    ] = "xmc",
    like: Annotated[
        str | None,
        Query(
            max_length=64,
            description="format=jsonl: featurize with this text dataset's featurizer and label vocabulary (a test "
            "or validation set for models trained on it). Label names it does not know are counted in "
            "`unknown_labels` and dropped.",
        ),
    ] = None,
) -> DatasetPublic:
    """Parsed while it streams (XMC into CSR arrays, never held whole in memory; JSONL lines into texts and names),
    saved atomically. `format=jsonl` fits a TF-IDF featurizer (scikit-learn) and a label vocabulary (names in order
    of first appearance = label ids) and stores them with the dataset; with `like=<id>` it uses that dataset's
    instead. A failed upload leaves nothing behind: 404 for an unknown `like`, 413 over the size limit, 422 naming
    the line at fault for malformed content, 507 when the data dir is full or cannot be written (`reason` names the
    fault: ENOSPC, EFBIG, EROFS, EACCES...)."""
    length = request.headers.get("content-length")
    row = await datasets.upload(
        request.stream(),
        name=name,
        content_type=request.headers.get("content-type"),
        content_encoding=request.headers.get("content-encoding"),
        content_length=int(length) if length and length.isdigit() else None,
        fmt=format,
        like=like,
    )
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return _public(row, datasets)


@router.get(
    "", response_model=DatasetList, summary="List datasets, newest first", responses=problem_responses(401, 422)
)
def list_datasets(datasets: DatasetsDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> DatasetList:
    rows, next_cursor = datasets.page(limit, cursor)
    return DatasetList(data=[_public(r, datasets) for r in rows], count=len(rows), next_cursor=next_cursor)


@router.get(
    "/{dataset_id}", response_model=DatasetPublic, summary="Get a dataset", responses=problem_responses(401, 404)
)
def get_dataset(dataset_id: str, datasets: DatasetsDep) -> DatasetPublic:
    return _public(datasets.get(dataset_id), datasets)


@router.put(
    "/{dataset_id}/label-names",
    response_model=DatasetPublic,
    summary="Name the labels of a dataset",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "UTF-8 text, one name per line: line i names label i-1 (as many lines as labels).",
            "content": {"text/plain": {"schema": {"type": "string"}, "example": "shoes\nhats\nsocks\n"}},
        }
    },
    responses=problem_responses(400, 401, 404, 413, 422, 507),
)
async def put_label_names(
    dataset_id: str, request: Request, datasets: DatasetsDep, settings: SettingsDep
) -> DatasetPublic:
    """Predictions of models trained on this dataset answer with these names (jobs started later also store them
    in their snapshots). Names must be non-empty and distinct; 422 names the line at fault."""
    limit = int(settings.max_upload_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(limit, "label names file")
    row = await anyio.to_thread.run_sync(datasets.set_label_names, dataset_id, bytes(body))
    return _public(row, datasets)


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset", responses=problem_responses(401, 404, 409))
def delete_dataset(dataset_id: str, datasets: DatasetsDep) -> Response:
    """409 while a job that may still read it (queued, running, stopped, failed, interrupted) refers to it."""
    datasets.delete(dataset_id)
    return Response(status_code=204)
