"""Shared fixtures for the service tests: small synthetic XMC files, settings on a temp data dir, an app client.

Everything runs the real engine (no fake trainer): the data is the engine's `tiny` synthetic preset (2,000
training points), so a few epochs take about a second on two cores.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `make test` installs the project; a bare `pytest` from the checkout works too
    sys.path.insert(0, str(ROOT))

# Starlette 1.x suggests httpx2 for its TestClient (warning once, at import); httpx is what we declare and use.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import fastapi.testclient  # noqa: F401

# Trainer processes inherit this: two cores are shared by the web process, the trainer and pytest.
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

# Test tiers by directory (markers registered in pyproject.toml); single slow tests elsewhere carry @pytest.mark.slow.
DIRECTORY_MARKERS = {"e2e": ("e2e", "slow"), "faults": ("faults", "slow"), "fuzz": ("slow",)}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            top = item.path.resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        for name in DIRECTORY_MARKERS.get(top, ()):
            item.add_marker(name)


@pytest.fixture(scope="session")
def xmc_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny preset as XMC files: train.txt, train.txt.gz, test.txt (and its summaries)."""
    from engine import generate, write_xmc

    d = tmp_path_factory.mktemp("xmc")
    train, test = generate("tiny", seed=7)
    files = {
        "train": write_xmc(train, d / "train.txt"),
        "train_gz": write_xmc(train, d / "train.txt.gz"),
        "test": write_xmc(test, d / "test.txt"),
    }
    return files


@pytest.fixture(scope="session")
def warm_engine(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Train and predict once in this process, so Numba's on-disk cache holds the kernels before any test times
    a trainer process or a first prediction (a cold compile takes many seconds on two cores)."""
    import numpy as np

    from engine import (
        ModelConfig,
        OptimizerConfig,
        ScheduleConfig,
        SlideConfig,
        SnapshotStore,
        Trainer,
        generate,
        load_model,
    )

    train, test = generate("tiny", seed=1, num_train=256, num_test=64)
    store = SnapshotStore(tmp_path_factory.mktemp("warm") / "snapshots")
    Trainer(
        SlideConfig(
            model=ModelConfig(hidden=(32,)),
            optimizer=OptimizerConfig(batch_size=64),
            schedule=ScheduleConfig(epochs=1),
            threads=1,
        ),
        train,
        test,
        store,
    ).run()
    model = load_model(store.latest()[1])
    for mode in ("lsh", "exact"):
        model.predict(np.asarray(test.x_indptr), np.asarray(test.x_indices), np.asarray(test.x_values), k=5, mode=mode)


@pytest.fixture(scope="session")
def xmc_summaries(xmc_files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    from engine import read_xmc

    return {k: read_xmc(xmc_files[k]).summary() for k in ("train", "test")}


def make_settings(data_dir: Path, **overrides: Any):
    """Settings for tests: short intervals so jobs show progress quickly; nothing read from .env."""
    from app.settings import Settings

    values: dict[str, Any] = dict(
        data_dir=data_dir,
        snapshot_interval_s=0.5,
        progress_interval_s=0.2,
        supervisor_poll_s=0.1,
        events_poll_s=0.1,
        shutdown_grace_s=15,
        trainer_threads=1,
        trainer_nice=0,  # the machine running tests may be busy: a niced trainer would only make them slower
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLIDE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def settings(tmp_path: Path, clean_env: None):
    return make_settings(tmp_path / "data")


@pytest.fixture
def client_for(clean_env: None, warm_engine: None) -> Iterator[Callable[..., Any]]:
    """`client_for(settings)` -> a started TestClient (lifespan run); all are closed at teardown."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    opened: list[Any] = []

    def make(settings: Any, **kwargs: Any):
        c = TestClient(create_app(settings), **kwargs)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in reversed(opened):
        c.__exit__(None, None, None)


@pytest.fixture
def client(settings: Any, client_for: Callable[..., Any]):
    return client_for(settings)
