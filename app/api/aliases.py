"""/v1/aliases: stable names for a model version or a model's newest version; predict through them."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Path, Response

from app.api.datasets import Cursor, Limit
from app.api.deps import AliasesDep, RegistryDep, ServicesDep
from app.api.models import TextPredictBody, predict_response, run_predict
from app.db import AliasRow
from app.errors import problem_responses
from app.schemas import ALIAS_PATTERN, AliasList, AliasPublic, AliasPut, PredictRequest, PredictResponse
from app.services.aliases import Resolved
from app.services.container import Services
from app.services.errors import NotFound, NotReady
from app.services.pagination import DEFAULT_LIMIT
from app.services.registry import ModelRegistry, PredictResult, VersionGone

router = APIRouter(prefix="/v1/aliases", tags=["aliases"])

AliasName = Annotated[
    str, Path(pattern=ALIAS_PATTERN, description="1-64 letters, digits, '.', '_' or '-'.", examples=["production"])
]


def _public(row: AliasRow, registry: ModelRegistry) -> AliasPublic:
    resolved = row.version
    if resolved is None:
        try:
            resolved = registry.current(row.model_id).version
        except (NotReady, NotFound):
            resolved = None
    return AliasPublic(
        alias=row.name,
        model_id=row.model_id,
        version=row.version,
        model_version=resolved,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@router.put(
    "/{alias}",
    response_model=AliasPublic,
    summary="Point an alias at a model version (or its newest)",
    responses=problem_responses(400, 401, 404, 422),
)
def put_alias(alias: AliasName, body: AliasPut, aliases: AliasesDep, registry: RegistryDep) -> AliasPublic:
    """Creates or moves the alias in one step: a request through it is served wholly by the old target or wholly
    by the new one. A pinned `version` is kept on disk (beyond SLIDE_SNAPSHOT_KEEP) until the alias moves or is
    deleted; 404 when the model or that version is gone. Answers with the resolved `model_version`."""
    row, _ = aliases.put(alias, body.model_id, body.version)
    return _public(row, registry)


@router.get("", response_model=AliasList, summary="List aliases, by name", responses=problem_responses(401, 422))
def list_aliases(
    aliases: AliasesDep, registry: RegistryDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
) -> AliasList:
    rows, next_cursor = aliases.page(limit, cursor)
    return AliasList(data=[_public(r, registry) for r in rows], count=len(rows), next_cursor=next_cursor)


@router.get("/{alias}", response_model=AliasPublic, summary="Get an alias", responses=problem_responses(401, 404))
def get_alias(alias: AliasName, aliases: AliasesDep, registry: RegistryDep) -> AliasPublic:
    return _public(aliases.get(alias), registry)


@router.delete("/{alias}", status_code=204, summary="Delete an alias", responses=problem_responses(401, 404))
def delete_alias(alias: AliasName, aliases: AliasesDep) -> Response:
    """Releases the version it pinned (pruned at the job's next snapshot if beyond SLIDE_SNAPSHOT_KEEP)."""
    aliases.delete(alias)
    return Response(status_code=204)


def _predict_through(services: Services, alias: str, body: PredictRequest) -> tuple[Resolved, PredictResult]:
    aliases = services.aliases
    target = aliases.resolve(alias)
    try:
        result = run_predict(services, target.model_id, body, target.version)
    except VersionGone:
        # The alias moved and its old version was pruned between resolving and loading: resolve again once.
        again = aliases.resolve(alias)
        if (again.model_id, again.version) == (target.model_id, target.version):
            raise
        target = again
        result = run_predict(services, target.model_id, body, target.version)
    return target, result


@router.post(
    "/{alias}/predict",
    response_model=PredictResponse,
    summary="Top-k labels from the version an alias points at",
    responses=problem_responses(400, 401, 404, 409, 422, 503),
)
async def predict_alias(alias: AliasName, services: ServicesDep, body: TextPredictBody) -> Response:
    """The same body and answer as `POST /v1/models/{id}/predict`, with `model_id`, `model_version` and `alias`
    saying what answered. The alias is resolved once per request: a request in flight while the alias moves
    finishes on the version it started with."""
    # Resolving reads the database: in the predict pool, whatever the request's size.
    target, result = await anyio.to_thread.run_sync(
        _predict_through, services, alias, body, limiter=services.registry.limiter
    )
    return predict_response(target.model_id, result, body, alias=alias)
