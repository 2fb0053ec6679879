"""Services that stop or crash mid-training: jobs marked so and resumed under the same id. (A trainer killed
mid-epoch, and a server killed with kill -9, are in tests/faults.)"""

from __future__ import annotations

import pytest
from sqlalchemy import update

from app.db import JobRow
from tests.app.helpers import upload, wait_for
from tests.conftest import make_settings

CONFIG = {
    "model": {"hidden": [32]},
    "optimizer": {"batch_size": 64},
    "schedule": {"epochs": 60, "early_stop_patience": "never"},
    "seed": 5,
}


def _job(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def _start(client, xmc_files, **config):
    train_id = upload(client, xmc_files["train"]).json()["id"]
    r = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": dict(CONFIG, **config)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.slow
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
    done = wait_for(
        lambda: (j := _job(resumed, job_id))["state"] in ("completed", "failed") and j,
        timeout=120,
        what="completed after restart",
    )
    assert done["state"] == "completed", done["error"]
    assert done["runs"] == 2 and done["progress"]["epoch"] == 60


def test_crash_recovery_marks_running_jobs_interrupted(tmp_path, client_for, xmc_files):
    data = tmp_path / "data"
    client = client_for(make_settings(data, max_concurrent_jobs=1))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    db = client.app.state.services.db
    ids = [
        client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": {"schedule": {"epochs": 1}}}).json()["id"]
        for _ in range(2)
    ]
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
