"""/v1/datasets: streamed uploads in the Extreme Classification Repository format, list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import DatasetsDep
from app.db import DatasetRow
from app.errors import problem_responses
from app.schemas import DatasetList, DatasetPublic

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The dataset file, Extreme Classification Repository format: a header line `N_points N_features "
            "N_labels`, then one point per line, `l1,l2 f:v f:v ...` (0-based ids; a line starting with a space "
            "has no labels). Send it as the `file` field of multipart/form-data (Swagger's file picker), or as the "
            "raw body: `text/plain`, or gzipped with `Content-Type: application/gzip` or `Content-Encoding: gzip`."
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


def _public(row: DatasetRow) -> DatasetPublic:
    return DatasetPublic.model_validate(row, from_attributes=True)


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    summary="Upload a dataset (streamed)",
    openapi_extra=_UPLOAD_BODY,
    responses=problem_responses(401, 413, 415, 422, 507),
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
) -> DatasetPublic:
    """Parsed while it streams into CSR arrays (never held whole in memory), saved atomically. A failed upload
    leaves nothing behind: 413 over the size limit, 422 naming the line at fault for malformed content, 507 when the
    data dir is full or cannot be written (`reason` names the fault: ENOSPC, EFBIG, EROFS, EACCES...)."""
    length = request.headers.get("content-length")
    row = await datasets.upload(
        request.stream(),
        name=name,
        content_type=request.headers.get("content-type"),
        content_encoding=request.headers.get("content-encoding"),
        content_length=int(length) if length and length.isdigit() else None,
    )
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return _public(row)


@router.get("", response_model=DatasetList, summary="List datasets", responses=problem_responses(401))
def list_datasets(datasets: DatasetsDep) -> DatasetList:
    rows = datasets.list()
    return DatasetList(data=[_public(r) for r in rows], count=len(rows))


@router.get(
    "/{dataset_id}", response_model=DatasetPublic, summary="Get a dataset", responses=problem_responses(401, 404)
)
def get_dataset(dataset_id: str, datasets: DatasetsDep) -> DatasetPublic:
    return _public(datasets.get(dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset", responses=problem_responses(401, 404, 409))
def delete_dataset(dataset_id: str, datasets: DatasetsDep) -> Response:
    """409 while a job that may still read it (queued, running, stopped, failed, interrupted) refers to it."""
    datasets.delete(dataset_id)
    return Response(status_code=204)
