"""A full or unwritable data dir, during an upload and during a snapshot: a clear error, nothing corrupt.

The faults are real OS errors where the machine allows it without privileges: a file size limit (RLIMIT_FSIZE,
with SIGXFSZ ignored) makes writes past the limit fail with EFBIG, for a server process (uploads) or, applied
with prlimit(2) while it runs, for a trainer process (snapshots); SQLite's query_only refuses database writes.
ENOSPC, EDQUOT, EROFS and EACCES cannot be produced that way without a mount of our own, so a second layer raises
them from numpy.save.

Defined behaviour (README, "Failures"): an upload that cannot be stored is a 507 problem+json naming the errno,
with no dataset dir and no database row left; a snapshot that cannot be written fails the job with a reason that
says so, the previous snapshot stays intact and keeps serving, and `resume` continues from it.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event, text

from engine import SnapshotStore, load_model
from tests.app.helpers import assert_problem, job_diagnosis, upload, wait_for
from tests.conftest import make_settings

MiB = 1 << 20


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes in any file fail with EFBIG (instead of killing the process)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _big_xmc(path: Path, points: int = 3000, per_point: int = 100, features: int = 5000, labels: int = 100) -> Path:
    """An XMC file whose feature arrays (points * per_point int32/float32 values) are over 1 MiB each."""
    rng = np.random.default_rng(3)
    lines = [f"{points} {features} {labels}"]
    for _ in range(points):
        feats = np.sort(rng.choice(features, size=per_point, replace=False))
        ys = ",".join(map(str, sorted(rng.choice(labels, size=2, replace=False))))
        lines.append(ys + " " + " ".join(f"{f}:{v:.3f}" for f, v in zip(feats, rng.random(per_point), strict=True)))
    path.write_text("\n".join(lines) + "\n")
    return path


def _dataset_entries(data: Path) -> list[str]:
    d = data / "datasets"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _assert_storage_problem(r, reason: str) -> dict:
    body = assert_problem(r, 507)
    assert body["type"] == "urn:slide:problem:insufficient-storage" and body["reason"] == reason, body
    assert reason in body["detail"] and "nothing was kept" in body["detail"], body
    return body


# ------------------------------------------------------------------------------------------------------ uploads


def test_upload_past_the_file_size_limit_is_507_and_leaves_nothing(tmp_path, servers, xmc_files):
    data = tmp_path / "data"
    big = _big_xmc(tmp_path / "big.txt")
    server = servers(data, preexec_fn=_file_size_limit(1 * MiB))
    c = server.client(timeout=60)
    small = c.post(
        "/v1/datasets",
        params={"name": "small"},
        content=xmc_files["test"].read_bytes(),
        headers={"Content-Type": "text/plain"},
    )
    assert small.status_code == 201, small.text
    listed, entries = c.get("/v1/datasets").json(), _dataset_entries(data)
    assert entries == [small.json()["id"]]

    r = c.post("/v1/datasets", params={"name": "big"}, content=big.read_bytes(), headers={"Content-Type": "text/plain"})
    _assert_storage_problem(r, "EFBIG")
    assert c.get("/v1/datasets").json() == listed  # no row
    assert _dataset_entries(data) == entries  # no dataset dir, no temp dir
    # The service is still healthy and takes what fits.
    assert c.get("/readyz").status_code == 200
    again = c.post(
        "/v1/datasets",
        params={"name": "small-2"},
        content=xmc_files["test"].read_bytes(),
        headers={"Content-Type": "text/plain"},
    )
    assert again.status_code == 201, again.text


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES], ids=lambda c: errno.errorcode[c]
)
def test_upload_storage_errors_are_507_and_leave_nothing(tmp_path, client_for, xmc_files, monkeypatch, code):
    """Second layer: the errno a full disk, a quota, a read-only mount or lost permissions would give, raised from
    numpy.save once the save has written part of the dataset."""
    settings = make_settings(tmp_path / "data")
    client = client_for(settings)
    before = client.get("/v1/datasets").json()
    real_save, calls = np.save, []

    def failing_save(file, arr, *args, **kwargs):
        calls.append(file)
        if len(calls) == 1:
            return real_save(file, arr, *args, **kwargs)
        raise OSError(code, f"simulated: {errno.errorcode[code]}", str(file))

    monkeypatch.setattr(np, "save", failing_save)
    _assert_storage_problem(upload(client, xmc_files["test"]), errno.errorcode[code])
    assert len(calls) == 2  # it failed part-way through the dataset's files
    assert client.get("/v1/datasets").json() == before
    assert _dataset_entries(settings.data_dir) == []


def test_upload_when_the_database_cannot_be_written_is_507_and_leaves_nothing(tmp_path, client_for, xmc_files):
    """The arrays are saved, then the row cannot be inserted (SQLite refuses writes: SQLITE_READONLY, as on a
    read-only mount): the saved arrays are removed again."""
    settings = make_settings(tmp_path / "data")
    client = client_for(settings)
    db = client.app.state.services.db
    before = client.get("/v1/datasets").json()

    def read_only(dbapi_connection, _record) -> None:
        dbapi_connection.execute("PRAGMA query_only = ON")

    event.listen(db.engine, "connect", read_only)
    db.engine.dispose()
    try:
        _assert_storage_problem(upload(client, xmc_files["train"]), "SQLITE_READONLY")
    finally:
        event.remove(db.engine, "connect", read_only)
        db.engine.dispose()
    assert client.get("/v1/datasets").json() == before
    assert _dataset_entries(settings.data_dir) == []
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM datasets")).scalar() == 0
    assert upload(client, xmc_files["train"]).status_code == 201


# ---------------------------------------------------------------------------------------------------- snapshots


def test_snapshot_past_the_file_size_limit_fails_the_job_keeps_the_previous_and_resumes(
    tmp_path, client_for, xmc_files
):
    # hash_k=16 makes each table's bucket offsets 2^16 + 1 int64s: a 10 MiB array in every snapshot (the output
    # layer must be sampled to have tables: sample_output auto trains these 500 labels densely).
    config = {
        "model": {"sample_output": True, "hidden": [32]},
        "sampling": {"hash_k": 16, "hash_l": 20},
        "optimizer": {"batch_size": 64},
        "schedule": {"epochs": 60, "early_stop_patience": "never"},
        "seed": 3,
    }
    settings = make_settings(tmp_path / "data")
    client = client_for(settings)
    services = client.app.state.services
    train_id = upload(client, xmc_files["train"]).json()["id"]
    job_id = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": config}).json()["id"]
    diagnose = job_diagnosis(client, settings, job_id)
    wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and (j["model_version"] or 0) >= 1,
        timeout=120,
        what="a snapshot while running",
        diagnose=diagnose,
    )

    pid = services.jobs.get(job_id).pid
    store = SnapshotStore(settings.snapshots_dir(job_id))
    biggest = max(f.stat().st_size for f in store.latest()[1].iterdir())
    # Past the database's WAL and the trainer's log (which it must still write), short of the snapshot's largest.
    others = [
        settings.data_dir / "slide.db-wal",
        settings.data_dir / "slide.db",
        settings.job_dir(job_id) / "trainer.log",
    ]
    limit = max(4 * MiB, 2 * max(p.stat().st_size for p in others if p.exists()))
    assert limit < biggest, (limit, biggest)
    os.kill(pid, signal.SIGSTOP)  # it cannot finish between our look and the limit
    try:
        assert services.jobs.get(job_id).state == "running", diagnose()
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ
    finally:
        os.kill(pid, signal.SIGCONT)

    failed = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("failed", "completed") and j,
        timeout=120,
        what="the job to fail",
        diagnose=diagnose,
    )
    assert failed["state"] == "failed", failed
    error = failed["error"]
    assert error.startswith("storage error: EFBIG") and "resume the job" in error, error
    version = failed["model_version"]
    assert f"snapshot v{version} is intact" in error, error

    # The failed publication left nothing; every version there is complete and passes its checksums.
    assert not list(store.root.glob(".publish-*"))
    assert store.latest()[0] == version
    for v in store.versions():
        load_model(store.path(v), verify=True)
    pred = client.post(f"/v1/models/{job_id}/predict", json={"instances": [{"indices": [1], "values": [1.0]}]})
    assert pred.status_code == 200 and pred.json()["model_version"] == version, pred.text

    # Space is back (a new trainer process has no limit): resume continues from that snapshot and completes.
    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    done = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("failed", "completed") and j,
        timeout=120,
        what="completed after resume",
        diagnose=diagnose,
    )
    assert done["state"] == "completed" and done["error"] is None, done
    assert done["model_version"] > version
    assert f"resumed from snapshot v{version} " in (settings.job_dir(job_id) / "trainer.log").read_text()


# ---------------------------------------------------------------------------------------- the error's wording


def _raised_from(cause: BaseException) -> RuntimeError:
    exc = RuntimeError("could not publish")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc,reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "ENOSPC"),
        (_raised_from(OSError(errno.EDQUOT, "Disk quota exceeded")), "EDQUOT"),
        (OSError(errno.EROFS, "Read-only file system"), "EROFS"),
        (PermissionError(errno.EACCES, "Permission denied"), "EACCES"),
        (OSError("300000 requested and 262112 written"), "ENOSPC"),  # numpy's short write; no file size limit here
        (_raised_from(ValueError("not storage")), None),
        (OSError(errno.ENOENT, "No such file or directory"), None),
        (ValueError("bad"), None),
    ],
    ids=lambda v: v if isinstance(v, (str, type(None))) else type(v).__name__,
)
def test_storage_faults_are_told_from_other_errors(tmp_path, exc, reason):
    from app.domain import JobSpec
    from app.services.errors import storage_cause
    from app.services.worker import JobProcess

    cause = storage_cause(exc)
    assert (cause[0] if cause else None) == reason
    # A trainer's job error says what failed, which snapshot is intact, and what to do.
    store = SnapshotStore(tmp_path / "snapshots")
    store.publish({"w0": np.zeros(3, dtype=np.float32)}, {})
    spec = JobSpec(
        job_id="j",
        job_dir=str(tmp_path),
        snapshots_dir=str(store.root),
        train_path=str(tmp_path / "no-dataset"),
        eval_path=None,
        config={},
        database_url=f"sqlite:///{tmp_path / 'x.db'}",
        snapshot_interval_s=30.0,
        snapshot_keep=3,
        trainer_threads=0,
        nice=0,
        progress_interval_s=1.0,
        parent_pid=os.getpid(),
        run=1,
    )
    worker = JobProcess(spec, None, None, None, None)
    message = worker._failure_message(exc)
    worker.db.dispose()
    if reason is None:
        assert message == f"{type(exc).__name__}: {exc}"
    else:
        assert message.startswith(f"storage error: {reason} (") and "snapshot v1 is intact" in message, message
        assert "resume the job" in message
