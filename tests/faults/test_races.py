"""Concurrency and races: uploads and jobs at once; stop, resume and delete at awkward moments.

Defined answers (README, "Failures"):
- stop is idempotent: 202 for a queued, running, interrupted, stopping or stopped job (the body says which state
  it is in now); 409 problem+json for a completed or failed one;
- resume: 202 for a stopped, failed or interrupted job; otherwise 409 problem+json naming the state (`stopping`:
  resume once it is stopped; `queued`/`running`: it is already training; `completed`: start a new job);
- delete: 204 in any state; a trainer still running is killed first (no checkpoint: its files go too), so no
  process, row or file of the job is left.
Every job ends in a stable state (completed, stopped, failed, interrupted) and no trainer process outlives it.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sqlalchemy import func, select

from app.db import MetricRow, ModelVersionRow
from engine import load_dataset, read_xmc
from tests.app.helpers import assert_problem, merged, upload, wait_for
from tests.conftest import make_settings
from tests.faults.conftest import alive

SHORT = {
    "model": {"hidden": [32]},
    "optimizer": {"batch_size": 64},
    "schedule": {"epochs": 8, "early_stop_patience": "never"},
    "seed": 1,
}
LONG = merged(SHORT, {"schedule": {"epochs": 500}})  # cannot finish while a test pokes at it
STABLE = ("completed", "stopped", "failed", "interrupted")
QUERY = {"instances": [{"indices": [3], "values": [1.0]}]}


def _trainers(job_id: str | None = None) -> list:
    """Live trainer processes started by this test's supervisor (all, or the one of `job_id`)."""
    prefix = "slide-job-" + (job_id[:8] if job_id else "")
    return [p for p in multiprocessing.active_children() if p.name.startswith(prefix)]


def _state(client, job_id: str) -> str:
    r = client.get(f"/v1/jobs/{job_id}")
    return "deleted" if r.status_code == 404 else r.json()["state"]


def _settle(client, job_ids: list[str], timeout: float = 120) -> dict[str, str]:
    """Every job reaches a stable state within the deadline, and no trainer process is left afterwards."""
    wait_for(
        lambda: all(_state(client, j) in STABLE + ("deleted",) for j in job_ids),
        timeout=timeout,
        what="every job to reach a stable state",
    )
    states = {j: _state(client, j) for j in job_ids}  # stable states stay as they are
    wait_for(
        lambda: not _trainers() and not client.app.state.services.supervisor.running(),
        timeout=60,
        what="no trainer process left",
        diagnose=lambda: str(_trainers()),
    )
    return states


def _start(client, train_id: str, config: dict) -> str:
    r = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": config})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _training(client, job_id: str) -> None:
    wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and (j["model_version"] or 0) >= 1,
        timeout=120,
        what="the job training, with a snapshot",
    )


