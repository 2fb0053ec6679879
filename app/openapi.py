"""The OpenAPI document: error responses as problem+json, and examples filled with this service's own ids.

Swagger UI reads /openapi.json when the page loads. Path parameters and the job-creation example carry the ids
of the newest dataset, job and model, so after an upload (and a page reload) "Try it out" works in order
without copying ids around.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from fastapi import FastAPI

from app.errors import tidy_openapi
from app.services.container import Services
from app.settings import Settings

log = logging.getLogger("app.openapi")


def install_openapi(app: FastAPI, services: Services) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_limits(tidy_openapi(build()), services.settings)
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


def _newest_ids(services: Services) -> dict[str, str]:
    ids: dict[str, str] = {}
    datasets = services.datasets.list()  # newest first
    if datasets:
        train = next((d for d in datasets if "test" not in d.name.lower()), datasets[0])
        ids["dataset_id"] = ids["train_dataset_id"] = train.id
        test = next((d for d in datasets if "test" in d.name.lower() and d.id != train.id), None)
        if test is not None:
            ids["eval_dataset_id"] = test.id
    jobs = services.jobs.list()
    if jobs:
        ids["job_id"] = jobs[0].id
        with_model = services.jobs.latest_versions([j.id for j in jobs])
        ready = next((j.id for j in jobs if j.id in with_model), None)
        ids["model_id"] = ready or jobs[0].id
    return ids


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
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for param in operation.get("parameters", []):
                if param.get("in") == "path" and param.get("name") in ids:
                    param["example"] = ids[param["name"]]
    try:
        examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    except KeyError:
        return spec
    for example in examples.values():
        value = example.get("value", {})
        for key in ("train_dataset_id", "eval_dataset_id"):
            if key in value and key in ids:
                value[key] = ids[key]
        if "eval_dataset_id" in value and "eval_dataset_id" not in ids:
            value.pop("eval_dataset_id")
    return spec
