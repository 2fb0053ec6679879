"""Fixtures shared by the service tests of this directory."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.conftest import make_settings


class TrainedText(NamedTuple):
    """A data dir holding text sets of tests/engine/test_text.py (their upload answers `train` and `test`) and a job
    trained on the first and evaluated on the second (TEXT_CONFIG)."""

    data_dir: Path
    train: dict[str, Any]
    test: dict[str, Any]
    job_id: str

    @property
    def train_id(self) -> str:
        return str(self.train["id"])

    @property
    def test_id(self) -> str:
        return str(self.test["id"])


@pytest.fixture(scope="session")
def trained_text(tmp_path_factory: pytest.TempPathFactory, warm_engine: None) -> TrainedText:
    """Made once: tests that only need such a model copy it (`tests.app.helpers.copy_trained`) instead of training
    the same model again. The training set is text_records(300, 11); the test set text_records(60, 12) with an
    extra label, uploaded gzipped `like` it."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.app.test_text_api import finished_job, post_jsonl
    from tests.engine.test_text import jsonl_bytes, text_records

    root = tmp_path_factory.mktemp("trained-text") / "data"
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("SLIDE_"):
                mp.delenv(name)
        settings = make_settings(root)
        with TestClient(create_app(settings)) as client:
            train = post_jsonl(client, jsonl_bytes(text_records(300, 11)), "train")
            assert train.status_code == 201, train.text
            test_data = gzip.compress(jsonl_bytes(text_records(60, 12, extra_label="brand new")))
            like = train.json()["id"]
            test = post_jsonl(client, test_data, "test", like=like, **{"Content-Encoding": "gzip"})
            assert test.status_code == 201, test.text
            job_id = finished_job(client, settings, like, test.json()["id"])
    return TrainedText(root, train.json(), test.json(), job_id)
