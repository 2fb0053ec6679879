"""Jobs against the real engine: lifecycle (running -> live predictions -> stop -> resume -> completed), metrics,
events, idempotency, config errors naming the field, predict validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import update

from app.db import JobRow
from engine import SlideConfig
from tests.app.helpers import assert_problem, job_diagnosis, merged, upload, wait_for
from tests.conftest import make_settings

FAST = {
    "model": {"hidden": [32]},
    "optimizer": {"batch_size": 64},
    "schedule": {"early_stop_patience": "never"},
    "seed": 3,
}  # a job runs all its epochs


def _job(client, job_id):
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _state_is(client, job_id, *states):
    job = _job(client, job_id)
    assert job["state"] != "failed" or "failed" in states, job["error"]
    return job if job["state"] in states else None


@pytest.fixture
def datasets(client, xmc_files):
    train = upload(client, xmc_files["train"], name="train").json()
    test = upload(client, xmc_files["test"], name="test").json()
    return train["id"], test["id"]


def test_a_job_body_with_the_old_auto_and_none_numbers_runs_with_a_deprecation_note(client, datasets):
    """0 (auto) and -1 (none / all) are read as null and the field's word for one more release, and the answer to
    the POST says what to send instead; the job shows (and runs with) what they mean."""
    train_id, _ = datasets
    config = {
        "sampling": {"hash_l": 0, "hard_negatives": -1},
        "schedule": {"epochs": 1, "val_points": -1},
        "predict": {"probes": -1},
    }
    r = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": config})
    assert r.status_code == 201, r.text
    job = r.json()
    assert len(job["deprecations"]) == 4 and any('use "all"' in d for d in job["deprecations"]), job["deprecations"]
    shown = {group: {k: job["config"][group][k] for k in values} for group, values in config.items()}
    assert shown == {
        "sampling": {"hash_l": None, "hard_negatives": "all"},
        "schedule": {"epochs": 1, "val_points": "none"},
        "predict": {"probes": None},
    }
    again = client.get(f"/v1/jobs/{job['id']}").json()
    assert again["config"] == job["config"] and again["deprecations"] == []
    client.post(f"/v1/jobs/{job['id']}/stop")
    fresh = client.post(
        "/v1/jobs",
        json={"train_dataset_id": train_id, "config": {"sampling": {"hash_l": None}, "schedule": {"epochs": 1}}},
    )
    assert fresh.status_code == 201 and fresh.json()["deprecations"] == []
    client.post(f"/v1/jobs/{fresh.json()['id']}/stop")


def test_a_job_body_with_the_flat_names_of_the_previous_release_runs_with_a_deprecation_note(client, datasets):
    """The settings' flat names (before the groups) are read as their paths for one more release; the answer to the
    POST names each one's path, then the old numbers as above. The job shows and trains with the grouped config."""
    train_id, _ = datasets
    flat = {
        "hidden": [32],
        "batch_size": 64,
        "epochs": 1,
        "hash_l": 0,
        "predict_hubs": "none",
        "early_stop_patience": 0,
        "seed": 3,
    }
    r = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": flat})
    assert r.status_code == 201, r.text
    job = r.json()
    notes = job["deprecations"]
    assert "epochs is deprecated and will be refused in a later release; use schedule.epochs" in notes, notes
    assert any(n.startswith("predict_hubs is deprecated") and n.endswith("use predict.hubs") for n in notes), notes
    assert any(n.startswith("sampling.hash_l: 0 is deprecated") and "null (auto)" in n for n in notes), notes
    assert any(n.startswith("schedule.early_stop_patience: 0 is deprecated") and '"never"' in n for n in notes)
    assert len(notes) == 8, notes  # six moved names, two old numbers; seed is where it was
    config = job["config"]
    assert not set(flat) - {"seed"} & set(config)
    assert config["model"]["hidden"] == [32] and config["optimizer"]["batch_size"] == 64 and config["seed"] == 3
    assert config["schedule"]["epochs"] == 1 and config["schedule"]["early_stop_patience"] == "never"
    assert config["sampling"]["hash_l"] is None and config["predict"]["hubs"] == "none"
    wait_for(lambda: _state_is(client, job["id"], "completed"), timeout=120, what="completed")
    done = _job(client, job["id"])
    assert done["deprecations"] == []  # said once, in the answer to the POST
    # a job stored by the previous release (flat names, old numbers in its row) shows what they meant
    with client.app.state.services.db.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job["id"]).values(config={**flat, "threads": 1}))
    stored = _job(client, job["id"])
    assert stored["config"] == done["config"] and stored["estimated_memory_bytes"] == done["estimated_memory_bytes"]

    # a setting given both ways is refused, naming its path
    p = assert_problem(
        client.post(
            "/v1/jobs", json={"train_dataset_id": train_id, "config": {"hash_l": 8, "sampling": {"hash_l": 9}}}
        ),
        422,
    )
    assert p["field"] == "body.config.hash_l" and "given twice, as sampling.hash_l" in p["detail"], p


