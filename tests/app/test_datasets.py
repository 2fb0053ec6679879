"""POST/GET/DELETE /v1/datasets: plain, gzip and multipart uploads, listing, deleting. Refused uploads (malformed,
oversized, hostile) are in test_bad_input.py."""

from __future__ import annotations

from tests.app.helpers import assert_problem, upload

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
    r = client.post(
        "/v1/datasets",
        params={"name": "picked"},
        data={"note": "ignored"},
        files={"file": ("train.txt", plain, "text/plain")},
    )
    assert r.status_code == 201, r.text
    _check_fields(r.json(), summary, len(plain))

    r = client.post("/v1/datasets", files={"file": ("train.txt.gz", gz, "application/gzip")})
    assert r.status_code == 201, r.text
    _check_fields(r.json(), summary, len(gz))
    assert client.get("/v1/datasets").json()["count"] == 4


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
    job = client.post("/v1/jobs", json={"train_dataset_id": dataset["id"], "config": {"schedule": {"epochs": 1}}})
    assert job.status_code == 201, job.text
    p = assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 409)
    assert job.json()["id"] in p["detail"]
    assert client.delete(f"/v1/jobs/{job.json()['id']}").status_code == 204
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
