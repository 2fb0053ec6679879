"""Health, readiness, API key, OpenAPI, Prometheus, settings validation."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from tests.app.helpers import all_routes, assert_problem, upload
from tests.conftest import make_settings


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert set(ready.json()["checks"]) == {"database", "data_dir", "supervisor"}
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"


def test_readiness_fails_as_problem_when_the_data_dir_is_gone(tmp_path, client_for):
    settings = make_settings(tmp_path / "data")
    client = client_for(settings)
    moved = tmp_path / "moved"
    settings.data_dir.rename(moved)
    try:
        p = assert_problem(client.get("/readyz"), 503)
        assert p["checks"]["data_dir"].startswith("error"), p
        assert "data_dir" in p["detail"]
        assert client.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        moved.rename(settings.data_dir)
    assert client.get("/readyz").status_code == 200


# Open without the key, deliberately: liveness and readiness (probes carry no key), and the API description
# (Swagger UI fetches /openapi.json before anyone can press Authorize; with a key set it carries no live ids), and
# the console's pages (static HTML: the data they show comes from the API, with the key the user enters).
OPEN_ROUTES = {
    "/healthz",
    "/readyz",
    "/",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
    "/ui",
    "/ui/jobs/{job_id}",
}


def test_api_key_guards_every_route_but_health_and_docs(tmp_path, client_for, xmc_files):
    """Every route of the route table (new ones are included by themselves): 401 problem+json without the key or
    with a wrong one, and something else with the right one."""
    client = client_for(make_settings(tmp_path / "data", api_key="s3cret"))
    ok = {"X-API-Key": "s3cret"}
    dataset_id = upload(client, xmc_files["test"], headers=ok).json()["id"]
    routes = all_routes(client.app)
    assert ("POST", "/v1/models/{model_id}/predict") in routes and len(routes) >= 20, routes  # included routers seen
    open_routes = set()
    for method, path in routes:
        url = re.sub(r"\{[^}]+\}", dataset_id, path)
        if client.request(method, url, follow_redirects=False).status_code != 401:
            open_routes.add(path)
            continue
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-API-Key": "s3cret "}):
            r = client.request(method, url, headers=headers)
            p = assert_problem(r, 401)
            assert "X-API-Key" in p["detail"] and r.headers["www-authenticate"] == "APIKey", (method, path)
        r = client.request(method, url, headers=ok, follow_redirects=False)
        assert r.status_code != 401, (method, path, r.text)
    assert open_routes == OPEN_ROUTES
    # The open description names no dataset, job or model (its examples are generic when a key is set).
    assert dataset_id not in client.get("/openapi.json").text
    # Swagger's Authorize button: the scheme is declared and applied to the protected operations
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": spec["components"]["securitySchemes"]["APIKeyHeader"]["description"],
    }
    assert spec["paths"]["/v1/datasets"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_openapi_documents_problems_and_examples(client):
    spec = client.get("/openapi.json").json()
    upload_op = spec["paths"]["/v1/datasets"]["post"]
    assert {"multipart/form-data", "text/plain", "application/gzip"} <= set(upload_op["requestBody"]["content"])
    problem_413 = upload_op["responses"]["413"]["content"]["application/problem+json"]
    assert problem_413["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert problem_413["example"]["status"] == 413 and "SLIDE_MAX_UPLOAD_BYTES" in problem_413["example"]["detail"]
    predict = spec["paths"]["/v1/models/{model_id}/predict"]["post"]
    assert "examples" in predict["requestBody"]["content"]["application/json"]
    assert "503" in predict["responses"]
    schemas = spec["components"]["schemas"]
    from engine import SlideConfig
    from engine.config import GROUPS

    # one object per settings group, each with the engine's defaults and the docstrings of its fields
    config = schemas["SlideConfig"]["properties"]
    assert list(config) == [*GROUPS, "threads", "seed"]
    assert config["sampling"]["$ref"] == "#/components/schemas/SamplingConfig"
    sampling = schemas["SamplingConfig"]["properties"]
    assert sampling["bucket_size"]["default"] == SlideConfig().sampling.bucket_size  # defaults come from the engine
    assert sampling["hash_l"].get("default") is SlideConfig().sampling.hash_l is None  # auto: null, or no default
    assert {"type": "null"} in sampling["hash_l"]["anyOf"]
    assert sampling["hash_family"]["enum"] == ["simhash", "wta", "dwta"]
    assert sampling["bucket_size"]["description"].startswith("Capacity of a bucket")
    assert "Range: [1, 1048576]" in sampling["bucket_size"]["description"]
    assert schemas["PredictConfig"]["description"].startswith("How a trained model serves predictions")
    patience = schemas["ScheduleConfig"]["properties"]["early_stop_patience"]
    assert {"type": "string", "const": "never"} in patience["anyOf"] and '0 (= "never")' in patience["description"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_openapi_examples_use_the_newest_ids(client, xmc_files):
    train = upload(client, xmc_files["train"], name="tiny-train").json()["id"]
    test = upload(client, xmc_files["test"], name="tiny-test").json()["id"]
    spec = client.get("/openapi.json").json()
    examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert examples["small"]["value"]["train_dataset_id"] == train
    assert examples["with_eval"]["value"]["eval_dataset_id"] == test
    (param,) = spec["paths"]["/v1/datasets/{dataset_id}"]["get"]["parameters"]
    assert param["example"] == train
    # "Try it out" with the example as shown works
    r = client.post("/v1/jobs", json=dict(examples["small"]["value"], config={"schedule": {"epochs": 0}}))
    assert r.status_code == 201, r.text
    spec = client.get("/openapi.json").json()
    (param,) = spec["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"]
    assert param["example"] == r.json()["id"]


def test_prometheus_metrics(client):
    client.get("/v1/datasets")
    client.get("/v1/datasets/abc")
    text = client.get("/metrics").text
    assert 'slide_http_requests_total{method="GET",route="/v1/datasets",status="200"} 1.0' in text
    assert 'slide_http_requests_total{method="GET",route="/v1/datasets/{dataset_id}",status="404"} 1.0' in text
    assert "slide_http_request_duration_seconds_bucket" in text
    assert 'slide_jobs{state="running"} 0.0' in text


def test_settings_are_validated(tmp_path, clean_env, monkeypatch):
    from app.settings import Settings

    for bad in (
        {"snapshot_interval_s": 0},
        {"max_upload_bytes": 0},
        {"max_concurrent_jobs": 0},
        {"trainer_threads": -1},
        {"max_upload_bytes": "lots"},
    ):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, data_dir=tmp_path, **bad)
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ValidationError):
        Settings(_env_file=None, data_dir=file)
    monkeypatch.setenv("SLIDE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("SLIDE_MAX_UPLOAD_BYTES", "1MiB")
    monkeypatch.setenv("SLIDE_API_KEY", "")
    s = Settings(_env_file=None)
    assert s.data_dir == (tmp_path / "d").resolve()
    assert s.max_upload_bytes == 1024 * 1024
    assert s.api_key is None
    assert s.database_url == f"sqlite:///{(tmp_path / 'd' / 'slide.db').resolve()}"