def test_config_and_reference_errors_name_the_field(client, datasets):
    train_id, _ = datasets
    cases = [
        ({"train_dataset_id": train_id, "config": {"sampling": {"hash_l": -1}}}, "body.config.sampling.hash_l"),
        ({"train_dataset_id": train_id, "config": {"hiden": [64]}}, "body.config.hiden"),
        (
            {"train_dataset_id": train_id, "config": {"sampling": {"hash_family": "md5"}}},
            "body.config.sampling.hash_family",
        ),
        ({"train_dataset_id": train_id, "config": {"optimizer": {"lr": "fast"}}}, "body.config.optimizer.lr"),
        ({"train_dataset_id": "0" * 32}, "body.train_dataset_id"),
        ({"train_dataset_id": train_id, "eval_dataset_id": "nope"}, "body.eval_dataset_id"),
        ({"config": {}}, "body.train_dataset_id"),
    ]
    for body, field in cases:
        p = assert_problem(client.post("/v1/jobs", json=body), 422)
        assert p["field"] == field, p
    p = assert_problem(
        client.post("/v1/jobs", content=b'{"train_dataset_id": ', headers={"Content-Type": "application/json"}), 400
    )
    assert "JSON" in p["detail"]
    assert client.get("/v1/jobs").json()["count"] == 0
    assert_problem(client.get("/v1/jobs/nope"), 404)
    for verb in ("stop", "resume"):
        assert_problem(client.post(f"/v1/jobs/nope/{verb}"), 404)
    assert_problem(client.delete("/v1/jobs/nope"), 404)
    assert_problem(client.get("/v1/jobs/nope/metrics"), 404)
    assert_problem(client.get("/v1/jobs/nope/events"), 404)


def test_idempotency_key(tmp_path, client_for, xmc_files):
    # max_concurrent_jobs=1 and a blocker job keep these queued: no trainer process needed
    client = client_for(make_settings(tmp_path / "data", max_concurrent_jobs=1))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    body = {"train_dataset_id": train_id, "config": {"schedule": {"epochs": 2}}}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-42"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = dict(body, config={"schedule": {"epochs": 3}})
    p = assert_problem(client.post("/v1/jobs", json=other, headers={"Idempotency-Key": "order-42"}), 409)
    assert p["job_id"] == first.json()["id"]
    assert client.post("/v1/jobs", json=body).json()["id"] != first.json()["id"]  # no key: a new job
    assert client.get("/v1/jobs").json()["count"] == 2
    for job in client.get("/v1/jobs").json()["data"]:
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get("/v1/jobs").json()["count"] == 0


def test_deleting_a_job_an_alias_points_at_is_refused(tmp_path, client_for, xmc_files):
    client = client_for(make_settings(tmp_path / "data", max_concurrent_jobs=1))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    job_id = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": {"schedule": {"epochs": 2}}}).json()[
        "id"
    ]
    for name in ("prod", "canary"):
        r = client.put(f"/v1/aliases/{name}", json={"model_id": job_id, "version": None})
        assert r.status_code == 200, r.text
    p = assert_problem(client.delete(f"/v1/jobs/{job_id}"), 409)
    assert p["aliases"] == ["canary", "prod"]
    assert "canary, prod" in p["detail"] and "DELETE /v1/aliases/" in p["detail"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # nothing was removed
    assert client.get("/v1/aliases/prod").json()["model_id"] == job_id
    assert client.delete("/v1/aliases/canary").status_code == 204
    p = assert_problem(client.delete(f"/v1/jobs/{job_id}"), 409)
    assert p["aliases"] == ["prod"] and "the alias prod points" in p["detail"]
    other = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": {"schedule": {"epochs": 2}}}).json()[
        "id"
    ]
    assert client.put("/v1/aliases/prod", json={"model_id": other, "version": None}).status_code == 200
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204  # the alias moved away: free to go
    assert_problem(client.get(f"/v1/jobs/{job_id}"), 404)
    assert client.get("/v1/aliases/prod").json()["model_id"] == other


