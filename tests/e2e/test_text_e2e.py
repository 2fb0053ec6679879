"""End to end with text: a real server, a JSONL training set and a `like` test set, names in predictions, an alias
pinned to a version while training goes on, alias moves under load, evaluation over HTTP, and a restart after
which the aliases and the featurizer still answer."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.helpers import wait_for
from tests.e2e.server import Server
from tests.engine.test_text import jsonl_bytes, text_records

CONFIG = {
    "model": {"hidden": [16], "sample_output": False, "sample_hidden": False},
    "optimizer": {"batch_size": 16, "lr": 0.01},
    "schedule": {"epochs": 2000},  # trains until stopped
    "seed": 2,
}
QUERY = {"instances": [{"text": "w10 w11 w12"}, {"text": "w35 w36"}], "k": 3, "mode": "exact"}


@pytest.fixture
def servers(tmp_path: Path, warm_engine: None) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.cleanup()


def _version(c, job_id: str) -> int:
    return c.get(f"/v1/jobs/{job_id}").json()["model_version"] or 0


def test_text_alias_versions_evaluate_restart(tmp_path: Path, servers):
    data = tmp_path / "data"
    server = Server(data, tmp_path / "server.log", SLIDE_SNAPSHOT_KEEP="2").start()
    servers.append(server)
    c = server.client()

    # 1. a JSONL training set and a like test set (gzip)
    r = c.post(
        "/v1/datasets",
        params={"name": "products", "format": "jsonl"},
        content=jsonl_bytes(text_records(400, 21)),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 201, r.text
    train = r.json()

    r = c.post(
        "/v1/datasets",
        params={"name": "products-test", "format": "jsonl", "like": train["id"]},
        content=gzip.compress(jsonl_bytes(text_records(80, 22, extra_label="unseen"))),
        headers={"Content-Type": "application/gzip"},
    )
    assert r.status_code == 201, r.text
    test = r.json()
    assert test["unknown_labels"] == 20 and test["num_features"] == train["num_features"]

    # 2. train
    r = c.post("/v1/jobs", json={"train_dataset_id": train["id"], "eval_dataset_id": test["id"], "config": CONFIG})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: _version(c, job_id) >= 2, timeout=90, what="a few snapshots", diagnose=server.log)

    # 3. predict by text, names back
    r = c.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert r.status_code == 200, r.text
    names = [p["names"] for p in r.json()["predictions"]]
    assert all(len(n) == 3 and all(isinstance(x, str) for x in n) for n in names)

    # 4. an alias at version v
    v = _version(c, job_id)
    r = c.put("/v1/aliases/production", json={"model_id": job_id, "version": v})
    assert r.status_code == 200 and r.json()["model_version"] == v, r.text
    c.put("/v1/aliases/canary", json={"model_id": job_id, "version": None})

    # 5. training goes on: v falls out of SLIDE_SNAPSHOT_KEEP=2 but stays, pinned
    wait_for(lambda: _version(c, job_id) >= v + 3, timeout=90, what="newer versions", diagnose=server.log)
    retained = [x["version"] for x in c.get(f"/v1/models/{job_id}/versions").json()["data"]]
    assert v in retained and max(retained) >= v + 3

    # 6. the alias still answers from v (and the exact-version endpoint agrees)
    r = c.post("/v1/aliases/production/predict", json=QUERY)
    assert r.status_code == 200, r.text
    assert (r.json()["model_id"], r.json()["model_version"]) == (job_id, v)
    same = c.post(f"/v1/models/{job_id}/versions/{v}/predict", json=QUERY).json()
    assert same["predictions"] == r.json()["predictions"]

    # alias moves under load: every answer is whole, from v or from a newest version, never an error (a second
    # alias keeps v pinned meanwhile, so moving production back to v always finds it)
    assert c.put("/v1/aliases/keep", json={"model_id": job_id, "version": v}).status_code == 200
    answers: list[tuple[int, int]] = []
    stop = threading.Event()

    def hammer() -> None:
        with server.client() as hc:
            while not stop.is_set():
                resp = hc.post("/v1/aliases/production/predict", json=QUERY)
                answers.append((resp.status_code, resp.json().get("model_version", -1)))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(answers) >= 4, timeout=30, what="alias predictions under way")
    newest_seen = []
    for i in range(6):
        target = None if i % 2 == 0 else v
        r = c.put("/v1/aliases/production", json={"model_id": job_id, "version": target})
        assert r.status_code == 200, r.text
        newest_seen.append(r.json()["model_version"])
        seen = len(answers)
        wait_for(lambda: len(answers) > seen, timeout=30, what="an answer after the move")  # noqa: B023
    stop.set()
    for t in threads:
        t.join()
    assert answers and all(code == 200 for code, _ in answers), answers
    assert all(ver == v or ver >= min(newest_seen) for _, ver in answers), (v, newest_seen, answers)
    assert c.delete("/v1/aliases/keep").status_code == 204

    # 7. move the alias to null: the newest version answers
    r = c.put("/v1/aliases/production", json={"model_id": job_id, "version": None})
    assert r.status_code == 200 and r.json()["version"] is None
    r = c.post("/v1/aliases/production/predict", json=QUERY)
    assert r.json()["model_version"] >= v + 3

    # 8. evaluate over HTTP
    c.post(f"/v1/jobs/{job_id}/stop")
    wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] == "stopped", timeout=60, what="stopped")
    r = c.post(f"/v1/models/{job_id}/evaluate", json={"dataset_id": test["id"], "k": 5, "mode": "lsh"})
    assert r.status_code == 200, r.text
    ev = r.json()
    assert ev["points"] == 80 and ev["p_at_1"] > 0.8 and ev["recall_vs_exact"] is not None
    latest = _version(c, job_id)
    pinned = c.put("/v1/aliases/pinned", json={"model_id": job_id, "version": latest}).json()
    before = c.post("/v1/aliases/production/predict", json=QUERY).json()

    # 9. restart: aliases and the featurizer still work
    server.stop_gracefully()
    server = Server(data, tmp_path / "server2.log", SLIDE_SNAPSHOT_KEEP="2").start()
    servers.append(server)
    c = server.client()
    listed = {a["alias"]: a for a in c.get("/v1/aliases").json()["data"]}
    assert set(listed) == {"canary", "pinned", "production"}
    assert listed["pinned"]["version"] == pinned["version"] == latest
    after = c.post("/v1/aliases/production/predict", json=QUERY)
    assert after.status_code == 200, after.text
    assert after.json()["predictions"] == before["predictions"]
    assert c.post("/v1/aliases/pinned/predict", json=QUERY).json()["model_version"] == latest
    versions = c.get(f"/v1/models/{job_id}/versions").json()["data"]
    assert any(e["id"] == ev["id"] for x in versions for e in x["evaluations"])
