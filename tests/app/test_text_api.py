"""Text datasets, names, versions, aliases, evaluation, pagination and queue places over HTTP (in-process app, real
engine and trainer processes)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.app.helpers import assert_problem, copy_trained, job_diagnosis, merged, upload, wait_for
from tests.conftest import make_settings
from tests.engine.test_text import jsonl_bytes, text_records

pytestmark = pytest.mark.slow  # each test trains jobs in trainer processes

# A dense model of 12 labels: learns the planted words in a second or two (see tests/engine/test_text.py).
TEXT_CONFIG = {
    "model": {"hidden": [16], "sample_output": False, "sample_hidden": False},
    "optimizer": {"batch_size": 16, "lr": 0.01},
    "schedule": {"epochs": 15},
    "seed": 1,
}


def post_jsonl(client, data: bytes, name: str, like: str | None = None, **headers):
    params = {"name": name, "format": "jsonl"}
    if like:
        params["like"] = like
    return client.post(
        "/v1/datasets", params=params, content=data, headers={"Content-Type": "application/x-ndjson", **headers}
    )


def finished_job(client, settings, train_id, eval_id=None, config=TEXT_CONFIG):
    body = {"train_dataset_id": train_id, "config": config}
    if eval_id:
        body["eval_dataset_id"] = eval_id
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] in ("completed", "failed"),
        timeout=120,
        what="the job to end",
        diagnose=job_diagnosis(client, settings, job_id),
    )
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "completed", job
    return job_id


def test_text_upload_predict_names_versions_evaluate(client_for, settings, trained_text, xmc_files):
    trained = copy_trained(trained_text, settings)
    client = client_for(settings)
    train, test, job_id = trained.train, trained.test, trained.job_id
    assert train["format"] == "jsonl" and train["label_names"] and train["num_labels"] == 12
    assert test["like_dataset_id"] == train["id"] and test["unknown_labels"] == 15  # every 4th of 60 lines
    assert test["num_features"] == train["num_features"] and test["num_labels"] == train["num_labels"]
    # multipart works for text too
    files = {"file": ("t.jsonl", jsonl_bytes(text_records(5, 13)), "application/x-ndjson")}
    r = client.post("/v1/datasets", params={"format": "jsonl", "like": train["id"]}, files=files)
    assert r.status_code == 201 and r.json()["num_points"] == 5, r.text

    body = {"instances": [{"text": "w10 w11 w12"}, {"text": "w55 w56"}], "k": 3, "mode": "exact"}
    r = client.post(f"/v1/models/{job_id}/predict", json={**body, "probabilities": True})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["names"][0] for p in preds] == ["label é2", "label é11"]
    for p in preds:
        assert len(p["labels"]) == len(p["names"]) == len(p["scores"]) == 3 and p["note"] is None
        assert math.isclose(sum(p["probabilities"]), 1.0, rel_tol=1e-6)
        assert p["probabilities"] == sorted(p["probabilities"], reverse=True)
    plain = client.post(f"/v1/models/{job_id}/predict", json=body).json()["predictions"][0]
    assert plain["probabilities"] is None and plain["labels"] == preds[0]["labels"]
    # fewer than k: the model has 12 labels; a text with no known word says so too
    r = client.post(f"/v1/models/{job_id}/predict", json={"instances": [{"text": "zzz qqq"}], "k": 20})
    pred = r.json()["predictions"][0]
    assert len(pred["labels"]) == 12 and "only 12 labels" in pred["note"] and "vocabulary" in pred["note"]
    # text and indices in one request
    r = client.post(
        f"/v1/models/{job_id}/predict",
        json={"instances": [{"text": "w10"}, {"indices": [0], "values": [1.0]}], "k": 1},
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text

    # versions: list, pages, exact-version predict, a pruned version is a 404
    versions = client.get(f"/v1/models/{job_id}/versions").json()
    assert versions["count"] == len(versions["data"]) >= 1
    newest = versions["data"][0]
    assert {"version", "step", "created_at", "metrics", "aliases", "evaluations"} <= newest.keys()
    assert newest["metrics"]["p_at_1"] is not None
    numbers = [v["version"] for v in versions["data"]]
    assert numbers == sorted(numbers, reverse=True)
    if len(numbers) > 1:
        first = client.get(f"/v1/models/{job_id}/versions", params={"limit": 1}).json()
        assert [v["version"] for v in first["data"]] == numbers[:1] and first["next_cursor"]
        rest = client.get(f"/v1/models/{job_id}/versions", params={"cursor": first["next_cursor"]}).json()
        assert [v["version"] for v in rest["data"]] == numbers[1:] and rest["next_cursor"] is None
    r = client.post(f"/v1/models/{job_id}/versions/{numbers[-1]}/predict", json=body)
    assert r.status_code == 200 and r.json()["model_version"] == numbers[-1], r.text
    gone = min(numbers) - 1
    if gone >= 1:
        p = assert_problem(client.post(f"/v1/models/{job_id}/versions/{gone}/predict", json=body), 404)
        assert "pruned" in p["detail"]
    assert_problem(client.post(f"/v1/models/{job_id}/versions/999/predict", json=body), 404)

    # evaluation over HTTP, recorded on the version
    r = client.post(f"/v1/models/{job_id}/evaluate", json={"dataset_id": test["id"], "k": 5, "mode": "lsh"})
    assert r.status_code == 200, r.text
    ev = r.json()
    assert ev["state"] == "succeeded" and ev["points"] == 60 and ev["model_version"] == numbers[0]
    assert ev["p_at_1"] > 0.8 and 0 <= ev["recall_vs_exact"] <= 1 and ev["psp_at_5"] > 0 and ev["seconds"] >= 0
    assert client.get(ev["status_url"]).json()["id"] == ev["id"]
    exact = client.post(f"/v1/models/{job_id}/evaluate", json={"dataset_id": test["id"], "mode": "exact"}).json()
    assert exact["recall_vs_exact"] is None and exact["p_at_5"] >= 0
    listed = client.get(f"/v1/models/{job_id}/versions").json()["data"][0]["evaluations"]
    assert {e["id"] for e in listed} == {ev["id"], exact["id"]}
    xmc = upload(client, xmc_files["test"], name="other-space").json()
    assert_problem(client.post(f"/v1/models/{job_id}/evaluate", json={"dataset_id": xmc["id"]}), 422)
    assert_problem(client.post(f"/v1/models/{job_id}/evaluate", json={"dataset_id": "0" * 32}), 404)
    assert_problem(client.post(f"/v1/models/{'0' * 32}/evaluate", json={"dataset_id": test["id"]}), 404)
    assert_problem(client.get("/v1/evaluations/nope"), 404)


def test_bad_text_input_is_a_problem_never_a_500(client_for, settings, trained_text, xmc_files):
    trained = copy_trained(trained_text, settings)
    client = client_for(settings)
    train, job_id = {"id": trained.train_id}, trained.job_id
    url = f"/v1/models/{job_id}/predict"
    cases = [
        ({"instances": [{"text": ""}]}, "body.instances[0].text"),
        ({"instances": [{"text": "   "}]}, "body.instances[0]"),
        ({"instances": [{"text": 5}]}, "body.instances[0].text"),
        ({"instances": [{"text": ["a"]}]}, "body.instances[0].text"),
        ({"instances": [{"text": "x" * 10_001}]}, "body.instances[0].text"),
        ({"instances": [{"text": "a b", "indices": [1], "values": [1.0]}]}, "body.instances[0]"),
        ({"instances": [{}]}, "body.instances[0]"),
        ({"instances": [{"text": "w1"}], "probabilities": "yes"}, "body.probabilities"),
    ]
    for body, field in cases:
        p = assert_problem(client.post(url, json=body), 422)
        assert p["field"] == field, (body, p)
    # text to a model trained on feature ids
    xmc = upload(client, xmc_files["train"], name="xmc").json()
    xmc_job = finished_job(
        client,
        settings,
        xmc["id"],
        config={"model": {"hidden": [32]}, "optimizer": {"batch_size": 64}, "schedule": {"epochs": 1}},
    )
    p = assert_problem(client.post(f"/v1/models/{xmc_job}/predict", json={"instances": [{"text": "hello"}]}), 422)
    assert "not trained on a text dataset" in p["detail"] and p["field"] == "body.instances[0].text"
    # unknown alias, bad alias name, deleted version
    assert_problem(client.post("/v1/aliases/nope/predict", json={"instances": [{"text": "w1"}]}), 404)
    assert_problem(client.put("/v1/aliases/bad name!", json={"model_id": job_id}), 422)
    assert_problem(client.put("/v1/aliases/prod", json={"model_id": job_id, "version": 999}), 404)
    assert_problem(client.put("/v1/aliases/prod", json={"model_id": "0" * 32}), 404)
    assert_problem(client.put("/v1/aliases/prod", json={"model_id": job_id, "version": "1"}), 422)
    # bad JSONL lines name the line; like needs a text dataset
    bad = b'{"text": "fine words", "labels": ["a"]}\n{"text": 3, "labels": []}\n'
    p = assert_problem(post_jsonl(client, bad, "bad"), 422)
    assert p["line"] == 2 and "`text` must be a string" in p["detail"]
    p = assert_problem(post_jsonl(client, b"not json\n", "bad"), 422)
    assert p["line"] == 1
    assert_problem(post_jsonl(client, jsonl_bytes(text_records(3, 1)), "x", like="0" * 32), 404)
    p = assert_problem(post_jsonl(client, jsonl_bytes(text_records(3, 1)), "x", like=xmc["id"]), 422)
    assert "not uploaded as text" in p["detail"]
    r = client.post("/v1/datasets", params={"like": train["id"]}, content=b"1 1 1\n0 0:1\n")
    assert_problem(r, 422)
    assert_problem(client.get("/v1/datasets", params={"cursor": "garbage!"}), 422)


def test_label_names_for_an_xmc_dataset(client, settings, xmc_files, xmc_summaries):
    ds = upload(client, xmc_files["train"], name="xmc").json()
    n = xmc_summaries["train"]["num_labels"]
    p = assert_problem(client.put(f"/v1/datasets/{ds['id']}/label-names", content=b"a\nb\n"), 422)
    assert f"2 names for {n} labels" in p["detail"]
    dup = "\n".join(["x"] + [f"n{i}" for i in range(1, n - 1)] + ["x"]).encode()
    p = assert_problem(client.put(f"/v1/datasets/{ds['id']}/label-names", content=dup), 422)
    assert p["line"] == n
    assert_problem(client.put(f"/v1/datasets/{'0' * 32}/label-names", content=b"a\n"), 404)
    job_id = finished_job(
        client,
        settings,
        ds["id"],
        config={"model": {"hidden": [32]}, "optimizer": {"batch_size": 64}, "schedule": {"epochs": 1}},
    )
    one = {"instances": [{"indices": [0, 1], "values": [1.0, 1.0]}], "k": 3}
    assert client.post(f"/v1/models/{job_id}/predict", json=one).json()["predictions"][0]["names"] is None
    names = "\n".join(f"category {i}" for i in range(n)).encode() + b"\n"
    r = client.put(f"/v1/datasets/{ds['id']}/label-names", content=names)
    assert r.status_code == 200 and r.json()["label_names"], r.text
    pred = client.post(f"/v1/models/{job_id}/predict", json=one).json()["predictions"][0]
    assert pred["names"] == [f"category {i}" for i in pred["labels"]]


def test_aliases_pin_versions_and_lists_page(tmp_path, client_for):
    settings = make_settings(tmp_path / "data", snapshot_keep=2, snapshot_interval_s=0.3, max_concurrent_jobs=1)
    client = client_for(settings)
    train = post_jsonl(client, jsonl_bytes(text_records(300, 11)), "train").json()
    r = client.post(
        "/v1/jobs", json={"train_dataset_id": train["id"], "config": merged(TEXT_CONFIG, {"schedule": {"epochs": 400}})}
    )
    job_id = r.json()["id"]
    queued = client.post("/v1/jobs", json={"train_dataset_id": train["id"], "config": TEXT_CONFIG}).json()
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "running", timeout=30, what="running")
    place = client.get(f"/v1/jobs/{queued['id']}").json()
    assert place["state"] == "queued" and place["queue_position"] == 1
    assert "waiting for a free slot" in place["queue_reason"]
    assert client.get(f"/v1/jobs/{job_id}").json()["queue_reason"] is None
    assert client.delete(f"/v1/jobs/{queued['id']}").status_code == 204

    def pin_newest() -> tuple[int, Any] | None:
        """Pin `prod` to the newest version; None when the trainer pruned it first (keep=2, a version every 0.3 s)."""
        version = client.get(f"/v1/jobs/{job_id}").json()["model_version"]
        if not version:
            return None
        answer = client.put("/v1/aliases/prod", json={"model_id": job_id, "version": version})
        if answer.status_code == 404 and version not in answer.json()["retained"]:
            return None
        return version, answer

    diagnose = job_diagnosis(client, settings, job_id)
    first, r = wait_for(pin_newest, timeout=60, what="a first snapshot pinned", diagnose=diagnose)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == first and r.json()["model_version"] == first
    client.put("/v1/aliases/latest", json={"model_id": job_id, "version": None})
    wait_for(
        lambda: (client.get(f"/v1/jobs/{job_id}").json()["model_version"] or 0) >= first + 3,
        timeout=90,
        what="newer versions",
    )
    retained = [v["version"] for v in client.get(f"/v1/models/{job_id}/versions").json()["data"]]
    assert first in retained and len(retained) >= 3  # keep=2 plus the pinned one
    pinned = next(v for v in client.get(f"/v1/models/{job_id}/versions").json()["data"] if v["version"] == first)
    assert pinned["aliases"] == ["prod"]
    text = {"instances": [{"text": "w10 w11"}], "k": 2}
    r = client.post("/v1/aliases/prod/predict", json=text)
    assert r.status_code == 200, r.text
    assert (r.json()["model_id"], r.json()["model_version"], r.json()["alias"]) == (job_id, first, "prod")
    newest = client.post("/v1/aliases/latest/predict", json=text).json()
    assert newest["model_version"] > first
    # lists: by name, paged
    page = client.get("/v1/aliases", params={"limit": 1}).json()
    assert [a["alias"] for a in page["data"]] == ["latest"] and page["next_cursor"]
    rest = client.get("/v1/aliases", params={"cursor": page["next_cursor"]}).json()
    assert [a["alias"] for a in rest["data"]] == ["prod"] and rest["next_cursor"] is None
    # moving to null releases the pin: the old version goes at the next snapshot
    r = client.put("/v1/aliases/prod", json={"model_id": job_id, "version": None})
    assert r.json()["version"] is None and r.json()["model_version"] >= newest["model_version"]
    client.post(f"/v1/jobs/{job_id}/stop")
    wait_for(
        lambda: first not in [v["version"] for v in client.get(f"/v1/models/{job_id}/versions").json()["data"]],
        timeout=30,
        what="the unpinned version to be pruned",
    )
    assert client.get("/v1/aliases/prod").json()["model_id"] == job_id
    assert client.delete("/v1/aliases/prod").status_code == 204
    assert_problem(client.get("/v1/aliases/prod"), 404)
    assert_problem(client.delete("/v1/aliases/prod"), 404)
    # datasets and jobs are paged too
    post_jsonl(client, jsonl_bytes(text_records(5, 3)), "second")
    one = client.get("/v1/datasets", params={"limit": 1}).json()
    assert one["count"] == 1 and one["data"][0]["name"] == "second" and one["next_cursor"]
    two = client.get("/v1/datasets", params={"limit": 1, "cursor": one["next_cursor"]}).json()
    assert two["data"][0]["name"] == "train" and two["next_cursor"] is None
    jobs = client.get("/v1/jobs", params={"limit": 1}).json()
    assert jobs["count"] == 1 and jobs["next_cursor"] is None
    models = client.get("/v1/models", params={"limit": 5}).json()
    assert [m["id"] for m in models["data"]] == [job_id]


def test_a_large_evaluation_runs_in_the_background(client_for, settings, trained_text, monkeypatch):
    import app.services.evaluations as evaluations

    monkeypatch.setattr(evaluations, "INLINE_POINTS", 10)  # the 60-point test set counts as large
    trained = copy_trained(trained_text, settings)
    client = client_for(settings)
    r = client.post(f"/v1/models/{trained.job_id}/evaluate", json={"dataset_id": trained.test_id, "mode": "exact"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == r.json()["status_url"] and r.json()["state"] == "running"
    done = wait_for(
        lambda: (e := client.get(r.headers["location"]).json())["state"] != "running" and e,
        timeout=60,
        what="the background evaluation",
    )
    assert done["state"] == "succeeded" and done["points"] == 60 and done["p_at_1"] is not None, done