@pytest.mark.slow
def test_lifecycle_live_predictions_stop_resume_complete(tmp_path, client_for, xmc_files):
    settings = make_settings(tmp_path / "data", max_concurrent_jobs=1, snapshot_interval_s=0.2)
    client = client_for(settings)
    train_id = upload(client, xmc_files["train"]).json()["id"]
    test_id = upload(client, xmc_files["test"]).json()["id"]
    r = client.post(
        "/v1/jobs",
        json={
            "train_dataset_id": train_id,
            "eval_dataset_id": test_id,
            "config": merged(FAST, {"model": {"sample_output": True}, "schedule": {"epochs": 100}}),
        },
    )
    assert r.status_code == 201, r.text
    job = r.json()
    job_id = job["id"]
    assert job["state"] in ("queued", "running")
    assert (
        job["config"]["schedule"]["epochs"] == 100
        and job["config"]["sampling"]["hash_l"] == SlideConfig().sampling.hash_l
    )  # engine defaults
    assert job["config"]["threads"] == 1  # SLIDE_TRAINER_THREADS applied

    # A second job waits for the slot: its model has no snapshot -> 503 with a clear message.
    waiting = client.post("/v1/jobs", json={"train_dataset_id": train_id, "config": {"schedule": {"epochs": 1}}}).json()
    assert waiting["state"] == "queued"
    p = assert_problem(
        client.post(f"/v1/models/{waiting['id']}/predict", json={"instances": [{"indices": [1], "values": [1.0]}]}), 503
    )
    assert "no snapshot yet" in p["detail"]
    assert client.delete(f"/v1/jobs/{waiting['id']}").status_code == 204

    # Live predictions while it trains; the version moves on.
    diagnose = job_diagnosis(client, settings, job_id)
    wait_for(lambda: _state_is(client, job_id, "running"), what="running", diagnose=diagnose)
    first = wait_for(
        lambda: (_job(client, job_id)["model_version"] or 0) >= 1, what="a first snapshot", diagnose=diagnose
    )
    query = {
        "instances": [
            {"indices": [0, 5, 17], "values": [1.0, 0.5, 0.25]},
            {"indices": [3, 1999], "values": [0.7, 0.1]},
        ],
        "k": 5,
        "mode": "lsh",
    }
    pred = client.post(f"/v1/models/{job_id}/predict", json=query)
    assert pred.status_code == 200, pred.text
    v1 = pred.json()["model_version"]
    assert v1 >= 1 and len(pred.json()["predictions"]) == 2
    assert pred.json()["mode"] == "lsh"  # each response says how it was scored
    default = client.post(f"/v1/models/{job_id}/predict", json={k: v for k, v in query.items() if k != "mode"})
    assert default.status_code == 200 and default.json()["mode"] == "exact"  # auto: 500 labels are scored exactly
    for p_ in pred.json()["predictions"]:
        assert len(p_["labels"]) == len(p_["scores"]) <= 5
        assert all(0 <= label < 500 for label in p_["labels"])
        assert p_["scores"] == sorted(p_["scores"], reverse=True)

    def newer():
        r_ = client.post(f"/v1/models/{job_id}/predict", json=dict(query, mode="exact"))
        assert r_.status_code == 200, r_.text
        state = _job(client, job_id)["state"]
        assert state == "running", f"the job is {state} already: it trained faster than the test could watch"
        return r_.json()["model_version"] > v1

    wait_for(newer, what="a newer snapshot while running", diagnose=diagnose)
    assert first

    # Stop: checkpoint, then `stopped`; the model still answers from that checkpoint.
    r = client.post(f"/v1/jobs/{job_id}/stop")
    assert r.status_code == 202 and r.json()["state"] in ("stopping", "stopped")
    stopped = wait_for(lambda: _state_is(client, job_id, "stopped"), what="stopped", diagnose=diagnose)
    assert stopped["progress"]["epoch"] < 100
    assert client.post(f"/v1/jobs/{job_id}/stop").json()["state"] == "stopped"  # idempotent
    at_stop = client.post(f"/v1/models/{job_id}/predict", json=query).json()["model_version"]
    assert at_stop == stopped["model_version"]

    # Resume: same job id, continues from the checkpoint, completes.
    r = client.post(f"/v1/jobs/{job_id}/resume")
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running"), r.text
    assert_problem(client.post(f"/v1/jobs/{job_id}/resume"), 409)
    done = wait_for(lambda: _state_is(client, job_id, "completed"), timeout=120, what="completed", diagnose=diagnose)
    assert done["runs"] == 2 and done["error"] is None
    # the files of the models the trainer was not using (engine.spill: it kept some, in the store's .best) went with it
    spilled = settings.snapshots_dir(job_id) / ".best"
    assert spilled.is_dir()
    wait_for(lambda: not list(spilled.glob("spill-*")), timeout=30, what="the trainer's spill files removed")
    assert done["progress"]["epoch"] == 100 and done["progress"]["step"] >= stopped["progress"]["step"]
    assert done["latest_metrics"]["p_at_1"] is not None
    assert_problem(client.post(f"/v1/jobs/{job_id}/resume"), 409)
    assert_problem(client.post(f"/v1/jobs/{job_id}/stop"), 409)

    # The time series: one point per epoch, steps increasing, nothing duplicated across the resume.
    series = client.get(f"/v1/jobs/{job_id}/metrics").json()
    steps = [m["step"] for m in series["data"]]
    assert series["count"] >= 100 and steps == sorted(set(steps))
    assert steps[-1] == done["progress"]["step"]
    later = client.get(f"/v1/jobs/{job_id}/metrics", params={"since_step": steps[-3]}).json()
    assert [m["step"] for m in later["data"]] == steps[-2:]

    # Server-Sent Events replay the series, then the final state, then end.
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"since_step": steps[-4]}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event:
                events.append((event, json.loads(line.split(":", 1)[1])))
    kinds = [e for e, _ in events]
    assert kinds.count("metrics") == 3 and kinds[-1] == "end"
    assert ("state", {"state": "completed", "error": None}) in events

    # Models: one per job with its versions.
    model = client.get(f"/v1/models/{job_id}").json()
    assert model["ready"] and model["job_state"] == "completed"
    assert model["num_features"] == 2000 and model["num_labels"] == 500
    assert model["latest_version"] == done["model_version"]
    assert [v["version"] for v in model["versions"] if v["available"]][-1] == model["latest_version"]
    assert client.get("/v1/models").json()["count"] == 1

    # Prometheus: training gauges for the job, request counters by route template.
    text = client.get("/metrics").text
    assert f'slide_training_p_at_1{{job_id="{job_id}"}}' in text
    assert 'slide_http_requests_total{method="POST",route="/v1/models/{model_id}/predict",status="200"}' in text
    assert f'slide_predicted_instances_total{{mode="lsh",model_id="{job_id}"}}' in text

    # Delete: gone, with its files; the dataset is free again.
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert_problem(client.get(f"/v1/jobs/{job_id}"), 404)
    assert_problem(client.post(f"/v1/models/{job_id}/predict", json=query), 404)
    assert not settings.job_dir(job_id).exists()
    assert client.delete(f"/v1/datasets/{train_id}").status_code == 204


