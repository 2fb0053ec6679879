"""kill -9 of a job's trainer process mid-epoch: the job is marked failed with the reason, the model keeps answering
from its last snapshot meanwhile, and `resume` continues from that checkpoint: at most one snapshot interval of
steps is lost, and the job completes with one metric point per epoch."""

from __future__ import annotations

import itertools
import os
import re
import signal

from engine import SnapshotStore
from engine.snapshot import read_manifest
from tests.app.helpers import job_diagnosis, upload, wait_for
from tests.conftest import make_settings

CONFIG = {
    "model": {"hidden": [32]},
    "optimizer": {"batch_size": 64},
    "schedule": {"epochs": 80, "early_stop_patience": "never"},
    "seed": 5,
}
QUERY = {"instances": [{"indices": [4, 9], "values": [1.0, 0.5]}], "k": 5}


def _job(client, job_id):
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _version_steps(client, job_id) -> dict[int, int]:
    versions = client.get(f"/v1/models/{job_id}").json()["versions"]
    return {v["version"]: v["step"] for v in versions if v["step"] is not None}


def test_sigkilled_trainer_fails_serves_its_last_snapshot_and_resumes_from_it(tmp_path, client_for, xmc_files):
    settings = make_settings(tmp_path / "data", snapshot_interval_s=0.3)
    client = client_for(settings)
    services = client.app.state.services
    train_id = upload(client, xmc_files["train"]).json()["id"]
    job_id = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": CONFIG}).json()["id"]
    diagnose = job_diagnosis(client, settings, job_id)
    wait_for(
        lambda: (j := _job(client, job_id))["state"] == "running" and (j["model_version"] or 0) >= 3,
        timeout=120,
        what="three snapshots while running",
        diagnose=diagnose,
    )

    pid = services.jobs.get(job_id).pid
    assert pid and pid != os.getpid()
    os.kill(pid, signal.SIGSTOP)  # frozen mid-epoch: it can neither finish nor publish before the kill
    try:
        frozen = services.jobs.get(job_id)
        assert frozen.state == "running", diagnose()
        step_at_kill = frozen.step  # its last heartbeat: at most SLIDE_PROGRESS_INTERVAL_S behind the trainer
    finally:
        os.kill(pid, signal.SIGKILL)

    failed = wait_for(lambda: (j := _job(client, job_id))["state"] == "failed" and j, what="failed", diagnose=diagnose)
    assert "exited with code -9" in failed["error"] and "SIGKILL" in failed["error"], failed["error"]

    # What it left: complete versions only; the newest is the checkpoint a resume must continue from.
    store = SnapshotStore(settings.snapshots_dir(job_id))
    version, path = store.latest()
    checkpoint_step = read_manifest(path)["trainer_state"]["step"]
    steps = _version_steps(client, job_id)
    assert steps.setdefault(version, checkpoint_step) == checkpoint_step  # its row may not have been written
    gaps = [steps[b] - steps[a] for a, b in itertools.pairwise(sorted(steps))]
    assert gaps and min(gaps) > 0, steps
    # The steps lost: less than one snapshot interval's worth (the heartbeat lags the trainer, never leads it).
    assert step_at_kill - checkpoint_step <= max(gaps), (step_at_kill, steps)

    # While it is down, the model answers from that snapshot. (The job's model_version, from the database, can be
    # one behind when the kill fell between a publication and its row.)
    assert failed["model_version"] in (version, version - 1)
    for _ in range(3):
        pred = client.post(f"/v1/models/{job_id}/predict", json=QUERY)
        assert pred.status_code == 200, pred.text
        assert pred.json()["model_version"] == version

    # A publication the kill cut short would leave a temp dir; the next trainer removes it.
    leftover = store.root / ".publish-cut-short"
    leftover.mkdir()
    (leftover / "w0.npy").write_bytes(b"\x93NUMPY half")

    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    done = wait_for(
        lambda: (j := _job(client, job_id))["state"] in ("completed", "failed") and j,
        timeout=180,
        what="completed",
        diagnose=diagnose,
    )
    assert done["state"] == "completed", done["error"]
    assert done["runs"] == 2 and done["error"] is None and done["progress"]["epoch"] == CONFIG["schedule"]["epochs"]
    assert done["model_version"] > version
    assert not leftover.exists()

    # It continued from the newest checkpoint, not from an older one or from scratch.
    log = (settings.job_dir(job_id) / "trainer.log").read_text()
    assert re.findall(r"resumed from snapshot v(\d+) at step (\d+)", log) == [(str(version), str(checkpoint_step))]
    after = _version_steps(client, job_id)
    later = [after[v] for v in sorted(after) if v > version]
    assert later and later == sorted(later) and later[0] > checkpoint_step, after
    metric_steps = [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
    assert (
        metric_steps == sorted(set(metric_steps)) and len(metric_steps) == CONFIG["schedule"]["epochs"]
    )  # once per epoch


def test_resume_forgets_the_metrics_it_will_report_again(tmp_path):
    """A checkpoint taken on an epoch's last batch comes before that epoch's report at the same step: a trainer
    killed after the report resumes at that step and reports it again, so the old point must go with the newer
    ones (or the series has that step twice)."""
    from sqlalchemy import select

    from app.db import Database, JobRow, MetricRow
    from app.domain import JobSpec
    from app.services.worker import JobProcess

    db = Database(f"sqlite:///{tmp_path / 'slide.db'}")
    db.create_schema()
    with db.session() as s:
        s.add(JobRow(id="j", train_dataset_id="d", config={}, state="running", runs=1))
        for step, epoch in [(32, 1), (50, 1), (64, 2), (80, 2)]:  # 32 batches per epoch; 50: a stop mid-epoch
            s.add(MetricRow(job_id="j", step=step, epoch=epoch, samples=step * 64))
    spec = JobSpec(
        job_id="j",
        job_dir=str(tmp_path / "j"),
        snapshots_dir=str(tmp_path / "j" / "snapshots"),
        train_path=str(tmp_path / "no-dataset"),
        eval_path=None,
        config={},
        database_url=db.url,
        snapshot_interval_s=30.0,
        snapshot_keep=3,
        trainer_threads=0,
        nice=0,
        progress_interval_s=1.0,
        parent_pid=os.getpid(),
        run=1,
    )
    worker = JobProcess(spec, None, None, None, None)
    worker._forget_beyond(64, 1, [])  # checkpoint: step 64, still epoch 1 (its last batch done, not reported)
    worker.db.dispose()
    with db.session() as s:
        assert [(m.step, m.epoch) for m in s.scalars(select(MetricRow).order_by(MetricRow.step))] == [(32, 1), (50, 1)]
    db.dispose()
