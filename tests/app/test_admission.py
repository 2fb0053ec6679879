"""Memory admission and bounded requests, in process: a job over SLIDE_MAX_JOB_MEMORY is a 422 naming its estimate,
the limit and the fields that drive it, at creation and at resume; a bound broken is a 422 naming the field before
any estimate; queued jobs say why they wait; ids of the wrong format are a 404 on every backend; predict on a
model that will never have a snapshot is a 409; /readyz names a full or read-only data dir."""

from __future__ import annotations

import os
from types import SimpleNamespace

from sqlalchemy import update

from app.db import JobRow
from app.services import admission
from engine import ModelConfig, SlideConfig
from engine.memory import estimate_memory
from tests.app.helpers import assert_problem, job_diagnosis, merged, upload, wait_for
from tests.conftest import make_settings

GiB = 1 << 30
FAST = {"model": {"hidden": [32]}, "optimizer": {"batch_size": 64}, "seed": 3}


def _small_dataset(tmp_path):
    """6 features, 3 labels: the data of the issue's 200,000,000-wide job."""
    path = tmp_path / "small.txt"
    rows = ["0 0:1.0 1:0.5", "1 2:1.0 3:0.5", "2 4:1.0 5:0.5", "0,1 0:0.3 5:0.2"] * 5
    path.write_text(f"{len(rows)} 6 3\n" + "\n".join(rows) + "\n")
    return path


def test_a_job_over_the_limit_is_422_naming_estimate_limit_and_fields(tmp_path, client_for):
    settings = make_settings(tmp_path / "data", max_job_memory=GiB)
    client = client_for(settings)
    train = upload(client, _small_dataset(tmp_path)).json()
    r = client.post("/v1/jobs", json={"train_dataset_id": train["id"], "config": {"model": {"hidden": [30000, 30000]}}})
    p = assert_problem(r, 422)
    assert p["type"] == "urn:slide:problem:memory-limit", p
    expected = estimate_memory(
        SlideConfig(model=ModelConfig(hidden=(30000, 30000))), 20, 6, 3, nnz=40, label_entries=25, threads=1, spill=True
    )  # SLIDE_TRAINER_THREADS=1 in tests: a pool of one thread
    assert p["estimated_memory_bytes"] == expected.total > p["limit_bytes"] == GiB
    assert p["fields"][0] == "model.hidden" and p["field"] == "body.config.model.hidden", p
    assert p["memory_breakdown"]["weights"] == expected.parts["weights"]
    assert "SLIDE_MAX_JOB_MEMORY" in p["detail"] and "hidden=[30000, 30000]" in p["detail"], p["detail"]
    assert client.get("/v1/jobs").json()["count"] == 0
    assert not settings.jobs_dir.exists() or not any(settings.jobs_dir.iterdir())

    ok = client.post(
        "/v1/jobs", json={"train_dataset_id": train["id"], "config": merged(FAST, {"schedule": {"epochs": 1}})}
    )
    assert ok.status_code == 201, ok.text
    body = ok.json()
    cfg = SlideConfig.from_dict(merged(FAST, {"schedule": {"epochs": 1}, "threads": 1}))
    assert (
        body["estimated_memory_bytes"]
        == estimate_memory(cfg, 20, 6, 3, nnz=40, label_entries=25, threads=1, spill=True).total
    )
    assert sum(body["memory_breakdown"].values()) == body["estimated_memory_bytes"]


def test_a_broken_bound_is_422_naming_the_field_before_any_estimate(tmp_path, client_for, monkeypatch):
    client = client_for(make_settings(tmp_path / "data"))
    train = upload(client, _small_dataset(tmp_path)).json()

    def no_estimate(*args, **kwargs):
        raise AssertionError("estimated a request that breaks a bound")

    monkeypatch.setattr(admission, "estimate_job", no_estimate)
    for config, field in [
        ({"model": {"hidden": [200_000_000]}}, "body.config.model.hidden[0]"),
        ({"model": {"hidden": [8] * 9}}, "body.config.model.hidden"),
        ({"schedule": {"epochs": 10**9}}, "body.config.schedule.epochs"),
        ({"sampling": {"bucket_size": 2**20 + 1}}, "body.config.sampling.bucket_size"),
        ({"sampling": {"hash_l": 5000}}, "body.config.sampling.hash_l"),
        ({"optimizer": {"batch_size": 10**7}}, "body.config.optimizer.batch_size"),
        ({"optimizer": {"lr": 5.0}}, "body.config.optimizer.lr"),
    ]:
        p = assert_problem(client.post("/v1/jobs", json={"train_dataset_id": train["id"], "config": config}), 422)
        assert p["field"] == field, p
    assert client.get("/v1/jobs").json()["count"] == 0


