"""Trainer processes that die, and services that stop or crash mid-training: nothing lost beyond one snapshot
interval, jobs marked so and resumed under the same id."""

from __future__ import annotations

import os
import signal

from sqlalchemy import update

from app.db import JobRow
from tests.app.helpers import upload, wait_for
from tests.conftest import make_settings

CONFIG = {"hidden": [32], "batch_size": 64, "seed": 5, "epochs": 60}


def _job(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def _start(client, xmc_files, **config):
    train_id = upload(client, xmc_files["train"]).json()["id"]
    r = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": dict(CONFIG, **config)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_killed_trainer_fails_with_reason_then_resumes_from_its_snapshot(tmp_path, client_for, xmc_files):
    client = client_for(make_settings(tmp_path / "data"))
    services = client.app.state.services
    job_id = _start(client, xmc_files, epochs=150)  # long enough that it cannot finish before the kill
    wait_for(lambda: (j := _job(client, job_id))["state"] == "running" and (j["model_version"] or 0) >= 2,
             what="two snapshots while running")
    pid = services.jobs.get(job_id).pid
    assert pid and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    failed = wait_for(lambda: (j := _job(client, job_id))["state"] == "failed" and j, what="failed")
    assert "SIGKILL" in failed["error"] and "exited with code -9" in failed["error"]
    version_at_death = failed["model_version"]
    # the model keeps answering from the last snapshot
    pred = client.post(f"/v1/models/{job_id}/predict", json={"instances": [{"indices": [4], "values": [1.0]}]})
    assert pred.status_code == 200 and pred.json()["model_version"] == version_at_death

    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    done = wait_for(lambda: (j := _job(client, job_id))["state"] in ("completed", "failed") and j, timeout=120,
                    what="completed")
    assert done["state"] == "completed", done["error"]
    assert done["runs"] == 2 and done["error"] is None
    assert done["model_version"] > version_at_death
    steps = [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
    assert steps == sorted(set(steps)) and len(steps) == 150  # one point per epoch, none twice


def test_shutdown_interrupts_and_the_next_start_resumes(tmp_path, client_for, xmc_files):
    data = tmp_path / "data"
    first = client_for(make_settings(data))
    job_id = _start(first, xmc_files)
    wait_for(lambda: (_job(first, job_id)["model_version"] or 0) >= 1, what="a snapshot")
    first.__exit__(None, None, None)  # graceful shutdown: the trainer checkpoints and exits

    held = client_for(make_settings(data, auto_resume=False))
    job = _job(held, job_id)
    assert job["state"] == "interrupted", job
    step_at_shutdown = job["progress"]["step"]
    assert job["model_version"] >= 1 and step_at_shutdown > 0
    held.__exit__(None, None, None)

    resumed = client_for(make_settings(data, auto_resume=True))
    done = wait_for(lambda: (j := _job(resumed, job_id))["state"] in ("completed", "failed") and j, timeout=120,
                    what="completed after restart")
    assert done["state"] == "completed", done["error"]
    assert done["runs"] == 2 and done["progress"]["epoch"] == 60


def test_crash_recovery_marks_running_jobs_interrupted(tmp_path, client_for, xmc_files):
    data = tmp_path / "data"
    client = client_for(make_settings(data, max_concurrent_jobs=1))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    db = client.app.state.services.db
    ids = [client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": {"epochs": 1}}).json()["id"]
           for _ in range(2)]
    client.__exit__(None, None, None)
    before = db.sessionmaker().get(JobRow, ids[0]).interruptions  # 1 if the shutdown caught it training
    # Pretend the service died while one was training and the other stopping.
    with db.session() as s:
        s.execute(update(JobRow).where(JobRow.id == ids[0]).values(state="running", pid=999999))
        s.execute(update(JobRow).where(JobRow.id == ids[1]).values(state="stopping", pid=999999))
    again = client_for(make_settings(data, auto_resume=False))
    crashed, stopping = _job(again, ids[0]), _job(again, ids[1])
    assert crashed["state"] == "interrupted" and crashed["interruptions"] == before + 1
    assert stopping["state"] == "stopped"
    for job_id in ids:
        assert again.delete(f"/v1/jobs/{job_id}").status_code == 204
