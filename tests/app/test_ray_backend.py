"""Jobs with `"backend": {"kind": "ray", "shards": P}`: refused (422, saying how to enable it) without a Ray cluster;
with SLIDE_RAY_ADDRESS=local the job trains on label shards, serves live predictions from its merged snapshots,
stops, resumes and completes like a local job."""

from __future__ import annotations

import pytest

from tests.app.helpers import assert_problem, job_diagnosis, merged, upload, wait_for
from tests.conftest import make_settings

FAST = {
    "model": {"hidden": [32], "sample_output": True},
    "optimizer": {"batch_size": 64},
    "schedule": {"early_stop_patience": "never"},
    "seed": 3,
}
EPOCHS = 12
"""Of the live job: enough steps that the stop, asked for once its first snapshot serves, comes before the end on a
quiet machine too (with 5, a fresh 2-core machine finished the job first and the stop answered 409)."""


def test_ray_backend_needs_a_ray_cluster(client, xmc_files):
    train_id = upload(client, xmc_files["train"]).json()["id"]
    body = {
        "train_dataset_id": train_id,
        "config": {"schedule": {"epochs": 1}},
        "backend": {"kind": "ray", "shards": 2},
    }
    p = assert_problem(client.post("/v1/jobs", json=body), 422)
    assert p["field"] == "body.backend.kind"
    assert "SLIDE_RAY_ADDRESS" in p["detail"] and "pip install -e '.[ray]'" in p["detail"]
    bad = dict(body, backend={"kind": "ray", "shards": 0})
    assert assert_problem(client.post("/v1/jobs", json=bad), 422)["field"] == "body.backend.shards"
    assert client.get("/v1/jobs").json()["count"] == 0
    local = client.post("/v1/jobs", json=dict(body, backend={"kind": "local"}))
    assert local.status_code == 201, local.text
    assert local.json()["backend"] == {"kind": "local", "shards": 1}


def test_ray_job_refuses_more_shards_than_labels_and_the_sigmoid_loss(tmp_path, client_for, xmc_files):
    client = client_for(make_settings(tmp_path / "data", ray_address="local"))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    body = {"train_dataset_id": train_id, "backend": {"kind": "ray", "shards": 501}}
    p = assert_problem(client.post("/v1/jobs", json=body), 422)
    assert p["field"] == "body.backend.shards" and "500 labels" in p["detail"]
    sigmoid = dict(body, backend={"kind": "ray", "shards": 2}, config={"model": {"loss": "sigmoid"}})
    p = assert_problem(client.post("/v1/jobs", json=sigmoid), 422)
    assert p["field"] == "body.config.model.loss" and "softmax" in p["detail"]
    assert client.get("/v1/jobs").json()["count"] == 0


@pytest.mark.slow
def test_ray_job_live_predictions_stop_resume_complete(tmp_path, client_for, xmc_files):
    settings = make_settings(tmp_path / "data", ray_address="local", snapshot_interval_s=0.3)
    client = client_for(settings)
    train_id = upload(client, xmc_files["train"]).json()["id"]
    test_id = upload(client, xmc_files["test"]).json()["id"]
    r = client.post(
        "/v1/jobs",
        json={
            "train_dataset_id": train_id,
            "eval_dataset_id": test_id,
            "config": merged(FAST, {"schedule": {"epochs": EPOCHS}}),
            "backend": {"kind": "ray", "shards": 2},
        },
    )
    assert r.status_code == 201, r.text
    job = r.json()
    job_id = job["id"]
    assert job["backend"] == {"kind": "ray", "shards": 2}
    # the trainer process on this machine holds no model: its estimate is the driver's and the served model's
    assert "weights" not in job["memory_breakdown"] and job["memory_breakdown"]["serving"] > 0
    diagnose = job_diagnosis(client, settings, job_id)
    wait_for(
        lambda: (client.get(f"/v1/jobs/{job_id}").json()["model_version"] or 0) >= 1, timeout=300, diagnose=diagnose
    )
    query = {"instances": [{"indices": [0, 5, 17], "values": [1.0, 0.5, 0.25]}], "k": 5, "mode": "exact"}
    pred = client.post(f"/v1/models/{job_id}/predict", json=query)
    assert pred.status_code == 200, pred.text
    labels = pred.json()["predictions"][0]["labels"]
    assert len(labels) == 5 and all(0 <= x < 500 for x in labels)

    assert client.post(f"/v1/jobs/{job_id}/stop").status_code in (200, 202)
    stopped = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("stopped", "failed") and j,
        diagnose=diagnose,
    )
    assert stopped["state"] == "stopped", stopped["error"]
    step = stopped["progress"]["step"]
    assert step > 0 and stopped["progress"]["epoch"] < EPOCHS
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert metrics and metrics[-1]["step"] <= step

    # resume: it continues from the snapshot and completes
    assert client.post(f"/v1/jobs/{job_id}/resume").status_code in (200, 202)
    done = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("completed", "failed") and j,
        timeout=600,
        diagnose=diagnose,
    )
    assert done["state"] == "completed", done["error"]
    assert done["progress"]["epoch"] == EPOCHS and done["progress"]["step"] > step
    assert done["runs"] == 2
    # labels of a sharded model do not change online (its snapshots are sharded)
    p = assert_problem(client.delete(f"/v1/models/{job_id}/labels/3"), 409)
    assert "Ray label shards" in p["detail"]