def test_resume_is_checked_against_the_limit_too(tmp_path, client_for, xmc_files):
    data = tmp_path / "data"
    client = client_for(make_settings(data, max_concurrent_jobs=1))
    train = upload(client, xmc_files["train"]).json()
    first = client.post(
        "/v1/jobs", json={"train_dataset_id": train["id"], "config": merged(FAST, {"schedule": {"epochs": 500}})}
    ).json()
    second = client.post("/v1/jobs", json={"train_dataset_id": train["id"], "config": FAST}).json()
    assert second["state"] == "queued" and second["queue_position"] >= 1 and second["queue_reason"], second
    assert client.post(f"/v1/jobs/{second['id']}/stop").json()["state"] == "stopped"
    # It never trained and nothing will train it: predict says so instead of "retry later".
    p = assert_problem(
        client.post(f"/v1/models/{second['id']}/predict", json={"instances": [{"indices": [1], "values": [1.0]}]}),
        409,
    )
    assert "resume" in p["detail"] and "Retry-After" not in p
    client.post(f"/v1/jobs/{first['id']}/stop")
    wait_for(
        lambda: client.get(f"/v1/jobs/{first['id']}").json()["state"] == "stopped",
        timeout=120,
        diagnose=job_diagnosis(client, client.app.state.services.settings, first["id"]),
    )
    client.__exit__(None, None, None)

    # The service comes back with a lower limit: neither job fits any more.
    estimate = second["estimated_memory_bytes"]
    small = client_for(make_settings(data, max_job_memory=estimate // 2))
    for job in (first, second):
        p = assert_problem(small.post(f"/v1/jobs/{job['id']}/resume"), 422)
        assert p["type"] == "urn:slide:problem:memory-limit" and p["limit_bytes"] == estimate // 2, p
        assert small.get(f"/v1/jobs/{job['id']}").json()["state"] == "stopped"
    # A job queued by other means (an automatic resume) is failed by the supervisor, saying why.
    with small.app.state.services.db.session() as s:
        s.execute(update(JobRow).where(JobRow.id == second["id"]).values(state="queued"))
    small.app.state.services.supervisor.wake()
    job = wait_for(lambda: (j := small.get(f"/v1/jobs/{second['id']}").json())["state"] == "failed" and j, timeout=30)
    assert "SLIDE_MAX_JOB_MEMORY" in job["error"] and job["runs"] == 0, job


def test_malformed_ids_are_404_without_reaching_the_database(client, monkeypatch):
    db = client.app.state.services.db
    real = db.session

    def guarded():
        raise AssertionError("a malformed id reached the database")

    monkeypatch.setattr(db, "session", guarded)
    for bad in ("nope", "a" * 31, "A" * 32, "0" * 31 + "\x00", "x" * 5000, "0" * 31 + "é"):
        quoted = bad.replace("\x00", "%00")
        for method, url in [
            ("GET", f"/v1/jobs/{quoted}"),
            ("POST", f"/v1/jobs/{quoted}/stop"),
            ("POST", f"/v1/jobs/{quoted}/resume"),
            ("DELETE", f"/v1/jobs/{quoted}"),
            ("GET", f"/v1/jobs/{quoted}/metrics"),
            ("GET", f"/v1/datasets/{quoted}"),
            ("DELETE", f"/v1/datasets/{quoted}"),
            ("GET", f"/v1/models/{quoted}"),
        ]:
            p = assert_problem(client.request(method, url), 404)
            assert p["type"] == "urn:slide:problem:not-found", (url, p)
    monkeypatch.setattr(db, "session", real)


def test_readyz_names_a_full_or_read_only_data_dir(client, monkeypatch):
    import app.api.health as health

    assert client.get("/readyz").status_code == 200
    real = os.statvfs

    def statvfs(free_blocks, flag=0):
        def fake(path):
            st = real(path)
            return SimpleNamespace(f_bavail=free_blocks, f_frsize=st.f_frsize, f_flag=st.f_flag | flag)

        return fake

    monkeypatch.setattr(health.os, "statvfs", statvfs(0))
    p = assert_problem(client.get("/readyz"), 503)
    assert "data_dir" in p["detail"] and "full (ENOSPC)" in p["checks"]["data_dir"], p
    monkeypatch.setattr(health.os, "statvfs", statvfs(10**9, os.ST_RDONLY))
    p = assert_problem(client.get("/readyz"), 503)
    assert "read-only (EROFS)" in p["checks"]["data_dir"], p
    monkeypatch.setattr(health.os, "statvfs", real)
    assert client.get("/readyz").status_code == 200
