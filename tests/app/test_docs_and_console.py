"""The API description and the console as served: offline assets, security only with a key, an error example per
operation that is what the operation answers, "Try it out" in order, helpful errors, route labels for every path.

What a browser makes of these pages is in tests/e2e/test_browser.py.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.helpers import all_routes, assert_problem, wait_for
from tests.conftest import make_settings

ASSET = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["']([^"']+)["']""")  # what a page loads


def _local_assets(client: Any, page: str) -> list[str]:
    html = client.get(page).text
    assets = ASSET.findall(html)
    assert assets, html
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        r = client.get(url)
        assert r.status_code == 200 and r.content, (url, r.status_code)
    return assets


def test_docs_and_redoc_load_everything_from_the_service(client):
    for page in ("/docs", "/redoc"):
        assert "http://" not in client.get(page).text and "https://" not in client.get(page).text
    swagger = _local_assets(client, "/docs")
    bundle = client.get(next(u for u in swagger if u.endswith("swagger-ui-bundle.js"))).text
    # FastAPI emits OpenAPI 3.1, which Swagger UI renders from version 5 on (4.x says "Unable to render").
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    versions = {tuple(map(int, v.split("."))) for v in re.findall(r'"(5\.\d+\.\d+)"', bundle)}
    assert versions and max(versions) >= (5, 0, 0), "the Swagger UI bundle is not version 5"
    assert any(u.endswith("redoc.standalone.js") for u in _local_assets(client, "/redoc"))


def test_console_pages_and_chart_library_are_served(client):
    assets = _local_assets(client, "/ui")
    assert any(u.endswith("plotly.min.js") for u in assets), assets
    plotly = next(u for u in assets if u.endswith("plotly.min.js"))
    assert "plotly" in client.get(plotly).text[:2000].lower()
    zipped = client.get(plotly, headers={"Accept-Encoding": "gzip"})  # megabytes: sent compressed, cacheable
    assert zipped.headers["content-encoding"] == "gzip" and "max-age" in zipped.headers["cache-control"]
    job_page = _local_assets(client, "/ui/jobs/" + "0" * 32)
    assert any(u.endswith("plotly.min.js") for u in job_page)
    for page in ("/ui", "/ui/jobs/" + "0" * 32):
        html = client.get(page).text
        assert "http://" not in html and "https://" not in html


def test_console_files_ship_in_the_package():
    """pyproject ships app/ui/static/* (no subdirectories) as package data: the Docker image installs the
    project as a wheel, and a file the glob missed would be absent there."""
    import tomllib

    from app.ui import UI_DIR

    globs = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["app.ui"]
    assert globs == ["static/*"]
    assert not [p for p in UI_DIR.rglob("*") if p.parent != UI_DIR and "__pycache__" not in p.parts]


def test_no_security_scheme_without_a_key(client, tmp_path, client_for):
    spec = client.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert not [(p, m) for p, item in spec["paths"].items() for m, op in item.items() if "security" in op]
    keyed = client_for(make_settings(tmp_path / "keyed", api_key="k")).get("/openapi.json").json()
    assert keyed["paths"]["/v1/jobs"]["post"]["security"] == [{"APIKeyHeader": []}]


def test_every_error_response_shows_an_example_of_its_own(client):
    spec = client.get("/openapi.json").json()
    assert "additionalProp1" not in json.dumps(spec)
    seen = set()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) < 400:
                    continue
                example = response["content"]["application/problem+json"]["example"]
                assert example["status"] == int(status), (method, path, status, example)
                assert example["instance"] == re.sub(r"\{[^}]+\}", example["instance"].rsplit("/")[-1], path) or (
                    re.fullmatch(re.sub(r"\{[^}]+\}", "[0-9a-f]{32}", path), example["instance"])
                ), (method, path, example["instance"])
                seen.add((method, path, int(status), example["type"]))
    predict_503 = {t for m, p, s, t in seen if p.endswith("/predict") and s == 503}
    assert predict_503 == {"urn:slide:problem:not-ready"}
    upload_422 = {t for m, p, s, t in seen if p == "/v1/datasets" and m == "post" and s == 422}
    assert upload_422 == {"urn:slide:problem:invalid-content"}