def test_uploads_at_once_all_succeed_with_their_own_data(tmp_path, servers, xmc_files):
    server = servers(tmp_path / "data")
    files = [xmc_files["train"], xmc_files["test"], xmc_files["train"]]
    barrier = threading.Barrier(len(files), timeout=60)

    def body(data: bytes):
        yield data[: len(data) // 2]
        barrier.wait()  # every upload is half sent before any of them ends
        yield data[len(data) // 2 :]

    def send(i: int):
        with server.client(timeout=120) as c:
            return c.post(
                "/v1/datasets",
                params={"name": f"upload-{i}"},
                content=body(files[i].read_bytes()),
                headers={"Content-Type": "text/plain"},
            )

    with ThreadPoolExecutor(len(files)) as pool:
        results = list(pool.map(send, range(len(files))))
    assert [r.status_code for r in results] == [201] * len(files), [r.text for r in results]
    ids = [r.json()["id"] for r in results]
    assert len(set(ids)) == len(files)
    for dataset_id, path in zip(ids, files, strict=True):
        stored, sent = load_dataset(tmp_path / "data" / "datasets" / dataset_id, mmap=False), read_xmc(path)
        for name in ("x_indptr", "x_indices", "x_values", "y_indptr", "y_indices"):
            np.testing.assert_array_equal(getattr(stored, name), getattr(sent, name))
    with server.client() as c:
        listed = {d["id"]: d["name"] for d in c.get("/v1/datasets").json()["data"]}
    assert listed == {dataset_id: f"upload-{i}" for i, dataset_id in enumerate(ids)}


def test_two_jobs_train_at_once_and_both_complete(tmp_path, client_for, xmc_files):
    settings = make_settings(tmp_path / "data", max_concurrent_jobs=2)
    client = client_for(settings)
    train_id = upload(client, xmc_files["train"]).json()["id"]
    ids = [_start(client, train_id, merged(SHORT, {"schedule": {"epochs": 20}, "seed": seed})) for seed in (1, 2)]
    seen_both_running = False

    def finished() -> bool:
        nonlocal seen_both_running
        states = [_state(client, j) for j in ids]
        seen_both_running |= states == ["running", "running"]
        return all(s in STABLE for s in states)

    wait_for(finished, timeout=180, what="both jobs to finish")
    assert seen_both_running
    for job_id in ids:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "completed" and job["error"] is None, job
        assert len(client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]) == 20
        pred = client.post(f"/v1/models/{job_id}/predict", json=QUERY)
        assert pred.status_code == 200 and pred.json()["model_version"] == job["model_version"], pred.text
    assert all(settings.snapshots_dir(j).is_dir() for j in ids)
    _settle(client, ids)


def test_stop_twice_is_idempotent_and_completed_jobs_refuse_stop_and_resume(tmp_path, client_for, xmc_files):
    client = client_for(make_settings(tmp_path / "data", max_concurrent_jobs=2))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    short, long = _start(client, train_id, SHORT), _start(client, train_id, LONG)
    _training(client, long)

    with ThreadPoolExecutor(2) as pool:  # two stops at once
        first, second = pool.map(lambda _: client.post(f"/v1/jobs/{long}/stop"), range(2))
    for r in (first, second):
        assert r.status_code == 202 and r.json()["state"] in ("stopping", "stopped"), r.text
    wait_for(lambda: _state(client, long) == "stopped", timeout=60, what="stopped")
    again = client.post(f"/v1/jobs/{long}/stop")
    assert again.status_code == 202 and again.json()["state"] == "stopped", again.text

    wait_for(lambda: _state(client, short) in STABLE, timeout=120, what="the short job to finish")
    assert _state(client, short) == "completed"
    body = assert_problem(client.post(f"/v1/jobs/{short}/resume"), 409)
    assert body["state"] == "completed" and "start a new job" in body["detail"], body
    body = assert_problem(client.post(f"/v1/jobs/{short}/stop"), 409)
    assert body["state"] == "completed", body
    assert _settle(client, [short, long]) == {short: "completed", long: "stopped"}


def test_resume_right_after_stop_is_refused_until_stopped_then_continues(tmp_path, client_for, xmc_files):
    client = client_for(make_settings(tmp_path / "data"))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    job_id = _start(client, train_id, LONG)
    _training(client, job_id)

    assert client.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    r = client.post(f"/v1/jobs/{job_id}/resume")
    if r.status_code == 409:  # still writing its checkpoint
        body = assert_problem(r, 409)
        assert body["state"] == "stopping" and "once it is stopped" in body["detail"], body
        wait_for(lambda: _state(client, job_id) == "stopped", timeout=60, what="stopped")
        r = client.post(f"/v1/jobs/{job_id}/resume")
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running"), r.text
    body = assert_problem(client.post(f"/v1/jobs/{job_id}/resume"), 409)  # resume twice
    assert body["state"] in ("queued", "running"), body
    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["runs"] == 2 and _state(client, job_id) == "running",
        timeout=60,
        what="the second run",
    )
    assert client.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    assert _settle(client, [job_id]) == {job_id: "stopped"}


def test_stop_right_after_start(tmp_path, client_for, xmc_files):
    """Stopped while queued or being launched (no trainer yet), and while its trainer is starting up."""
    client = client_for(make_settings(tmp_path / "data"))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    ids = []
    for wait_for_running in (False, True):
        job_id = _start(client, train_id, LONG)
        if wait_for_running:
            wait_for(lambda job_id=job_id: _state(client, job_id) == "running", timeout=60, what="running")
        r = client.post(f"/v1/jobs/{job_id}/stop")
        assert r.status_code == 202 and r.json()["state"] in ("stopping", "stopped"), r.text
        ids.append(job_id)
    assert _settle(client, ids) == {j: "stopped" for j in ids}
    # Stopped before it trained or not, it resumes.
    assert client.post(f"/v1/jobs/{ids[0]}/resume").status_code == 202
    wait_for(lambda: _state(client, ids[0]) == "running", timeout=60, what="running again")
    assert client.post(f"/v1/jobs/{ids[0]}/stop").status_code == 202
    assert _settle(client, ids) == {j: "stopped" for j in ids}


def test_delete_a_running_job_and_one_just_started(tmp_path, client_for, xmc_files):
    settings = make_settings(tmp_path / "data")
    client = client_for(settings)
    db = client.app.state.services.db
    train_id = upload(client, xmc_files["train"]).json()["id"]

    def gone(job_id: str) -> None:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/metrics").status_code == 404
        assert client.post(f"/v1/models/{job_id}/predict", json=QUERY).status_code == 404
        assert not _trainers(job_id)  # killed before the delete answered
        assert not settings.job_dir(job_id).exists()
        with db.session() as s:
            for table in (MetricRow, ModelVersionRow):
                assert s.scalar(select(func.count()).select_from(table).where(table.job_id == job_id)) == 0

    running = _start(client, train_id, LONG)
    _training(client, running)
    pid = client.app.state.services.jobs.get(running).pid
    assert client.post(f"/v1/models/{running}/predict", json=QUERY).status_code == 200
    assert client.delete(f"/v1/jobs/{running}").status_code == 204
    assert not alive(pid)
    gone(running)

    for _ in range(3):  # racing the supervisor's launch of it
        job_id = _start(client, train_id, LONG)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        gone(job_id)

    _settle(client, [])
    assert client.delete(f"/v1/datasets/{train_id}").status_code == 204  # no job refers to it any more
