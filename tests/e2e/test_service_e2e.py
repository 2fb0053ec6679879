"""End to end: a real `uvicorn app.main:app` in a subprocess, the real engine, a temp data dir.

upload -> job -> live predictions while it trains (model_version increases) -> SSE -> stop -> resume ->
completed; then restart the server and find datasets, jobs and the model still there and answering; then kill
the server mid-training and see the next start resume the job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"hidden": [32], "batch_size": 64, "seed": 11, "epochs": 100}
QUERY = {"instances": [{"indices": [0, 5, 17], "values": [1.0, 0.5, 0.25]}], "k": 5, "mode": "lsh"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, log_path: Path, **settings: str):
        self.data_dir = data_dir
        self.log_path = log_path
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDE_")}
        env.update(
            SLIDE_DATA_DIR=str(self.data_dir),
            SLIDE_SNAPSHOT_INTERVAL_S="0.3",
            SLIDE_PROGRESS_INTERVAL_S="0.2",
            SLIDE_SUPERVISOR_POLL_S="0.1",
            SLIDE_TRAINER_THREADS="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            **self.settings,
        )
        self.port = _free_port()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()

        def up() -> bool:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60, interval=0.2, what="the server to be ready")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"server did not exit after {sig!r}:\n{self.log()}")

    def stop_gracefully(self) -> None:
        """SIGTERM; uvicorn finishes the lifespan (trainers checkpoint) and re-raises the signal on exit."""
        code = self.stop(signal.SIGTERM)
        assert code in (0, -signal.SIGTERM), self.log()
        assert "Application shutdown complete" in self.log(), self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture
def servers(tmp_path: Path, warm_engine: None) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.stop(signal.SIGKILL)


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
    r = c.post("/v1/datasets", params={"name": "train"}, content=_chunks(xmc_files["train_gz"]),
               headers={"Content-Type": "application/gzip"})
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
    assert stopped["progress"]["epoch"] < CONFIG["epochs"]
    assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    done = _until_state(c, job_id, "completed")
    assert done["runs"] == 2 and done["progress"]["epoch"] == CONFIG["epochs"]
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
    assert steps == sorted(set(steps)) and len(steps) in (CONFIG["epochs"], CONFIG["epochs"] + 1)  # + the stop
    model = c.get(f"/v1/models/{job_id}").json()
    assert model["ready"] and model["latest_version"] == done["model_version"]
    r = c.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert r.status_code == 200 and r.json() == final

    # Crash (SIGKILL) mid-training: the trainer checkpoints when its parent disappears; the next start resumes it.
    job2 = c.post("/v1/jobs", json={"train_dataset_id": train["id"], "config": dict(CONFIG, seed=12)}).json()["id"]
    wait_for(lambda: (_job(c, job2)["model_version"] or 0) >= 1, timeout=60, what="a snapshot of the second job")
    server.stop(signal.SIGKILL)
    time.sleep(1.0)  # the orphaned trainer notices within SLIDE_PROGRESS_INTERVAL_S and checkpoints
    server = Server(data, log).start()
    servers.append(server)
    c = httpx.Client(base_url=server.url, timeout=30)
    resumed = _until_state(c, job2, "completed")
    assert resumed["interruptions"] == 1 and resumed["runs"] == 2, resumed
    server.stop_gracefully()
