"""Labels added and retired online, and fine-tuning with init_from, over HTTP (in-process app, real trainers)."""

from __future__ import annotations

import json
import time

import pytest

from engine import SnapshotStore
from tests.app.helpers import assert_problem, copy_trained, job_diagnosis, merged, upload, wait_for
from tests.app.test_text_api import TEXT_CONFIG, post_jsonl
from tests.engine.test_text import WORDS, jsonl_bytes, text_records

pytestmark = pytest.mark.slow  # each test trains jobs in trainer processes


def _words(label: int, n: int = 4, shift: int = 0) -> str:
    return " ".join(WORDS[5 * label + (i + shift) % 5] for i in range(n))


def _predict(client, job_id, text, k=5, mode="auto"):
    r = client.post(f"/v1/models/{job_id}/predict", json={"instances": [{"text": text}], "k": k, "mode": mode})
    assert r.status_code == 200, r.text
    return r.json()


def _all_labels(client, job_id) -> list[dict]:
    out, cursor = [], None
    while True:
        params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/models/{job_id}/labels", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["count"] == len(body["data"]) <= 5
        out += body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def test_add_retire_list_and_survive_a_restart(client_for, settings, trained_text):
    job_id = copy_trained(trained_text, settings).job_id
    client = client_for(settings)
    before = client.get(f"/v1/jobs/{job_id}").json()["model_version"]

    examples = [{"text": _words(3, shift=s)} for s in range(5)]
    r = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "combo", "examples": examples}]})
    assert r.status_code == 201, r.text
    assert r.json()["label_ids"] == [12] and r.json()["model_version"] > before and r.json()["state"] == "applied"
    answer = _predict(client, job_id, _words(3), k=3)
    assert answer["model_version"] == r.json()["model_version"]  # the very next request
    assert "combo" in answer["predictions"][0]["names"]
    for mode in ("exact", "lsh"):
        assert 12 in _predict(client, job_id, _words(3), k=3, mode=mode)["predictions"][0]["labels"]

    # a name in use: 409; no examples: 422; an unknown model: 404 (all problem+json)
    dup = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "combo", "examples": examples}]})
    assert "combo" in assert_problem(dup, 409)["detail"]
    old = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "label é0", "examples": examples}]})
    assert_problem(old, 409)
    empty = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "x", "examples": []}]})
    assert_problem(empty, 422)
    assert_problem(
        client.post(f"/v1/models/{'0' * 32}/labels", json={"labels": [{"name": "y", "examples": examples}]}), 404
    )

    # retire label 3: never predicted again in any mode; listed as retired
    name3 = _all_labels(client, job_id)[3]["name"]
    assert client.delete(f"/v1/models/{job_id}/labels/3").status_code == 204
    assert client.delete(f"/v1/models/{job_id}/labels/3").status_code == 204  # already retired: nothing to do
    assert_problem(client.delete(f"/v1/models/{job_id}/labels/99"), 404)
    for mode in ("exact", "lsh", "auto"):
        assert 3 not in _predict(client, job_id, _words(3), k=13, mode=mode)["predictions"][0]["labels"]
    listed = _all_labels(client, job_id)
    assert [x["id"] for x in listed] == list(range(13))
    assert listed[12] == {"id": 12, "name": "combo", "status": "live"}
    assert listed[3]["status"] == "retired" and listed[3]["name"] == name3
    assert sum(x["status"] == "retired" for x in listed) == 1

    # a restarted service serves the same labels
    client.close()
    again = client_for(settings)
    assert _all_labels(again, job_id) == listed
    answer = _predict(again, job_id, _words(3), k=13, mode="exact")["predictions"][0]
    assert 3 not in answer["labels"] and "combo" in answer["names"]