def _thread_nices(pid: int) -> list[int]:
    """Niceness of every thread of a process (Linux keeps it per thread): field 19 of /proc/<pid>/task/<tid>/stat."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        out.append(int(stat.rsplit(")", 1)[1].split()[16]))
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_trainer_threads_run_niced(tmp_path, client_for, xmc_files):
    """SLIDE_TRAINER_NICE: every thread of a trainer runs that much nicer than the service, so predictions get the
    CPU first when both want it."""
    client = client_for(make_settings(tmp_path / "data", trainer_nice=5, trainer_threads=2))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    job_id = client.post(
        "/v1/jobs", json={"train_dataset_id": train_id, "config": merged(FAST, {"schedule": {"epochs": 1000}})}
    ).json()["id"]
    jobs = client.app.state.services.jobs
    wait_for(
        lambda: (_state_is(client, job_id, "running") or {}).get("progress", {}).get("step", 0) > 0,
        what="training steps",
        diagnose=job_diagnosis(client, client.app.state.services.settings, job_id),
    )
    pid = jobs.get(job_id).pid
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
    nices = _thread_nices(pid)
    assert nices and all(n == expected for n in nices), (expected, nices)
    assert client.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    wait_for(lambda: _state_is(client, job_id, "stopped"), what="stopped")


def test_predictions_computed_at_once_are_bounded(tmp_path, client_for, xmc_files):
    """SLIDE_PREDICT_CONCURRENCY: however many requests come at once, at most that many predictions compute (each
    holds scratch buffers the size of the output layer); the others wait their turn and all are answered."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    client = client_for(make_settings(tmp_path / "data", predict_concurrency=2))
    train_id = upload(client, xmc_files["train"]).json()["id"]
    job_id = client.post(
        "/v1/jobs", json={"train_dataset_id": train_id, "config": merged(FAST, {"schedule": {"epochs": 1}})}
    ).json()["id"]
    wait_for(lambda: _state_is(client, job_id, "completed"), what="completed")
    registry = client.app.state.services.registry
    inner = registry.predict
    lock, now, peak = threading.Lock(), [0], [0]

    def counting(*args, **kwargs):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.05)  # long enough for the other requests to pile up
            return inner(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    registry.predict = counting
    query = {"instances": [{"indices": [1, 2], "values": [1.0, 0.5]}], "k": 3}
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: client.post(f"/v1/models/{job_id}/predict", json=query).status_code, range(24)))
    assert codes == [200] * 24
    assert registry.limiter.total_tokens == 2 and peak[0] == 2, peak
