"""POST/GET/DELETE /v1/datasets: plain, gzip and multipart uploads; errors as problem+json; nothing left behind."""

from __future__ import annotations

from pathlib import Path

from tests.app.helpers import assert_problem, gzip_bytes, upload
from tests.conftest import make_settings

SUMMARY_FIELDS = ("num_points", "num_features", "num_labels", "nnz")


def _leftovers(settings) -> list[str]:
    root = settings.datasets_dir
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _check_fields(body: dict, summary: dict, size: int) -> None:
    for key in SUMMARY_FIELDS:
        assert body[key] == summary[key], key
    assert abs(body["avg_labels_per_point"] - summary["avg_labels_per_point"]) < 1e-9
    assert body["bytes"] == size
    assert len(body["id"]) == 32 and body["created_at"]


def test_upload_plain_then_get_list_delete(client, settings, xmc_files, xmc_summaries):
    r = upload(client, xmc_files["train"], name="../../etc/passwd")
    assert r.status_code == 201, r.text
    body = r.json()
    _check_fields(body, xmc_summaries["train"], xmc_files["train"].stat().st_size)
    assert body["name"] == "../../etc/passwd"  # a label only: the id names the directory
    assert r.headers["location"] == f"/v1/datasets/{body['id']}"
    assert _leftovers(settings) == [body["id"]]

    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    listed = client.get("/v1/datasets").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == body["id"]

    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert_problem(client.get(f"/v1/datasets/{body['id']}"), 404)
    assert _leftovers(settings) == []


def test_upload_gzip_both_ways_and_multipart(client, xmc_files, xmc_summaries):
    summary = xmc_summaries["train"]
    gz = xmc_files["train_gz"].read_bytes()

    r = upload(client, xmc_files["train_gz"])  # Content-Type: application/gzip
    assert r.status_code == 201, r.text
    _check_fields(r.json(), summary, len(gz))

    r = client.post("/v1/datasets", content=gz, headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
    assert r.status_code == 201, r.text
    _check_fields(r.json(), summary, len(gz))
    assert r.json()["name"].startswith("dataset-")

    plain = xmc_files["train"].read_bytes()
    r = client.post("/v1/datasets", params={"name": "picked"}, data={"note": "ignored"},
                    files={"file": ("train.txt", plain, "text/plain")})
    assert r.status_code == 201, r.text
    _check_fields(r.json(), summary, len(plain))

    r = client.post("/v1/datasets", files={"file": ("train.txt.gz", gz, "application/gzip")})
    assert r.status_code == 201, r.text
    _check_fields(r.json(), summary, len(gz))
    assert client.get("/v1/datasets").json()["count"] == 4


def test_malformed_line_is_422_naming_the_line_and_leaves_nothing(client, settings):
    text = b"3 10 4\n0,1 1:0.5 2:1.0\n2 3:1.0 4 \n1 5:0.25\n"
    for body, headers in ((text, {"Content-Type": "text/plain"}),
                          (gzip_bytes(text), {"Content-Type": "application/gzip"})):
        p = assert_problem(client.post("/v1/datasets", content=body, headers=headers), 422)
        assert p["line"] == 3, p
        assert "line 3" in p["detail"]
    p = assert_problem(client.post("/v1/datasets", files={"file": ("bad.txt", text)}), 422)
    assert p["line"] == 3
    assert client.get("/v1/datasets").json()["count"] == 0
    assert _leftovers(settings) == []


def test_other_content_errors(client, settings):
    # header promises more points than follow
    p = assert_problem(client.post("/v1/datasets", content=b"5 10 4\n0 1:1\n", headers={"Content-Type": "text/plain"}), 422)
    assert p["type"].endswith("invalid-content")
    # empty body
    assert_problem(client.post("/v1/datasets", content=b"", headers={"Content-Type": "text/plain"}), 422)
    # says gzip, is not
    assert_problem(client.post("/v1/datasets", content=b"1 2 2\n0 1:1\n", headers={"Content-Encoding": "gzip"}), 422)
    # multipart without a `file` part
    p = assert_problem(client.post("/v1/datasets", data={"other": "x"}, files={"wrong": ("a.txt", b"1 2 2\n0 1:1\n")}), 422)
    assert p["field"] == "body.file"
    # not a dataset media type
    assert_problem(client.post("/v1/datasets", json={"a": 1}), 415)
    # name too long -> request validation, as problem+json naming the parameter
    p = assert_problem(client.post("/v1/datasets", params={"name": "x" * 300}, content=b"1 2 2\n0 1:1\n"), 422)
    assert p["field"] == "query.name"
    assert _leftovers(settings) == []


def test_over_the_limit_is_413_and_leaves_nothing(tmp_path: Path, client_for, xmc_files):
    settings = make_settings(tmp_path / "data", max_upload_bytes=50_000)
    client = client_for(settings)
    big = xmc_files["train"].read_bytes()
    assert len(big) > 50_000
    p = assert_problem(upload(client, xmc_files["train"]), 413)
    assert p["limit_bytes"] == 50_000
    # streamed without Content-Length (chunked): the limit still holds
    p = assert_problem(client.post("/v1/datasets", content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                                   headers={"Content-Type": "text/plain"}), 413)
    # multipart
    assert_problem(client.post("/v1/datasets", files={"file": ("t.txt", big)}), 413)
    # a small gzip that inflates past the limit (gzip bomb)
    bomb = gzip_bytes(b"1000000 10 10\n" + b"0 1:1\n" * 100_000)
    assert len(bomb) < 50_000
    assert_problem(client.post("/v1/datasets", content=bomb, headers={"Content-Type": "application/gzip"}), 413)
    assert client.get("/v1/datasets").json()["count"] == 0
    assert _leftovers(settings) == []


def test_unknown_ids_and_problem_shape(client):
    p = assert_problem(client.get("/v1/datasets/nope"), 404)
    assert p["instance"] == "/v1/datasets/nope"
    assert p["id"] == "nope"
    assert_problem(client.delete("/v1/datasets/nope"), 404)
    assert_problem(client.get("/v1/no-such-route"), 404)
    r = client.put("/v1/datasets")
    assert_problem(r, 405)
    assert r.headers["allow"] == "GET, POST"  # every method of the resource, though each is its own route
    assert client.request("OPTIONS", "/v1/datasets/nope").headers["allow"] == "GET, DELETE"


def test_delete_in_use_is_409(client, xmc_files):
    dataset = upload(client, xmc_files["train"]).json()
    job = client.post("/v1/jobs", json={"train_dataset_id": dataset["id"], "config": {"epochs": 1}})
    assert job.status_code == 201, job.text
    p = assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 409)
    assert job.json()["id"] in p["detail"]
    assert client.delete(f"/v1/jobs/{job.json()['id']}").status_code == 204
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