def test_a_full_chain_of_deltas_is_compacted_after_the_answer_under_the_same_version(
    client_for, settings, monkeypatch, trained_text
):
    from engine import delta
    from engine.snapshot import read_manifest

    monkeypatch.setattr(delta, "MAX_DEPTH", 2)
    job_id = copy_trained(trained_text, settings).job_id
    client = client_for(settings)
    store = SnapshotStore(settings.snapshots_dir(job_id))
    versions = []
    for i in range(3):
        examples = [{"text": _words(i, shift=s)} for s in range(3)]
        r = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": f"new{i}", "examples": examples}]})
        assert r.status_code == 201, r.text
        versions.append(r.json()["model_version"])
        manifest = read_manifest(store.path(versions[-1]))
        edit = manifest.get("delta") or manifest["compacted"]["delta"]  # (compacted already, for the second)
        assert edit["depth"] == (i % 2) + 1  # every edit a delta
        if i == 1:  # the chain is full: rewritten as a full version under its own number, apart from the edit
            wait_for(lambda: "delta" not in read_manifest(store.path(versions[-1])), what="the compaction")
            assert store.latest()[0] == versions[-1]
            assert read_manifest(store.path(versions[-1]))["compacted"]["delta"]["depth"] == 2
        assert _predict(client, job_id, _words(i))["model_version"] == versions[-1]
        labels = client.get(f"/v1/models/{job_id}/labels", params={"limit": 20}).json()
        assert labels["model_version"] == versions[-1] and labels["data"][-1]["name"] == f"new{i}"
    assert versions[2] == versions[1] + 1
    assert read_manifest(store.path(versions[2]))["delta"]["parent"] == versions[1]
    assert [x["name"] for x in _all_labels(client, job_id)][-3:] == ["new0", "new1", "new2"]
    # a restarted service serves the same, from disk
    client.close()
    again = client_for(settings)
    assert _predict(again, job_id, _words(2))["model_version"] == versions[2]
    assert [x["name"] for x in _all_labels(again, job_id)][-3:] == ["new0", "new1", "new2"]


def _long_job_with_a_snapshot(client, settings, xmc_files, seed: int):
    """A job far from its end (200 epochs, no early stop) once it has published a snapshot: (id, diagnose)."""
    train_id = upload(client, xmc_files["train"]).json()["id"]
    config = {
        "model": {"hidden": [32]},
        "optimizer": {"batch_size": 64},
        "schedule": {"epochs": 200, "early_stop_patience": "never"},
        "seed": seed,
    }
    job_id = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": config}).json()["id"]
    diagnose = job_diagnosis(client, settings, job_id)
    wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and j["model_version"],
        timeout=120,
        what="a snapshot while running",
        diagnose=diagnose,
    )
    return job_id, diagnose


def test_labels_handed_to_a_training_job_survive_kill_and_resume(client_for, settings, xmc_files):
    import os
    import signal

    client = client_for(settings)
    job_id, diagnose = _long_job_with_a_snapshot(client, settings, xmc_files, seed=5)
    num_labels = client.get(f"/v1/models/{job_id}").json()["num_labels"]
    examples = [{"indices": [4, 9, 17], "values": [1.0, 0.5, 0.25]}, {"indices": [4, 11], "values": [1.0, 1.0]}]
    r = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "fresh", "examples": examples}]})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "pending" and r.json()["request_id"]
    assert client.delete(f"/v1/models/{job_id}/labels/0").status_code == 202
    events = settings.job_dir(job_id) / "label-events.jsonl"
    applied = wait_for(
        lambda: (
            events.exists() and len(lines := events.read_text().splitlines()) >= 2 and [json.loads(x) for x in lines]
        ),
        timeout=60,
        what="the trainer to apply both requests",
        diagnose=diagnose,
    )
    assert applied[0]["request_id"] == r.json()["request_id"] and applied[0]["label_ids"] == [num_labels]
    assert applied[1]["op"] == "retire" and applied[1]["label_ids"] == [0]
    version = applied[1]["model_version"]
    wait_for(
        lambda: client.get(f"/v1/models/{job_id}/labels", params={"cursor": None}).json()["model_version"] >= version
    )

    # kill -9 the trainer, resume: the labels are in the snapshot it continues from and in every later one
    pid = client.app.state.services.jobs.get(job_id).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "failed", what="failed", diagnose=diagnose)
    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    newest = SnapshotStore(settings.snapshots_dir(job_id)).latest()[0]
    wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and j["model_version"] > newest,
        timeout=120,
        what="a snapshot of the resumed trainer",
        diagnose=diagnose,
    )
    listed = _all_labels(client, job_id)
    assert len(listed) == num_labels + 1 and listed[-1]["name"] == "fresh" and listed[0]["status"] == "retired"
    query = {"instances": examples, "k": 20, "mode": "exact"}
    labels = client.post(f"/v1/models/{job_id}/predict", json=query).json()["predictions"]
    assert all(0 not in p["labels"] for p in labels)
    client.post(f"/v1/jobs/{job_id}/stop")
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "stopped", what="stopped")