@pytest.fixture
def unsupervised(tmp_path, clean_env, warm_engine) -> Iterator[Any]:
    """A service whose jobs stay queued: another holder of the data dir's supervisor lock stands in for the
    supervising process, so nothing trains (as in tests/fuzz)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(tmp_path / "data", max_upload_bytes=4096)
    settings.data_dir.mkdir(parents=True)
    with open(settings.data_dir / "supervisor.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with TestClient(create_app(settings)) as client:
            yield client


def _documented(client: Any, method: str, path: str, status: int) -> dict[str, Any]:
    spec = client.get("/openapi.json").json()
    return spec["paths"][path][method]["responses"][str(status)]["content"]["application/problem+json"]["example"]


def _matches(client: Any, response: Any, method: str, path: str, status: int, *words: str) -> dict[str, Any]:
    body = assert_problem(response, status)
    example = _documented(client, method, path, status)
    assert (body["type"], body["title"]) == (example["type"], example["title"]), (body, example)
    extra = set(example) - {"type", "title", "status", "detail", "instance"}
    assert extra <= set(body), (extra - set(body), body)
    for w in words:
        assert w in body["detail"], body
    return body


def test_documented_problems_are_what_the_service_answers(unsupervised, xmc_files):
    c = unsupervised
    text = b"4 6 3\n0,2 0:1.0 3:0.5\n1 1:0.25 4:1.0\n 2:1.0\n0 0:0.5 5:2.0\n"
    send = {"headers": {"Content-Type": "text/plain"}}
    _matches(
        c,
        c.post("/v1/datasets", content=text, headers={"Content-Type": "application/json"}),
        "post",
        "/v1/datasets",
        415,
    )
    _matches(c, c.post("/v1/datasets", content=b"2 6 3\n0 1-0.5\n", **send), "post", "/v1/datasets", 422, "line 2")
    _matches(c, c.post("/v1/datasets", content=xmc_files["train"].read_bytes(), **send), "post", "/v1/datasets", 413)
    ds = c.post("/v1/datasets", content=text, **send).json()["id"]
    _matches(c, c.get("/v1/datasets/nope"), "get", "/v1/datasets/{dataset_id}", 404)

    body = {"train_dataset_id": ds, "config": {"schedule": {"epochs": 1}}}
    first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    second = c.post("/v1/jobs", json=body).json()
    assert (first["state"], first["queue_position"]) == ("queued", 1)
    assert c.get(f"/v1/jobs/{second['id']}").json()["queue_position"] == 2
    listed = {j["id"]: j["queue_position"] for j in c.get("/v1/jobs").json()["data"]}
    assert listed == {first["id"]: 1, second["id"]: 2}
    _matches(
        c,
        c.post("/v1/jobs", json={**body, "config": {"schedule": {"epochs": 2}}}, headers={"Idempotency-Key": "k1"}),
        "post",
        "/v1/jobs",
        409,
        "Idempotency-Key",
    )
    r = c.post(
        "/v1/jobs",
        content=b'{"train_dataset_id": "x",\n  "config": {"epochs": 1\n  "lr": 0.1}}',
        headers={"Content-Type": "application/json"},
    )
    p = _matches(c, r, "post", "/v1/jobs", 400, "line 3, column 3")
    assert (p["line"], p["column"]) == (3, 3)
    p = _matches(
        c,
        c.post("/v1/jobs", json={"train_dataset_id": ds, "config": {"schedule": {"epochz": 3}}}),
        "post",
        "/v1/jobs",
        422,
        "did you mean 'epochs'",
    )
    assert p["field"] == "body.config.schedule.epochz"
    # a misspelt setting outside its group is pointed to its path
    p = _matches(
        c,
        c.post("/v1/jobs", json={"train_dataset_id": ds, "config": {"epochz": 3}}),
        "post",
        "/v1/jobs",
        422,
        "did you mean 'schedule.epochs'",
    )
    assert p["field"] == "body.config.epochz"
    _matches(c, c.delete(f"/v1/datasets/{ds}"), "delete", "/v1/datasets/{dataset_id}", 409, first["id"])
    _matches(c, c.post(f"/v1/jobs/{first['id']}/resume"), "post", "/v1/jobs/{job_id}/resume", 409, "queued")
    _matches(
        c, c.get(f"/v1/jobs/{first['id']}/metrics", params={"since_step": -2}), "get", "/v1/jobs/{job_id}/metrics", 422
    )

    predict = "/v1/models/{model_id}/predict"
    one = {"instances": [{"indices": [0], "values": [1.0]}]}
    p = _matches(
        c, c.post(f"/v1/models/{second['id']}/predict", json=one), "post", predict, 503, "queued, 2nd in the queue"
    )
    assert (p["job_state"], p["queue_position"]) == ("queued", 2)
    p = _matches(c, c.post("/v1/models/nope/predict", json=one), "post", predict, 404)
    assert p["resource"] == "model"
    _matches(
        c,
        c.post(f"/v1/models/{first['id']}/predict", content=b"{", headers={"Content-Type": "application/json"}),
        "post",
        predict,
        400,
        "line 1, column 2",
    )
    r = c.post(f"/v1/models/{first['id']}/predict", json={"instances": [{"indices": [0], "valuez": [1.0]}]})
    assert "did you mean 'values'" in assert_problem(r, 422)["detail"]
    c.delete(f"/v1/jobs/{second['id']}")
    assert c.get(f"/v1/jobs/{first['id']}").json()["queue_position"] == 1
    assert c.post(f"/v1/jobs/{first['id']}/stop").json()["state"] == "stopped"
    _matches(c, c.post(f"/v1/models/{first['id']}/predict", json=one), "post", predict, 409, "resume")


def test_try_it_out_in_order_with_the_documented_examples(client):
    """Upload the text/plain example, start a job with the job example as the document then shows it, predict
    with both predict examples: every step as Swagger would send it, and all succeed."""
    spec = client.get("/openapi.json").json()
    upload_body = spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert next(iter(upload_body)) == "text/plain"  # what "Try it out" opens on
    r = client.post(
        "/v1/datasets", content=upload_body["text/plain"]["example"], headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 201, r.text
    dataset = r.json()

    spec = client.get("/openapi.json").json()
    for item in spec["paths"].values():
        for param in item.get("delete", {}).get("parameters", []):
            assert "example" not in param, "a DELETE prefilled with a real id"
    examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert examples["small"]["value"]["train_dataset_id"] == dataset["id"]
    assert "eval_dataset_id" not in examples["with_eval"]["value"]  # no test set shares its feature space
    r = client.post("/v1/jobs", json=examples["small"]["value"])
    assert r.status_code == 201, r.text
    job = r.json()
    wait_for(
        lambda: client.get(f"/v1/jobs/{job['id']}").json()["state"] == "completed",
        timeout=120,
        what="the example job to complete",
    )

    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/v1/models/{model_id}/predict"]["post"]
    (param,) = predict["parameters"]
    assert param["example"] == job["id"]
    for name, example in predict["requestBody"]["content"]["application/json"]["examples"].items():
        for instance in example["value"]["instances"]:
            assert max(instance["indices"]) < dataset["num_features"], (name, instance)
        r = client.post(f"/v1/models/{job['id']}/predict", json=example["value"])
        assert r.status_code == 200, (name, r.text)
        answer = r.json()
        k = example["value"]["k"]
        if k > dataset["num_labels"]:  # the model has 3 labels: asking for 5 says so
            assert any(f"k={k} is more than the model's 3 labels" in w for w in answer["warnings"]), answer
            assert all(len(p["labels"]) <= 3 for p in answer["predictions"])
        else:
            assert not any("more than the model" in w for w in answer["warnings"]), answer
    r = client.post(f"/v1/models/{job['id']}/predict", json={"instances": [{"indices": [0, 2, 17], "values": [1] * 3}]})
    p = assert_problem(r, 422)
    assert p["type"] == _documented(client, "post", "/v1/models/{model_id}/predict", 422)["type"]


def test_every_served_path_has_a_route_label(client):
    """Prometheus labels requests by route template: the docs, the document, the console and its static files too;
    `unmatched` only for paths nothing serves."""
    paths = {re.sub(r"\{[^}]+\}", "0" * 32, p) for _, p in all_routes(client.app)}
    paths |= {"/static/docs/swagger-ui.css", "/ui/static/console.css", "/ui/vendor/plotly.min.js", "/openapi.json"}
    for path in sorted(paths):
        client.get(path, follow_redirects=False)
    client.get("/no/such/path")
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith("slide_http_requests_total{")]
    routes = {re.search(r'route="([^"]*)"', ln).group(1) for ln in lines}
    unmatched = [ln for ln in lines if 'route="unmatched"' in ln]
    assert len(unmatched) == 1 and 'status="404"' in unmatched[0], unmatched
    for label in (
        "/docs",
        "/redoc",
        "/openapi.json",
        "/ui",
        "/ui/jobs/{job_id}",
        "/static/docs/{path}",
        "/ui/static/{path}",
        "/ui/vendor/{path}",
    ):
        assert label in routes, (label, routes)
