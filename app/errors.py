"""Every error as RFC 9457 `application/problem+json`, mapped from exceptions in one table.

Body: `{type, title, status, detail, instance}` plus, where they apply, `errors` (one `{loc, msg, type}` per
invalid value; an unknown field's says which known one it resembles), `field` (dotted path of the first value at
fault), `line`/`column` (dataset uploads, malformed JSON) and
`limit_bytes` (uploads over the limit), `reason` (507: the errno name of a storage fault, e.g. ENOSPC).
"""

from __future__ import annotations

import difflib
import logging
import typing
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.services.errors import (
    Conflict,
    InsufficientStorage,
    InvalidContent,
    MemoryLimitExceeded,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    storage_cause,
)

log = logging.getLogger("app.errors")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:slide:problem:"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass(frozen=True)
class ProblemKind:
    status: int
    slug: str
    title: str


# The one table: domain exception -> HTTP. Looked up along the exception's MRO, so subclasses inherit a row.
ERROR_TABLE: dict[type[Exception], ProblemKind] = {
    NotFound: ProblemKind(404, "not-found", "Resource not found"),
    Conflict: ProblemKind(409, "conflict", "Conflicts with the resource's current state"),
    PayloadTooLarge: ProblemKind(413, "payload-too-large", "Content too large"),
    UnsupportedMediaType: ProblemKind(415, "unsupported-media-type", "Unsupported media type"),
    MemoryLimitExceeded: ProblemKind(422, "memory-limit", "Needs more memory than the service allows"),
    InvalidContent: ProblemKind(422, "invalid-content", "Invalid content"),
    NotReady: ProblemKind(503, "not-ready", "Not ready yet"),
    InsufficientStorage: ProblemKind(507, "insufficient-storage", "Insufficient storage"),
    ServiceError: ProblemKind(400, "bad-request", "Bad request"),
}


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


def problem(
    request: Request | None,
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> ProblemResponse:
    phrase = _phrase(status)
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug if slug else "about:blank",
        "title": title or phrase,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
    body.update({k: v for k, v in extra.items() if v is not None})
    return ProblemResponse(body, status_code=status, headers=headers)


def kind_for(exc: Exception) -> ProblemKind | None:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return None


async def service_error_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ServiceError)
    kind = kind_for(exc) or ERROR_TABLE[ServiceError]
    extra: dict[str, Any] = dict(exc.extra)
    headers: dict[str, str] = {}
    if isinstance(exc, InvalidContent) and exc.loc is not None:
        extra["field"] = _dotted(exc.loc)
        extra["errors"] = [{"loc": list(exc.loc), "msg": exc.detail, "type": "value_error"}]
    if isinstance(exc, NotReady) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    return problem(request, kind.status, exc.detail, slug=kind.slug, title=kind.title, headers=headers or None, **extra)


async def validation_error_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = [
        {"loc": [p for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    raw = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        i, first = next((i, e) for i, e in enumerate(errors) if e["type"] == "json_invalid")
        reason = str((raw[i].get("ctx") or {}).get("error") or first["msg"])
        line, column = _line_column(exc.body, first["loc"][-1] if first["loc"] else None)
        where = f" at line {line}, column {column}" if line is not None else ""
        return problem(
            request,
            400,
            f"the request body is not valid JSON: {reason}{where}",
            slug="malformed-json",
            title="Malformed request body",
            line=line,
            column=column,
            errors=errors,
        )
    for e in errors:
        if e["type"] == "extra_forbidden":
            hint = _did_you_mean(request, e["loc"])
            if hint:
                e["msg"] += f"; did you mean {hint!r}?"
    shown = "; ".join(f"{_dotted(e['loc'])}: {e['msg']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return problem(
        request,
        422,
        shown + more,
        slug="validation-error",
        title="Request validation failed",
        field=_dotted(errors[0]["loc"]) if errors else None,
        errors=errors,
    )


async def http_exception_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        # Starlette names only the methods of the first route whose path matched; RFC 9110 wants every method
        # the resource supports (GET and DELETE on /v1/datasets/{id} are two routes).
        headers["Allow"] = ", ".join(_allowed_methods(request))
        detail = f"{request.method} is not supported here; use {headers['Allow']}"
    return problem(request, exc.status_code, detail, headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: each method asked of the route table in a fresh scope."""
    allowed = []
    for method in HTTP_METHODS:
        scope = {
            "type": "http",
            "method": method,
            "path": request.scope["path"],
            "root_path": request.scope.get("root_path", ""),
            "headers": [],
            "query_string": b"",
        }
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def unhandled_error_handler(request: Request, exc: Exception) -> ProblemResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    cause = storage_cause(exc)
    if cause is not None:  # a full or unwritable data dir is the operator's to fix, not a bug: say so
        kind = ERROR_TABLE[InsufficientStorage]
        return problem(
            request,
            kind.status,
            f"the service could not write to its data dir or database: {cause[0]} ({cause[1]})",
            slug=kind.slug,
            title=kind.title,
            reason=cause[0],
        )
    return problem(request, 500, "internal server error; the service log has the details", slug="internal-error")


def _line_column(document: Any, pos: Any) -> tuple[int | None, int | None]:
    """1-based line and column of character offset `pos` in the JSON text that failed to parse."""
    if isinstance(document, bytes):
        document = document.decode("utf-8", "replace")
    if not isinstance(document, str) or not isinstance(pos, int) or not 0 <= pos <= len(document):
        return None, None
    line = document.count("\n", 0, pos) + 1
    return line, pos - (document.rfind("\n", 0, pos) + 1) + 1


def _did_you_mean(request: Request, loc: list[Any]) -> str | None:
    """For an unknown field of a JSON body (`loc` = body, ..., name): the closest field the model at that place
    has (`epochz` -> `epochs`), by walking the route's body model along `loc`."""
    if len(loc) < 2 or loc[0] != "body" or not isinstance(loc[-1], str):
        return None
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    model: Any = getattr(field, "type_", None) or getattr(getattr(field, "field_info", None), "annotation", None)
    for part in loc[1:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        model = _model_in(fields[part].annotation)
    fields = getattr(model, "model_fields", None)
    if not fields:
        return None
    # a model may also know former names of its fields, by the path they have now (the job config's flat names)
    names = {**{name: name for name in fields}, **getattr(model, "FORMER_NAMES", {})}
    close = difflib.get_close_matches(loc[-1], list(names), n=1, cutoff=0.6)
    return names[close[0]] if close else None


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `Model`, `list[Model]` or `Model | None`."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem+json bodies for the given status codes."""
    from app.schemas import Problem

    return {s: {"model": Problem, "description": _phrase(s)} for s in statuses}


def tidy_openapi(spec: dict[str, Any]) -> dict[str, Any]:
    """Error responses are documented as what they are: `application/problem+json` with the Problem schema (FastAPI
    would say application/json, and HTTPValidationError for 422)."""
    ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            responses = operation.get("responses", {})
            for status, response in responses.items():
                if str(status).startswith(("4", "5")):
                    response["content"] = {PROBLEM_JSON: {"schema": ref}}
            if "422" in responses:
                responses["422"]["description"] = "Validation error: `field` and `errors` name what is wrong"
    schemas = spec.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _dotted(loc: Any) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