def test_requests_a_killed_trainer_never_saw_are_pending_then_applied_once_it_is_reaped(
    client_for, settings, xmc_files
):
    import os
    import signal

    client = client_for(settings)
    job_id, diagnose = _long_job_with_a_snapshot(client, settings, xmc_files, seed=7)
    num_labels = client.get(f"/v1/models/{job_id}").json()["num_labels"]
    pid = client.app.state.services.jobs.get(job_id).pid
    os.kill(pid, signal.SIGSTOP)  # frozen: it never looks at its label requests again
    try:
        examples = [{"indices": [4, 9, 17], "values": [1.0, 0.5, 0.25]}, {"indices": [4, 11], "values": [1.0, 1.0]}]
        r = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "fresh", "examples": examples}]})
        assert r.status_code == 202, r.text
        assert client.delete(f"/v1/models/{job_id}/labels/0").status_code == 202
        listed = client.get(f"/v1/models/{job_id}/labels").json()
        pending = listed["pending"]
        added = (r.json()["request_id"], "add", ["fresh"])
        assert [(p["request_id"], p["op"], p["names"]) for p in pending[:1]] == [added]
        assert [(p["op"], p["label_ids"]) for p in pending[1:]] == [("retire", [0])]
        assert listed["data"][0] == {**listed["data"][0], "id": 0, "status": "live"}  # not retired yet
        served = listed["model_version"]
    finally:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "failed", what="failed", diagnose=diagnose)

    # the service applies both to the newest version once the supervisor has reaped the trainer, as it would have
    events = _label_events(settings, job_id, 2, timeout=60, diagnose=diagnose)
    assert [e["request_id"] for e in events] == [p["request_id"] for p in pending]
    assert events[0]["label_ids"] == [num_labels] and events[1]["label_ids"] == [0]
    assert served < events[0]["model_version"] < events[1]["model_version"]
    body = client.get(f"/v1/models/{job_id}/labels").json()
    assert body["pending"] == [] and body["model_version"] == events[1]["model_version"]
    listed = _all_labels(client, job_id)
    assert len(listed) == num_labels + 1 and listed[-1]["name"] == "fresh" and listed[0]["status"] == "retired"
    query = {"instances": examples, "k": 20, "mode": "exact"}
    answer = client.post(f"/v1/models/{job_id}/predict", json=query).json()
    assert answer["model_version"] == events[1]["model_version"]
    assert all(0 not in p["labels"] for p in answer["predictions"])


def test_labels_added_as_deltas_to_a_stopped_job_survive_resume_and_kill(client_for, settings, xmc_files):
    import os
    import signal

    from engine.snapshot import read_manifest

    client = client_for(settings)
    job_id, diagnose = _long_job_with_a_snapshot(client, settings, xmc_files, seed=6)
    client.post(f"/v1/jobs/{job_id}/stop")
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "stopped", what="stopped", diagnose=diagnose)

    # no trainer: both edits are delta versions, served from the next request
    num_labels = client.get(f"/v1/models/{job_id}").json()["num_labels"]
    examples = [{"indices": [4, 9, 17], "values": [1.0, 0.5, 0.25]}, {"indices": [4, 11], "values": [1.0, 1.0]}]
    r = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "fresh", "examples": examples}]})
    assert r.status_code == 201 and r.json()["label_ids"] == [num_labels], r.text
    assert client.delete(f"/v1/models/{job_id}/labels/0").status_code == 204
    store = SnapshotStore(settings.snapshots_dir(job_id))
    assert read_manifest(store.latest()[1])["delta"]["depth"] == 2
    query = {"instances": examples, "k": 20, "mode": "exact"}

    def check() -> list[dict]:
        listed = _all_labels(client, job_id)
        assert len(listed) == num_labels + 1 and listed[-1]["name"] == "fresh" and listed[0]["status"] == "retired"
        labels = client.post(f"/v1/models/{job_id}/predict", json=query).json()["predictions"]
        assert all(0 not in p["labels"] for p in labels)
        return labels

    # imprinted from these examples (training, which never sees the label on a point, may push it down later)
    assert any(num_labels in p["labels"] for p in check())
    # the trainer resumes from the delta version and writes full versions; killed -9 and resumed, it keeps both
    for kill in (True, False):
        newest = store.latest()[0]
        assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 202
        wait_for(
            lambda after=newest: (
                (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and j["model_version"] > after
            ),
            timeout=120,
            what="a snapshot of the resumed trainer",
            diagnose=diagnose,
        )
        assert "delta" not in read_manifest(store.latest()[1])
        check()
        if kill:
            os.kill(client.app.state.services.jobs.get(job_id).pid, signal.SIGKILL)
            wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "failed", what="failed")
    client.post(f"/v1/jobs/{job_id}/stop")
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "stopped", what="stopped")


