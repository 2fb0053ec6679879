"""The types engine and app share: a training record, the job states, the job spec."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from sqlalchemy import text

from app.db import METRIC_FIELDS, JobRow, MetricRow
from app.domain import ACTIVE_STATES, DATA_READING_STATES, RESUMABLE_STATES, TERMINAL_STATES, JobSpec, JobState
from app.schemas import JobPublic, MetricPoint
from engine import TrainingMetrics

RECORD = TrainingMetrics(
    step=64,
    epoch=2,
    samples=4096,
    loss=1.25,
    p_at_1=0.5,
    p_at_5=0.25,
    samples_per_s=900.0,
    active_fraction=0.05,
    elapsed_s=4.5,
    eval_mode="lsh",
)


def test_metric_columns_and_api_fields_are_the_training_record():
    stored = ("step", "epoch", "samples", "loss", "p_at_1", "p_at_5", "samples_per_s", "active_fraction", "elapsed_s")
    assert METRIC_FIELDS == stored  # the HTTP contract: these names, in this order
    assert set(stored) <= set(TrainingMetrics.names()) and set(stored) <= set(MetricRow.__table__.columns.keys())
    assert tuple(MetricPoint.model_fields) == stored


def test_metric_point_keeps_its_json_shape():
    point = MetricPoint.model_validate({k: getattr(RECORD, k) for k in METRIC_FIELDS})
    assert point.model_dump(mode="json") == {
        "step": 64,
        "epoch": 2.0,
        "samples": 4096,
        "loss": 1.25,
        "p_at_1": 0.5,
        "p_at_5": 0.25,
        "samples_per_s": 900.0,
        "active_fraction": 0.05,
        "elapsed_s": 4.5,
    }
    # step, epoch and samples are required; the rest may be missing or null (a record without an eval set)
    sparse = MetricPoint.model_validate({"step": 1, "epoch": 0, "samples": 8})
    assert sparse.model_dump(mode="json")["p_at_1"] is None
    with pytest.raises(ValueError):
        MetricPoint.model_validate({"epoch": 0, "samples": 8})
    schema = MetricPoint.model_json_schema()
    assert schema["required"] == ["step", "epoch", "samples"]
    assert "Precision@1" in schema["properties"]["p_at_1"]["description"]


def test_training_record_round_trips_and_reads_older_records():
    assert TrainingMetrics.from_dict(RECORD.to_dict()) == RECORD
    older = {k: v for k, v in RECORD.to_dict().items() if k != "elapsed_s"}
    assert TrainingMetrics.from_dict({**older, "unknown": 1}).elapsed_s is None


def test_job_states_are_the_api_values():
    assert [s.value for s in JobState] == [
        "queued",
        "running",
        "stopping",
        "stopped",
        "completed",
        "failed",
        "interrupted",
    ]
    schema = JobPublic.model_json_schema()
    assert schema["$defs"]["JobState"]["enum"] == [s.value for s in JobState]
    assert JobState.RUNNING == "running" and f"{JobState.RUNNING}" == "running"
    assert set(ACTIVE_STATES).isdisjoint(TERMINAL_STATES)
    assert set(ACTIVE_STATES) | set(TERMINAL_STATES) == set(JobState)
    assert set(RESUMABLE_STATES) <= set(TERMINAL_STATES) and JobState.COMPLETED not in RESUMABLE_STATES
    assert set(DATA_READING_STATES) == set(JobState) - {JobState.COMPLETED}


def test_job_state_column_reads_back_the_enum(tmp_path):
    from app.db import Database

    db = Database(f"sqlite:///{tmp_path / 'slide.db'}")
    db.create_schema()
    with db.session() as s:
        s.add(JobRow(id="j", train_dataset_id="d", config={}, state=JobState.QUEUED, runs=0))
    with db.session() as s:
        row = s.get(JobRow, "j")
        assert row is not None and row.state is JobState.QUEUED
        stored = s.execute(text("SELECT state FROM jobs")).scalar_one()
        s.execute(text("UPDATE jobs SET state = 'stopping'"))  # a value written as text, e.g. by an older service
    with db.session() as s:
        assert s.get(JobRow, "j").state is JobState.STOPPING
    db.dispose()
    assert stored == "queued"  # the value, as before the enum: existing databases read the same


def test_job_spec_has_every_field_a_trainer_reads_and_pickles():
    spec = JobSpec(
        job_id="j",
        job_dir="/tmp/j",
        snapshots_dir="/tmp/j/snapshots",
        train_path="/tmp/d",
        eval_path=None,
        config={"schedule": {"epochs": 1}},
        database_url="sqlite://",
        snapshot_interval_s=30.0,
        snapshot_keep=3,
        trainer_threads=0,
        nice=0,
        progress_interval_s=1.0,
        parent_pid=1,
        run=1,
    )
    assert pickle.loads(pickle.dumps(spec)) == spec  # it crosses into the trainer process
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.run = 2  # type: ignore[misc]
