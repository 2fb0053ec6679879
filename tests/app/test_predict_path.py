"""Where a predict request is computed: small requests to a loaded model on the event loop, the rest in the predict
pool; both give the same answer, follow new snapshots and keep the error contract."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

import app.api.models as models_api
from app.db import DatasetRow, JobRow
from engine import ModelConfig, OptimizerConfig, ScheduleConfig, SlideConfig, SnapshotStore, Trainer, generate
from tests.app.helpers import assert_problem
from tests.conftest import make_settings


def published_job(client, settings) -> tuple[str, Trainer]:
    """A completed job whose model is a briefly trained tiny network, published as version 1."""
    train, _ = generate("tiny", seed=2, num_train=256, num_test=8)
    job_id = uuid.uuid4().hex
    store = SnapshotStore(settings.snapshots_dir(job_id), keep=3)
    config = SlideConfig(
        model=ModelConfig(hidden=(32,)),
        optimizer=OptimizerConfig(batch_size=64),
        schedule=ScheduleConfig(epochs=1),
        threads=1,
        seed=0,
    )
    trainer = Trainer(config, train, None, store)
    trainer.train_step(np.arange(64))
    trainer.publish()
    settle(settings, job_id)
    ds_id = uuid.uuid4().hex
    with client.app.state.services.db.session() as s:
        s.add(
            DatasetRow(
                id=ds_id,
                name="tiny",
                num_points=train.num_points,
                num_features=train.num_features,
                num_labels=train.num_labels,
                nnz=train.nnz,
                avg_labels_per_point=0.0,
                avg_features_per_point=0.0,
                bytes=0,
            )
        )
        s.add(JobRow(id=job_id, train_dataset_id=ds_id, config=config.to_dict(), state="completed"))
    return job_id, trainer


def settle(settings, job_id: str) -> None:
    """Date the snapshot dir's last change 2 s back: the registry lists a dir changed within the last second again
    on every request (file systems stamp times coarsely), as it would a second after a real publish."""
    back = time.time_ns() - 2_000_000_000
    os.utime(settings.snapshots_dir(job_id), ns=(back, back))


@pytest.fixture
def paths(monkeypatch):
    """Records, per predict, whether it ran on the event loop (with the model already in hand) or in the pool."""
    seen: list[str] = []
    real = models_api.run_predict

    def recording(services, model_id, body, version, loaded=None):
        seen.append("inline" if loaded is not None else "pool")
        return real(services, model_id, body, version, loaded)

    monkeypatch.setattr(models_api, "run_predict", recording)
    return seen


QUERY = {"instances": [{"indices": [1, 5, 9], "values": [1.0, 0.5, 0.25]}], "k": 3, "mode": "lsh"}


def test_small_requests_to_a_loaded_model_skip_the_pool(tmp_path, client_for, paths):
    settings = make_settings(tmp_path / "data")
    client = client_for(settings)
    job_id, trainer = published_job(client, settings)
    first = client.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert first.status_code == 200, first.text
    again = client.post(f"/v1/models/{job_id}/predict", json=QUERY)
    assert again.json() == first.json()
    assert first.headers["content-type"] == "application/json"
    assert paths == ["pool", "inline"]  # the first loads the model and looks the job up

    exact = client.post(f"/v1/models/{job_id}/predict", json={**QUERY, "mode": "exact"})
    assert exact.status_code == 200 and exact.json()["mode"] == "exact"
    assert paths[-1] == "inline"  # a small output layer: scored exactly in well under a millisecond
    many = {**QUERY, "instances": QUERY["instances"] * (settings.predict_inline_max_instances + 1)}
    r = client.post(f"/v1/models/{job_id}/predict", json=many)
    assert r.status_code == 200 and len(r.json()["predictions"]) == len(many["instances"])
    assert paths[-1] == "pool"
    one = client.post(f"/v1/models/{job_id}/versions/1/predict", json=QUERY)
    assert one.json()["predictions"] == first.json()["predictions"] and paths[-1] == "inline"

    # errors keep their contract on the inline path
    bad = {"instances": [{"indices": [10**6], "values": [1.0]}]}
    p = assert_problem(client.post(f"/v1/models/{job_id}/predict", json=bad), 422)
    assert p["field"] == "body.instances[0].indices[0]" and paths[-1] == "inline"
    p = assert_problem(client.post(f"/v1/models/{job_id}/predict", json={**QUERY, "probabilities": "yes"}), 422)

    # a newer snapshot is served from the next request on
    trainer.train_step(np.arange(64, 128))
    trainer.publish()
    newer = client.post(f"/v1/models/{job_id}/predict", json=QUERY).json()
    assert newer["model_version"] == 2 and paths[-1] == "pool"  # changed within the last second: listed again
    settle(settings, job_id)
    assert client.post(f"/v1/models/{job_id}/predict", json=QUERY).json()["model_version"] == 2
    assert paths[-2:] == ["pool", "pool"]  # changed since it was listed
    assert client.post(f"/v1/models/{job_id}/predict", json=QUERY).json()["model_version"] == 2
    assert paths[-1] == "inline"

    # a deleted job's model is gone at once, though it was held
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert_problem(client.post(f"/v1/models/{job_id}/predict", json=QUERY), 404)


def test_every_request_in_the_pool_when_inline_is_off(tmp_path, client_for, paths):
    settings = make_settings(tmp_path / "data", predict_inline_max_instances=0)
    client = client_for(settings)
    job_id, _ = published_job(client, settings)
    answers = [client.post(f"/v1/models/{job_id}/predict", json=QUERY) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers)
    assert answers[0].json() == answers[2].json()
    assert paths == ["pool"] * 3
    assert client.post(f"/v1/models/{job_id}/predict", json={**QUERY, "probabilities": True}).json()["predictions"][0][
        "probabilities"
    ] == pytest.approx(
        _softmax(answers[0].json()["predictions"][0]["scores"]),
    )


def _softmax(xs: list[float]) -> list[float]:
    e = np.exp(np.asarray(xs) - max(xs))
    return (e / e.sum()).tolist()


def test_pinned_versions_built_from_deltas_are_held_within_the_memory_limit(tmp_path):
    from app.services.registry import ModelRegistry
    from engine import labels as lab

    train, _ = generate("tiny", seed=2, num_train=256, num_test=8)
    config = SlideConfig(
        model=ModelConfig(hidden=(32,), sample_output=True),
        schedule=ScheduleConfig(epochs=1),
        threads=1,
        seed=0,
    )
    probe = make_settings(tmp_path / "probe")
    store = SnapshotStore(probe.snapshots_dir("m"), keep=10)
    Trainer(config, train, None, store).run()
    first = store.latest()[0]
    point = (train.x_indices[: train.x_indptr[1]], train.x_values[: train.x_indptr[1]])
    deltas = [lab.edit_snapshot(store, add=[(f"new{i}", [point])]).version for i in range(3)]
    held = ModelRegistry(probe).version("m", deltas[0]).owned_bytes
    assert held > 4096  # a delta version holds its output layer and tables in memory; a full one maps them
    assert ModelRegistry(probe).version("m", first).owned_bytes <= 4096

    registry = ModelRegistry(make_settings(probe.data_dir, pinned_cache_memory=int(1.5 * held)))
    for version in (first, *deltas):
        assert registry.version("m", version).version == version
    # the two older deltas went, least recently used first; the mapped full version costs nothing to keep
    assert [(v, b > 4096) for _, v, b in registry.cached_versions()] == [(first, False), (deltas[-1], True)]
    assert registry.version("m", deltas[0]).version == deltas[0]  # read again when asked for
    assert [v for _, v, _ in registry.cached_versions()] == [first, deltas[0]]

    roomy = ModelRegistry(make_settings(probe.data_dir, pinned_cache_memory=10 * held))
    for version in (first, *deltas):
        roomy.version("m", version)
    assert [v for _, v, _ in roomy.cached_versions()] == [first, *deltas]