def test_init_from_fine_tunes_on_a_dataset_with_new_labels(client_for, settings, trained_text):
    source = copy_trained(trained_text, settings).job_id
    client = client_for(settings)
    store = SnapshotStore(settings.snapshots_dir(source))
    versions = store.versions()
    newer = post_jsonl(client, jsonl_bytes(text_records(300, 13, extra_label="brand new")), "newer").json()

    bad = client.post(
        "/v1/jobs", json={"train_dataset_id": newer["id"], "init_from": {"model_id": "f" * 32, "version": None}}
    )
    assert assert_problem(bad, 422)["field"] == "body.init_from.model_id"
    gone = client.post(
        "/v1/jobs", json={"train_dataset_id": newer["id"], "init_from": {"model_id": source, "version": 999}}
    )
    assert assert_problem(gone, 422)["field"] == "body.init_from.version"

    config = merged(TEXT_CONFIG, {"model": {"hidden": [64]}, "schedule": {"epochs": 3}})
    body = {"train_dataset_id": newer["id"], "config": config, "init_from": {"model_id": source, "version": None}}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["config"]["model"]["hidden"] == [16] and job["config"]["schedule"]["epochs"] == 3  # hidden: the source
    wait_for(
        lambda: client.get(f"/v1/jobs/{job['id']}").json()["state"] in ("completed", "failed"),
        timeout=120,
        what="the fine-tuning job to end",
        diagnose=job_diagnosis(client, settings, job["id"]),
    )
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "completed"
    listed = _all_labels(client, job["id"])
    assert [x["name"] for x in listed[:12]] == [x["name"] for x in _all_labels(client, source)]
    assert listed[12]["name"] == "brand new" and len(listed) == 13
    assert store.versions()[: len(versions)] == versions  # the source gained no version and lost none
    answer = _predict(client, job["id"], _words(5), k=2)["predictions"][0]
    assert "label é5" in answer["names"]
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not store.pins()  # the source version is released with the job


def test_a_request_during_a_trainers_exit_is_applied(client_for, settings, trained_text):
    """A trainer that has looked at its label requests for the last time keeps the queue lock until it has exited
    (after its trainer lock): a request that comes meanwhile waits for it and is then applied to the newest
    snapshot, not handed to a trainer that will never see it."""
    import fcntl
    import threading

    from app.domain import LABEL_QUEUE_LOCK, TRAINER_LOCK

    job_id = copy_trained(trained_text, settings).job_id
    client = client_for(settings)
    before = client.get(f"/v1/jobs/{job_id}").json()["model_version"]
    job_dir = settings.job_dir(job_id)
    trainer_lock, queue_lock = open(job_dir / TRAINER_LOCK, "a+"), open(job_dir / LABEL_QUEUE_LOCK, "a+")
    fcntl.flock(trainer_lock.fileno(), fcntl.LOCK_EX)
    fcntl.flock(queue_lock.fileno(), fcntl.LOCK_EX)
    exited = threading.Event()

    def exit_trainer():
        time.sleep(0.5)
        trainer_lock.close()
        exited.set()
        queue_lock.close()

    threading.Thread(target=exit_trainer).start()
    examples = [{"text": _words(3, shift=s)} for s in range(5)]
    r = client.post(f"/v1/models/{job_id}/labels", json={"labels": [{"name": "late", "examples": examples}]})
    assert exited.is_set()
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "applied" and r.json()["label_ids"] == [12] and r.json()["model_version"] > before
    assert _all_labels(client, job_id)[12]["name"] == "late"
    events = [json.loads(x) for x in (job_dir / "label-events.jsonl").read_text().splitlines()]
    assert [(e["op"], e["label_ids"], e["model_version"]) for e in events] == [("add", [12], r.json()["model_version"])]


def _label_events(settings, job_id: str, count: int, timeout: float, diagnose) -> list[dict]:
    """The job's label events once at least `count` are written (the trainer's or the service's record of applied
    requests)."""
    events_file = settings.job_dir(job_id) / "label-events.jsonl"
    return wait_for(
        lambda: (
            events_file.exists()
            and len(lines := events_file.read_text().splitlines()) >= count
            and [json.loads(x) for x in lines]
        ),
        timeout=timeout,
        what=f"{count} label requests applied",
        diagnose=diagnose,
    )


def _leave_requests(settings, job_id: str, requests: list[dict]):
    """Label requests in the job's queue as the service hands them to a trainer (one file each, oldest first), left
    there as by a trainer that never saw them; returns the queue directory."""
    from app.domain import LABEL_REQUESTS

    queue = settings.job_dir(job_id) / LABEL_REQUESTS
    queue.mkdir()
    for i, request in enumerate(requests):
        (queue / f"{i:020d}-{request['request_id']}.json").write_text(json.dumps(request))
    return queue


