"""kill -9 of the whole service (a real uvicorn process) while a job trains, then a start on the same data dir and
database: datasets, jobs, metrics and model versions are all there, predictions work, and the job resumes.

Two crashes, two defined outcomes:
- only the server dies: its orphaned trainer notices (its parent is gone), checkpoints, records `interrupted` and
  exits by itself; nothing is lost, and the next start resumes the job (SLIDE_AUTO_RESUME);
- the server and its trainers die together (a container or cgroup killed): the job row still says `running`;
  the next start marks it `interrupted` (or resumes it), and it continues from its newest snapshot.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import sqlite3
from pathlib import Path

import httpx

from engine import SnapshotStore, load_model
from engine.snapshot import read_manifest
from tests.app.helpers import wait_for
from tests.faults.conftest import alive, descendants

CONFIG = {
    "model": {"hidden": [32]},
    "optimizer": {"batch_size": 64},
    "schedule": {"epochs": 80, "early_stop_patience": "never"},
    "seed": 11,
}
QUERY = {"instances": [{"indices": [0, 5, 17], "values": [1.0, 0.5, 0.25]}], "k": 5, "mode": "lsh"}
STABLE = ("completed", "stopped", "failed", "interrupted")


def _job(c: httpx.Client, job_id: str) -> dict:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _row(data: Path, job_id: str) -> dict:
    """The job's row straight from the database file (no server running)."""
    with sqlite3.connect(f"file:{data / 'slide.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def _start_training(c: httpx.Client, xmc_files) -> tuple[list[dict], str]:
    datasets = []
    for name in ("train", "test"):
        r = c.post(
            "/v1/datasets",
            params={"name": name},
            content=xmc_files[name].read_bytes(),
            headers={"Content-Type": "text/plain"},
        )
        assert r.status_code == 201, r.text
        datasets.append(r.json())
    body = {"train_dataset_id": datasets[0]["id"], "eval_dataset_id": datasets[1]["id"], "config": CONFIG}
    job_id = c.post("/v1/jobs", json=body).json()["id"]
    wait_for(
        lambda: (
            (j := _job(c, job_id))["state"] == "running"
            and (j["model_version"] or 0) >= 2
            and len(c.get(f"/v1/jobs/{job_id}/metrics").json()["data"]) >= 2
        ),
        timeout=120,
        what="a job running with two snapshots and two metric points",
    )
    return datasets, job_id


def _record(c: httpx.Client, job_id: str) -> dict:
    return {
        "datasets": sorted(c.get("/v1/datasets").json()["data"], key=lambda d: d["id"]),
        "metrics": c.get(f"/v1/jobs/{job_id}/metrics").json()["data"],
        "versions": {v["version"]: v for v in c.get(f"/v1/models/{job_id}").json()["versions"]},
    }


def _check_preserved(c: httpx.Client, job_id: str, before: dict, checkpoint_step: int) -> None:
    now = _record(c, job_id)
    assert now["datasets"] == before["datasets"]
    kept = [m for m in before["metrics"] if m["step"] <= checkpoint_step]
    assert kept and all(m in now["metrics"] for m in kept), (kept, now["metrics"])
    for number, v in before["versions"].items():
        if v["step"] is not None:  # (a version just published may not have had its row yet)
            assert now["versions"][number]["step"] == v["step"], (number, now["versions"])


def _training_then_frozen(servers, data, xmc_files):
    """A server whose job is mid-training, its trainer frozen (SIGSTOP) so that it is still mid-training when
    it dies: (server, client, job id, the record before, the server's descendants, the trainer's pid)."""
    server = servers(data)
    c = server.client()
    _, job_id = _start_training(c, xmc_files)
    before = _record(c, job_id)
    children = descendants(server.pid)
    trainer_pid = _row(data, job_id)["pid"]
    assert trainer_pid in children, (trainer_pid, children)
    os.kill(trainer_pid, signal.SIGSTOP)
    return server, c, job_id, before, children, trainer_pid


def _finish(c: httpx.Client, job_id: str, stop_points: int = 0) -> dict:
    """Completed, one metric point per epoch (plus `stop_points` at mid-epoch stops), none twice; predicting."""
    done = wait_for(lambda: (j := _job(c, job_id))["state"] in STABLE and j, timeout=180, what="the job to finish")
    assert done["state"] == "completed", done
    steps = [m["step"] for m in c.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
    assert steps == sorted(set(steps)), steps
    assert CONFIG["schedule"]["epochs"] <= len(steps) <= CONFIG["schedule"]["epochs"] + stop_points, steps
    r = c.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert r.status_code == 200 and r.json()["model_version"] == done["model_version"], r.text
    return done


def test_sigkill_of_the_server_alone_orphan_checkpoints_and_exits_then_restart_resumes(tmp_path, servers, xmc_files):
    data = tmp_path / "data"
    server, c, job_id, before, children, trainer_pid = _training_then_frozen(servers, data, xmc_files)
    assert _row(data, job_id)["state"] == "running"
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    os.kill(trainer_pid, signal.SIGCONT)
    # Orphans are not left behind: everything the server started exits on its own.
    wait_for(
        lambda: not any(alive(p) for p in children),
        timeout=90,
        what="the orphaned processes to exit",
        diagnose=lambda: (data / "jobs" / job_id / "trainer.log").read_text()[-3000:],
    )
    row = _row(data, job_id)
    assert row["state"] == "interrupted" and row["interruptions"] == 1 and row["pid"] is None, row
    # ... after a checkpoint of where it stopped: nothing was lost.
    version, path = SnapshotStore(data / "jobs" / job_id / "snapshots").latest()
    assert version > max(before["versions"])
    assert read_manifest(path)["trainer_state"]["step"] == row["step"]

    server = servers(data)  # SLIDE_AUTO_RESUME defaults to true
    c = server.client()
    _check_preserved(c, job_id, before, row["step"])
    r = c.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert r.status_code == 200 and r.json()["model_version"] >= version, r.text
    done = _finish(c, job_id, stop_points=1)  # the orphan reported where it stopped
    assert done["interruptions"] == 1 and done["runs"] == 2, done
    server.stop_gracefully()


def test_sigkill_of_the_server_and_its_trainers_then_restart_resumes_from_the_last_snapshot(
    tmp_path, servers, xmc_files
):
    data = tmp_path / "data"
    server, c, job_id, before, children, trainer_pid = _training_then_frozen(servers, data, xmc_files)
    step_at_kill = _job(c, job_id)["progress"]["step"]  # its last heartbeat

    server.kill_group()
    wait_for(lambda: not any(alive(p) for p in children), timeout=30, what="the process group to die")
    row = _row(data, job_id)
    assert row["state"] == "running", row  # nobody was left to record anything
    store = SnapshotStore(data / "jobs" / job_id / "snapshots")
    version, path = store.latest()
    checkpoint_step = read_manifest(path)["trainer_state"]["step"]
    load_model(path, verify=True)  # complete, checksums and all

    server = servers(data, SLIDE_AUTO_RESUME="false")
    c = server.client()
    job = _job(c, job_id)
    assert job["state"] == "interrupted" and job["interruptions"] == 1 and job["error"] is None, job
    assert job["model_version"] in (version, version - 1)  # the kill may fall between a publication and its row
    _check_preserved(c, job_id, before, checkpoint_step)
    r = c.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert r.status_code == 200 and r.json()["model_version"] == version, r.text

    assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    done = _finish(c, job_id)
    assert done["runs"] == 2 and done["interruptions"] == 1, done
    # It went back to its newest snapshot, at most one snapshot interval behind where it was killed.
    log = (data / "jobs" / job_id / "trainer.log").read_text()
    assert re.findall(r"resumed from snapshot v(\d+) at step (\d+)", log) == [(str(version), str(checkpoint_step))]
    steps = sorted((v["version"], v["step"]) for v in before["versions"].values() if v["step"] is not None)
    interval = max(b[1] - a[1] for a, b in itertools.pairwise(steps))
    assert checkpoint_step >= step_at_kill - interval, (checkpoint_step, step_at_kill, steps)
    server.stop_gracefully()
