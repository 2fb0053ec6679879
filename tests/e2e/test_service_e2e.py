"""End to end: a real `uvicorn app.main:app` in a subprocess, the real engine, a temp data dir.

upload -> job -> live predictions while it trains (model_version increases) -> SSE -> stop -> resume ->
completed; then restart the server and find datasets, jobs and the model still there and answering. Killing the
server mid-training is in tests/faults/test_service_crash.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.helpers import wait_for
from tests.e2e.server import Server

CONFIG = {
    "model": {"hidden": [32]},
    "optimizer": {"batch_size": 64},
    "schedule": {"epochs": 100, "early_stop_patience": "never"},
    "seed": 11,
}
QUERY = {"instances": [{"indices": [0, 5, 17], "values": [1.0, 0.5, 0.25]}], "k": 5, "mode": "lsh"}


@pytest.fixture
def servers(tmp_path: Path, warm_engine: None) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.cleanup()


def _job(c: httpx.Client, job_id: str) -> dict:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _until_state(c: httpx.Client, job_id: str, *states: str, timeout: float = 120) -> dict:
    def check():
        j = _job(c, job_id)
        assert j["state"] != "failed" or "failed" in states, j["error"]
        return j if j["state"] in states else None

    return wait_for(check, timeout=timeout, interval=0.1, what=f"job {job_id} to be {states}")


def _chunks(path: Path, size: int = 64 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(size):
            yield block


def test_upload_train_live_predict_stop_resume_restart(tmp_path: Path, servers, xmc_files, xmc_summaries):
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    server = Server(data, log).start()
    servers.append(server)
    c = httpx.Client(base_url=server.url, timeout=30)

    # Upload: gzip streamed in chunks (no Content-Length), and the test set as multipart.
    r = c.post(
        "/v1/datasets",
        params={"name": "train"},
        content=_chunks(xmc_files["train_gz"]),
        headers={"Content-Type": "application/gzip"},
    )
    assert r.status_code == 201, r.text
    train = r.json()
    assert train["num_points"] == xmc_summaries["train"]["num_points"]
    r = c.post("/v1/datasets", params={"name": "test"}, files={"file": ("test.txt", xmc_files["test"].read_bytes())})
    assert r.status_code == 201, r.text
    test = r.json()

    body = {"train_dataset_id": train["id"], "eval_dataset_id": test["id"], "config": CONFIG}
    r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1"}).json()["id"] == job_id

    # Live: predictions from the newest snapshot while it trains; the version increases.
    _until_state(c, job_id, "running")
    seen: list[int] = []

    def live_versions() -> bool:
        r_ = c.post(f"/v1/models/{job_id}/predict", json=QUERY)
        if r_.status_code == 503:  # before the first snapshot
            assert r_.headers["content-type"].startswith("application/problem+json")
            return False
        assert r_.status_code == 200, r_.text
        state = _job(c, job_id)["state"]
        assert state == "running", f"the job is {state} already: it trained faster than the test could watch"
        seen.append(r_.json()["model_version"])
        assert len(r_.json()["predictions"][0]["labels"]) <= 5
        return len(set(seen)) >= 3

    wait_for(live_versions, timeout=60, interval=0.05, what="three model versions while running")
    assert seen == sorted(seen) and seen[-1] > seen[0]

    # SSE, live: a metrics event arrives while it trains.
    with c.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "metrics":
                point = json.loads(line.split(":", 1)[1])
                assert point["step"] > 0 and point["p_at_1"] is not None
                break

    # Stop -> stopped (after a checkpoint); resume -> completed, same id.
    assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    stopped = _until_state(c, job_id, "stopped")
    assert stopped["progress"]["epoch"] < CONFIG["schedule"]["epochs"]
    assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    done = _until_state(c, job_id, "completed")
    assert done["runs"] == 2 and done["progress"]["epoch"] == CONFIG["schedule"]["epochs"]
    final = c.post(f"/v1/models/{job_id}/predict", json=QUERY).json()
    assert final["model_version"] == done["model_version"]
    metrics_text = c.get("/metrics").text
    assert f'slide_training_p_at_1{{job_id="{job_id}"}}' in metrics_text

    # Restart (graceful): everything is still there and answering.
    server.stop_gracefully()
    server = Server(data, log).start()
    servers.append(server)
    c = httpx.Client(base_url=server.url, timeout=30)
    assert {d["id"] for d in c.get("/v1/datasets").json()["data"]} == {train["id"], test["id"]}
    again = _job(c, job_id)
    assert again["state"] == "completed" and again["model_version"] == done["model_version"]
    steps = [m["step"] for m in c.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
    assert steps == sorted(set(steps)) and len(steps) in (
        CONFIG["schedule"]["epochs"],
        CONFIG["schedule"]["epochs"] + 1,
    )  # + the stop
    model = c.get(f"/v1/models/{job_id}").json()
    assert model["ready"] and model["latest_version"] == done["model_version"]
    r = c.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert r.status_code == 200 and r.json() == final

    server.stop_gracefully()
