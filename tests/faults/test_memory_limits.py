"""Memory limits with a real server: what the machine cannot hold is refused or queued before a trainer starts, a
trainer that outgrows its estimate fails its own job cleanly, and a full data dir turns /readyz to 503.

Defined behaviour (README, "Failures"): a job whose estimate exceeds SLIDE_MAX_JOB_MEMORY is a 422 naming the
estimate, the limit and the fields that drive it, and nothing starts; jobs that fit alone but not together run one
after the other; a trainer past its ceiling (RLIMIT_DATA from its estimate) fails with `error` saying so, its last
snapshot keeps serving, resume continues from it, and neither the API process nor other jobs notice.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from engine import SlideConfig
from engine.memory import estimate_memory
from tests.app.helpers import assert_problem, merged, wait_for
from tests.e2e.server import Server
from tests.faults.conftest import descendants

MiB = 1 << 20
HOG_SEED = 4242  # app.services.worker.MEMORY_HOG_ENV: this seed's trainer allocates without bound (run 1 only)


def _upload(c: httpx.Client, path: Path, name: str) -> str:
    r = c.post("/v1/datasets", params={"name": name}, content=path.read_bytes(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _job(c: httpx.Client, job_id: str) -> dict:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _until(c: httpx.Client, job_id: str, *states: str, server: Server, timeout: float = 120) -> dict:
    def check():
        job = _job(c, job_id)
        return job if job["state"] in states else None

    return wait_for(check, timeout=timeout, what=f"job {job_id[:8]} in {states}", diagnose=server.log)


def _trainers(server: Server) -> set[int]:
    return descendants(server.pid)


def test_a_job_the_machine_cannot_hold_is_refused_at_once_and_starts_nothing(tmp_path, servers):
    server = servers(tmp_path / "data", SLIDE_MAX_JOB_MEMORY="2GiB")
    small = tmp_path / "small.txt"  # the data: 6 features, 3 labels
    small.write_text("4 6 3\n0 0:1 1:0.5\n1 2:1 3:0.5\n2 4:1 5:0.5\n0,2 0:0.3 5:0.2\n")
    with server.client() as c:
        train_id = _upload(c, small, "small")
        before = _trainers(server)
        for config, kind, field in [
            (
                {"model": {"hidden": [200_000_000]}},
                "validation-error",
                "body.config.model.hidden[0]",
            ),  # past the width bound
            (
                {"model": {"hidden": [60_000, 60_000]}},
                "memory-limit",
                "body.config.model.hidden",
            ),  # within bounds, 21.6 GB of weights
        ]:
            start = time.monotonic()
            r = c.post("/v1/jobs", json={"train_dataset_id": train_id, "config": config})
            elapsed = time.monotonic() - start
            p = assert_problem(r, 422)
            assert elapsed < 1.0, elapsed
            assert p["type"] == f"urn:slide:problem:{kind}" and p["field"] == field, p
        assert (
            p["estimated_memory_bytes"] > 20e9 and p["limit_bytes"] == 2 * 1024**3 and p["fields"][0] == "model.hidden"
        )
        assert "SLIDE_MAX_JOB_MEMORY" in p["detail"], p
        time.sleep(0.5)  # several supervisor passes (SLIDE_SUPERVISOR_POLL_S=0.1)
        assert c.get("/v1/jobs").json()["count"] == 0
        assert _trainers(server) == before, "a trainer process started"
        jobs_dir = tmp_path / "data" / "jobs"
        assert not jobs_dir.exists() or not any(jobs_dir.iterdir())


def test_jobs_that_fit_alone_but_not_together_run_one_after_the_other(tmp_path, servers, xmc_files, xmc_summaries):
    config = {"model": {"hidden": [64]}, "optimizer": {"batch_size": 64}, "schedule": {"epochs": 2}}
    # What one such job needs (the servers here train with SLIDE_TRAINER_THREADS=1); the server allows 1.5 of it.
    shape = xmc_summaries["train"]
    need = estimate_memory(
        SlideConfig.from_dict({**config, "threads": 1}),
        shape["num_points"],
        shape["num_features"],
        shape["num_labels"],
        nnz=shape["nnz"],
        label_entries=round(shape["avg_labels_per_point"] * shape["num_points"]),
        threads=1,
        spill=True,  # a job's trainer keeps its best model in its store's files
    ).total
    assert need > 150 * MiB
    server = servers(tmp_path / "data", SLIDE_MAX_CONCURRENT_JOBS=2, SLIDE_MAX_JOB_MEMORY=int(1.5 * need))
    with server.client() as c:
        train_id = _upload(c, xmc_files["train"], "train")
        first = c.post("/v1/jobs", json={"train_dataset_id": train_id, "config": {**config, "seed": 1}}).json()
        second = c.post("/v1/jobs", json={"train_dataset_id": train_id, "config": {**config, "seed": 2}}).json()
        assert first["estimated_memory_bytes"] == second["estimated_memory_bytes"] == need, (first, need)
        waiting = _job(c, second["id"])
        assert waiting["state"] == "queued" and waiting["queue_position"] == 1, waiting
        assert waiting["queue_reason"].startswith("waiting for memory"), waiting
        _until(c, first["id"], "running", server=server)
        assert _job(c, second["id"])["state"] == "queued"  # a slot is free, the memory is not
        a = _until(c, first["id"], "completed", "failed", server=server)
        b = _until(c, second["id"], "completed", "failed", server=server)
        assert a["state"] == b["state"] == "completed", (a, b)
        assert b["started_at"] >= a["finished_at"], (a, b)


def test_a_trainer_over_its_ceiling_fails_its_job_cleanly_and_nothing_else_notices(tmp_path, servers, xmc_files):
    server = servers(
        tmp_path / "data", SLIDE_MAX_CONCURRENT_JOBS=2, SLIDE_TEST_MEMORY_HOG_SEED=HOG_SEED, SLIDE_MAX_JOB_MEMORY="4GiB"
    )
    base = {"model": {"hidden": [32]}, "optimizer": {"batch_size": 64}}
    with server.client() as c:
        train_id = _upload(c, xmc_files["train"], "train")
        hog = c.post(
            "/v1/jobs",
            json={"train_dataset_id": train_id, "config": merged(base, {"schedule": {"epochs": 4}, "seed": HOG_SEED})},
        )
        other = c.post(
            "/v1/jobs",
            json={"train_dataset_id": train_id, "config": merged(base, {"schedule": {"epochs": 4}, "seed": 1})},
        )
        hog_id, other_id = hog.json()["id"], other.json()["id"]
        failed = _until(c, hog_id, "failed", "completed", server=server)
        assert failed["state"] == "failed", failed
        error = failed["error"]
        assert error.startswith("out of memory: the trainer reached its memory ceiling of"), error
        assert "RLIMIT_DATA" in error and "Resume the job" in error, error
        version = failed["model_version"]
        assert version and f"snapshot v{version} is intact" in error, error
        log = (tmp_path / "data" / "jobs" / hog_id / "trainer.log").read_text()
        assert "memory: estimate" in log and "MemoryError" in log, log[-2000:]
        assert "killed by SIGKILL" not in error  # the trainer reported it itself: no OOM killer

        # The API and the other job carry on; the failed job's last snapshot keeps serving.
        assert c.get("/readyz").status_code == 200
        pred = c.post(f"/v1/models/{hog_id}/predict", json={"instances": [{"indices": [1], "values": [1.0]}]})
        assert pred.status_code == 200 and pred.json()["model_version"] == version, pred.text
        done = _until(c, other_id, "completed", "failed", server=server)
        assert done["state"] == "completed" and done["error"] is None, done

        # Resume continues from that snapshot (the hook acts in a job's first run only) and completes.
        assert c.post(f"/v1/jobs/{hog_id}/resume").status_code == 202
        resumed = _until(c, hog_id, "completed", "failed", server=server)
        assert resumed["state"] == "completed" and resumed["runs"] == 2, resumed
        assert f"resumed from snapshot v{version} " in (tmp_path / "data" / "jobs" / hog_id / "trainer.log").read_text()
        assert server.proc.poll() is None


def test_a_full_data_dir_turns_readyz_to_503(tmp_path, servers):
    """The data dir's file system fills up (a file takes the space) past SLIDE_MIN_FREE_DISK: /readyz says so."""
    data = tmp_path / "data"
    data.mkdir()
    st = os.statvfs(data)
    free = st.f_bavail * st.f_frsize
    threshold = free - 2048 * MiB  # what is free now, less a margin for other writers on this (shared) machine
    server = servers(data, SLIDE_MIN_FREE_DISK=threshold)
    with server.client() as c:
        assert c.get("/readyz").status_code == 200
        filler = data / "filler.bin"
        with open(filler, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, 6144 * MiB)  # allocated at once, nothing written
        try:
            p = assert_problem(c.get("/readyz"), 503)
            assert "full (ENOSPC)" in p["checks"]["data_dir"] and "SLIDE_MIN_FREE_DISK" in p["detail"], p
        finally:
            filler.unlink()
        assert c.get("/readyz").status_code == 200
