"""The OpenAPI document: error responses as problem+json with an example per operation and status, and request
examples filled with this service's own ids.

Swagger UI reads /openapi.json when the page loads. Path parameters (except those of DELETE operations), the
job-creation example and the predict examples carry the ids of the newest dataset, job and model and feature ids
that model has, so after an upload (and a page reload) "Try it out" works in order without copying ids around.
Without an API key the document declares no security scheme (Swagger then shows no lock icons).
"""

from __future__ import annotations

import copy
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI

from app.errors import PROBLEM_JSON, TYPE_PREFIX, tidy_openapi
from app.schemas import EXAMPLE_ID
from app.services.container import Services
from app.services.errors import NotFound
from app.settings import Settings

log = logging.getLogger("app.openapi")


def install_openapi(app: FastAPI, services: Services) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = with_problem_examples(with_limits(tidy_openapi(build()), services.settings))
            app.openapi_schema = with_security(spec, services.settings)
        return with_live_examples(app.openapi_schema, services)

    app.openapi = openapi  # type: ignore[method-assign]


def with_limits(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The predict limits are settings of this service, so its document states them (a client can then stay
    inside them; the schema and the 422 agree)."""
    predict = spec.get("components", {}).get("schemas", {}).get("PredictRequest", {}).get("properties", {})
    if "k" in predict:
        predict["k"]["maximum"] = settings.predict_max_k
    if "instances" in predict:
        predict["instances"]["maxItems"] = settings.predict_max_instances
    return spec


def with_security(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """No key configured, no scheme: every operation is open, and Swagger's lock icons would say otherwise."""
    if settings.api_key is not None:
        return spec
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    components = spec.get("components", {})
    components.pop("securitySchemes", None)
    return spec


# ------------------------------------------------------------------------------------------ problem examples


def _problem(status: int, slug: str | None, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"{TYPE_PREFIX}{slug}" if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return body


_ID = EXAMPLE_ID
_MALFORMED_JSON = _problem(
    400,
    "malformed-json",
    "Malformed request body",
    "the request body is not valid JSON: Expecting ',' delimiter at line 3, column 5",
    line=3,
    column=5,
)
_QUERY_422 = _problem(
    422,
    "validation-error",
    "Request validation failed",
    "query.since_step: Input should be greater than or equal to -1",
    field="query.since_step",
    errors=[
        {
            "loc": ["query", "since_step"],
            "msg": "Input should be greater than or equal to -1",
            "type": "greater_than_equal",
        }
    ],
)

# (method, path template, status) -> the problem that operation answers with that status. Statuses missing here
# take the per-status default below; tests provoke these errors and compare.
PROBLEM_EXAMPLES: dict[tuple[str, str, int], dict[str, Any]] = {
    ("post", "/v1/datasets", 413): _problem(
        413,
        "payload-too-large",
        "Content too large",
        "the dataset is larger than the limit of 2147483648 bytes (SLIDE_MAX_UPLOAD_BYTES); "
        "split it or raise the limit",
        limit_bytes=2147483648,
    ),
    ("post", "/v1/datasets", 415): _problem(
        415,
        "unsupported-media-type",
        "Unsupported media type",
        "Content-Type 'application/json' is not accepted; send the dataset file as text/plain, application/gzip "
        "(or with Content-Encoding: gzip), or as the `file` field of multipart/form-data",
    ),
    ("post", "/v1/datasets", 422): _problem(
        422,
        "invalid-content",
        "Invalid content",
        "line 7, column 9: expected 'feature:value', got '12-0.5'",
        field="body",
        line=7,
        column=9,
        reason="expected 'feature:value', got '12-0.5'",
        errors=[
            {"loc": ["body"], "msg": "line 7, column 9: expected 'feature:value', got '12-0.5'", "type": "value_error"}
        ],
    ),
    ("post", "/v1/datasets", 507): _problem(
        507,
        "insufficient-storage",
        "Insufficient storage",
        "the dataset could not be stored: ENOSPC (no space left on the device) in the service's data dir "
        "(SLIDE_DATA_DIR) or database; nothing was kept. Free space or make the data dir writable, then upload again",
        reason="ENOSPC",
    ),
    ("delete", "/v1/datasets/{dataset_id}", 409): _problem(
        409,
        "conflict",
        "Conflicts with the resource's current state",
        f"dataset {_ID} is used by job(s) 9b1f0c2d4e6a48b7a1c3d5e7f9081a2b; delete those jobs (or let them "
        "complete) first",
        jobs=["9b1f0c2d4e6a48b7a1c3d5e7f9081a2b"],
    ),
    ("post", "/v1/jobs", 400): _MALFORMED_JSON,
    ("post", "/v1/jobs", 409): _problem(
        409,
        "conflict",
        "Conflicts with the resource's current state",
        "Idempotency-Key 'demo-1' was already used for a different request (job 9b1f0c2d4e6a48b7a1c3d5e7f9081a2b); "
        "use a new key for a new job",
        job_id="9b1f0c2d4e6a48b7a1c3d5e7f9081a2b",
    ),
    ("post", "/v1/jobs", 422): _problem(
        422,
        "validation-error",
        "Request validation failed",
        "body.config.schedule.epochz: Extra inputs are not permitted; did you mean 'epochs'?",
        field="body.config.schedule.epochz",
        errors=[
            {
                "loc": ["body", "config", "schedule", "epochz"],
                "msg": "Extra inputs are not permitted; did you mean 'epochs'?",
                "type": "extra_forbidden",
            }
        ],
    ),
    ("post", "/v1/jobs/{job_id}/stop", 409): _problem(
        409,
        "conflict",
        "Conflicts with the resource's current state",
        f"job {_ID} is completed; only queued, running or interrupted jobs can be stopped",
        state="completed",
    ),
    ("post", "/v1/jobs/{job_id}/resume", 409): _problem(
        409,
        "conflict",
        "Conflicts with the resource's current state",
        f"job {_ID} is running: it is already queued or training",
        state="running",
    ),
    ("get", "/v1/jobs/{job_id}/metrics", 422): _QUERY_422,
    ("get", "/v1/jobs/{job_id}/events", 422): _QUERY_422,
    ("post", "/v1/models/{model_id}/predict", 400): _MALFORMED_JSON,
    ("post", "/v1/models/{model_id}/predict", 422): _problem(
        422,
        "invalid-content",
        "Invalid content",
        f"instances[0].indices[2]: feature id 17 is out of range; model {_ID} has 6 features (ids 0..5)",
        field="body.instances[0].indices[2]",
        errors=[
            {
                "loc": ["body", "instances", 0, "indices", 2],
                "msg": f"instances[0].indices[2]: feature id 17 is out of range; model {_ID} has 6 features (ids 0..5)",
                "type": "value_error",
            }
        ],
    ),
    ("post", "/v1/models/{model_id}/predict", 409): _problem(
        409,
        "conflict",
        "Conflicts with the resource's current state",
        f"model {_ID} has no snapshot and its job is stopped, so none is coming: resume the job "
        f"(POST /v1/jobs/{_ID}/resume) or start a new one (POST /v1/jobs)",
        state="stopped",
    ),
    ("post", "/v1/models/{model_id}/predict", 503): _problem(
        503,
        "not-ready",
        "Not ready yet",
        f"model {_ID} has no snapshot yet: its job is queued, 2nd in the queue (waiting behind job "
        "9b1f0c2d4e6a48b7a1c3d5e7f9081a2b, earlier in the queue); once it runs, it publishes its first snapshot "
        "within 30s (SLIDE_SNAPSHOT_INTERVAL_S); retry then",
        job_state="queued",
        queue_position=2,
        queue_reason="waiting behind job 9b1f0c2d4e6a48b7a1c3d5e7f9081a2b, earlier in the queue",
    ),
    ("post", "/v1/models/{model_id}/evaluate", 503): _problem(
        503,
        "not-ready",
        "Not ready yet",
        f"model {_ID} has no snapshot yet: its job publishes the first one within 30s of training "
        "(SLIDE_SNAPSHOT_INTERVAL_S); retry then",
    ),
    ("get", "/readyz", 503): _problem(
        503,
        "not-ready",
        "Not ready",
        "not ready: data_dir (error: [Errno 2] No such file or directory: '/data/.readyz-k2j1')",
        checks={
            "database": "ok",
            "data_dir": "error: [Errno 2] No such file or directory: '/data/.readyz-k2j1'",
            "supervisor": "ok",
        },
    ),
}

_RESOURCE_OF = {
    "dataset_id": "dataset",
    "job_id": "job",
    "model_id": "model",
    "alias": "alias",
    "evaluation_id": "evaluation",
}
# Predicting through an alias or an exact version answers as predict does.
for _status in (400, 422, 503):
    for _path in ("/v1/aliases/{alias}/predict", "/v1/models/{model_id}/versions/{version}/predict"):
        if _status != 503 or "alias" in _path:
            PROBLEM_EXAMPLES[("post", _path, _status)] = PROBLEM_EXAMPLES[
                ("post", "/v1/models/{model_id}/predict", _status)
            ]


def problem_example(method: str, path: str, status: int) -> dict[str, Any]:
    instance = re.sub(r"\{[^}]+\}", _ID, path)
    known = PROBLEM_EXAMPLES.get((method, path, status))
    if known is not None:
        return {**known, "instance": instance}
    if status == 401:
        return _problem(401, None, "Unauthorized", "this endpoint needs an X-API-Key header", instance=instance)
    if status == 404:
        params = re.findall(r"\{([^}]+)\}", path)
        kind = _RESOURCE_OF.get(params[0] if params else "", "resource")
        return _problem(
            404,
            "not-found",
            "Resource not found",
            f"no {kind} with id '{_ID}'",
            instance=instance,
            resource=kind,
            id=_ID,
        )
    if status == 422:
        return {**_QUERY_422, "instance": instance}
    return _problem(status, None, HTTPStatus(status).phrase, HTTPStatus(status).description, instance=instance)


def _can_fail_validation(operation: dict[str, Any]) -> bool:
    """False for an operation whose only inputs are unconstrained string path parameters (any id parses)."""
    if "requestBody" in operation:
        return True
    for param in operation.get("parameters", []):
        schema = param.get("schema", {})
        if (
            param.get("in") != "path"
            or set(schema) - {"type", "title", "description"}
            or schema.get("type") != "string"
        ):
            return True
    return False


def with_problem_examples(spec: dict[str, Any]) -> dict[str, Any]:
    """Each error response shows what that operation answers (Swagger would otherwise make one up from the
    Problem schema: the same upload error under every operation)."""
    for path, path_item in spec.get("paths", {}).items():
        for method, operation in path_item.items():
            if not isinstance(operation, dict):
                continue
            if not _can_fail_validation(operation):  # FastAPI documents a 422 that cannot happen here
                operation.get("responses", {}).pop("422", None)
            for status, response in operation.get("responses", {}).items():
                media = response.get("content", {}).get(PROBLEM_JSON)
                if media is not None:
                    media["example"] = problem_example(method, path, int(status))
    return spec


# ------------------------------------------------------------------------------------------ live examples


def _newest_ids(services: Services) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    datasets = services.datasets.list()  # newest first
    if datasets:
        train = next((d for d in datasets if "test" not in d.name.lower()), datasets[0])
        ids["dataset_id"] = ids["train_dataset_id"] = train.id
        # A held-out set for that training set: same feature and label space (a 2,000-feature test set is no
        # eval set for the 6-feature upload example).
        test = next(
            (
                d
                for d in datasets
                if "test" in d.name.lower()
                and d.id != train.id
                and d.num_features == train.num_features
                and d.num_labels == train.num_labels
            ),
            None,
        )
        if test is not None:
            ids["eval_dataset_id"] = test.id
    jobs = services.jobs.list()
    if jobs:
        ids["job_id"] = jobs[0].id
        with_model = services.jobs.latest_versions([j.id for j in jobs])
        model = next((j for j in jobs if j.id in with_model), jobs[0])
        ids["model_id"] = model.id
        try:
            ids["num_features"] = services.datasets.get(model.train_dataset_id).num_features
        except NotFound:
            pass
    return ids


def _feature_ids(num_features: int, n: int) -> list[int]:
    """`n` distinct feature ids spread over 0..num_features-1 (fewer when the model has fewer)."""
    if num_features <= 0 or n <= 0:
        return []
    return sorted({(i * (num_features - 1)) // max(1, n - 1) for i in range(n)})


def with_live_examples(spec: dict[str, Any], services: Services) -> dict[str, Any]:
    if services.settings.api_key is not None:  # the document is public (Swagger loads it unauthenticated); ids are not
        return spec
    try:
        ids = _newest_ids(services)
    except Exception:  # noqa: BLE001 - docs must render even if the database is not open yet
        log.debug("no live examples", exc_info=True)
        return spec
    if not ids:
        return spec
    spec = copy.deepcopy(spec)
    for path_item in spec.get("paths", {}).values():
        for method, operation in path_item.items():
            if not isinstance(operation, dict) or method == "delete":  # never prefill what deletes
                continue
            for param in operation.get("parameters", []):
                if param.get("in") == "path" and param.get("name") in ids:
                    param["example"] = ids[param["name"]]
    paths = spec.get("paths", {})
    examples = _json_examples(paths, "/v1/jobs", "post")
    for example in examples.values():
        value = example.get("value", {})
        for key in ("train_dataset_id", "eval_dataset_id"):
            if key in value and key in ids:
                value[key] = ids[key]
        if "eval_dataset_id" in value and "eval_dataset_id" not in ids:
            value.pop("eval_dataset_id")
    if "num_features" in ids:  # feature ids the example model has
        for example in _json_examples(paths, "/v1/models/{model_id}/predict", "post").values():
            for instance in example.get("value", {}).get("instances", []):
                if "indices" not in instance:  # a text query
                    continue
                indices = _feature_ids(int(ids["num_features"]), len(instance["indices"]))
                instance["indices"] = indices
                instance["values"] = instance["values"][: len(indices)] + [1.0] * (
                    len(indices) - len(instance["values"])
                )
    return spec


def _json_examples(paths: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    try:
        examples: dict[str, Any] = paths[path][method]["requestBody"]["content"]["application/json"]["examples"]
        return examples
    except KeyError:
        return {}