def test_requests_a_trainer_never_saw_are_applied_by_the_next_change(client_for, settings, trained_text):
    """Requests left in a job's queue by a trainer that stopped before it saw them (killed, or failed) are applied,
    oldest first and each reported as its trainer would have, before the next change made while no trainer runs."""
    job_id = copy_trained(trained_text, settings).job_id
    client = client_for(settings)
    examples = [{"text": _words(3, shift=s)} for s in range(5)] + [{"indices": [0, 2], "values": [1.0, 0.5]}]
    queue = _leave_requests(
        settings,
        job_id,
        [
            {"request_id": "a" * 32, "op": "add", "labels": [{"name": "left over", "examples": examples}]},
            {"request_id": "b" * 32, "op": "retire", "ids": [4]},
            {"request_id": "c" * 32, "op": "add", "labels": [{"name": "left over", "examples": examples}]},
        ],
    )

    assert client.delete(f"/v1/models/{job_id}/labels/0").status_code == 204
    assert not list(queue.glob("*.json"))
    listed = _all_labels(client, job_id)
    assert len(listed) == 13 and listed[12] == {"id": 12, "name": "left over", "status": "live"}
    assert [x["id"] for x in listed if x["status"] == "retired"] == [0, 4]
    events = [json.loads(x) for x in (settings.job_dir(job_id) / "label-events.jsonl").read_text().splitlines()]
    assert [e.get("request_id") for e in events] == ["a" * 32, "b" * 32, "c" * 32, None]
    assert events[0]["label_ids"] == [12] and events[1]["label_ids"] == [4] and "exists already" in events[2]["error"]
    assert events[3] == {**events[3], "op": "retire", "label_ids": [0]}
    versions = [e["model_version"] for e in events]
    assert versions[0] < versions[1] < versions[3] and versions[2] is None


@pytest.mark.parametrize("auto_resume", [False, True], ids=["left-interrupted", "resumed"])
def test_requests_left_when_the_service_died_with_its_trainer_are_applied_at_the_next_start(
    client_for, settings, trained_text, auto_resume
):
    """The service was killed (-9) together with a job's trainer, which had not applied the label requests handed to
    it: the next start applies them to the job's newest version as the reaping of that trainer would have, unless it
    resumes the job, whose new trainer applies them (once: the service leaves them to it)."""
    from sqlalchemy import update

    from app.db import Database, JobRow
    from tests.conftest import make_settings

    job_id = copy_trained(trained_text, settings).job_id
    settings = make_settings(settings.data_dir, auto_resume=auto_resume)
    db = Database(settings.database_url)
    with db.session() as s:  # as the killed service left it: training, in a process that is gone
        s.execute(update(JobRow).where(JobRow.id == job_id).values(state="running", pid=999999))
    db.dispose()
    examples = [{"text": _words(3, shift=s)} for s in range(5)]
    requests = [
        {"request_id": "a" * 32, "op": "add", "labels": [{"name": "left over", "examples": examples}]},
        {"request_id": "b" * 32, "op": "retire", "ids": [4]},
    ]
    queue = _leave_requests(settings, job_id, requests)
    before = SnapshotStore(settings.snapshots_dir(job_id)).latest()[0]

    client = client_for(settings)
    diagnose = job_diagnosis(client, settings, job_id)
    job = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("interrupted", "completed", "failed") and j,
        timeout=120,
        what="the job to settle after the start",
        diagnose=diagnose,
    )
    assert job["state"] == ("completed" if auto_resume else "interrupted"), job
    events = _label_events(settings, job_id, 2, timeout=30, diagnose=diagnose)
    assert [e["request_id"] for e in events] == ["a" * 32, "b" * 32]  # each once
    assert events[0]["label_ids"] == [12] and events[1]["label_ids"] == [4]
    assert before < events[0]["model_version"] <= events[1]["model_version"]
    assert all(("step" in e) is auto_resume for e in events)  # a trainer's events say at which step it applied them
    assert not list(queue.glob("*.json"))

    body = client.get(f"/v1/models/{job_id}/labels").json()
    assert body["pending"] == [] and body["model_version"] >= events[1]["model_version"]
    listed = _all_labels(client, job_id)
    assert listed[12] == {"id": 12, "name": "left over", "status": "live"}
    assert [x["id"] for x in listed if x["status"] == "retired"] == [4]
    assert 12 in _predict(client, job_id, _words(3), k=3, mode="exact")["predictions"][0]["labels"]
    assert 4 not in _predict(client, job_id, _words(4), k=13, mode="exact")["predictions"][0]["labels"]
