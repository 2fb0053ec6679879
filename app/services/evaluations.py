"""Evaluation over HTTP: a model version's P@k, nDCG@5, PSP@5 and lsh recall on a stored dataset.

The numbers come from `engine.metrics.evaluate_model`; this module only finds the model, the dataset and the
training set's label frequencies, runs it (inline for small sets, else in a background thread) and records the
result as an `evaluations` row.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from sqlalchemy import select

import engine
from app.db import Database, EvaluationRow, JobRow, utcnow
from app.services.datasets import DatasetService
from app.services.errors import InvalidContent, NotFound
from app.services.registry import LoadedModel, ModelRegistry
from app.settings import Settings
from engine.metrics import evaluate_model, propensity_scores

log = logging.getLogger("app.evaluations")

INLINE_POINTS = 2000
"""Sets up to this many points are evaluated within the request (200); larger ones in the background (202)."""
METRIC_KEYS = ("p_at_1", "p_at_3", "p_at_5", "ndcg_at_5", "psp_at_5", "points", "recall_vs_exact")


class EvaluationService:
    def __init__(self, settings: Settings, db: Database, datasets: DatasetService, registry: ModelRegistry):
        self.settings = settings
        self.db = db
        self.datasets = datasets
        self.registry = registry
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def start(
        self, model_id: str, dataset_id: str, k: int, mode: str, version: int | None
    ) -> tuple[EvaluationRow, bool]:
        """Validate, then evaluate: returns (row, finished). Blocking (up to INLINE_POINTS points)."""
        import typing

        from engine.network import PredictMode

        if mode not in typing.get_args(PredictMode):
            raise InvalidContent(f"mode {mode!r} is not available in this engine", loc=("body", "mode"))
        with self.db.session() as s:
            job = s.get(JobRow, model_id)
        if job is None:
            raise NotFound("model", model_id)
        ds_row = self.datasets.get(dataset_id)
        loaded = self.registry.current(model_id) if version is None else self.registry.version(model_id, version)
        model = loaded.model
        if ds_row.num_features > model.num_features or ds_row.num_labels > model.num_labels:
            raise InvalidContent(
                f"dataset {dataset_id} has {ds_row.num_features} features and {ds_row.num_labels} labels; model "
                f"{model_id} has {model.num_features} and {model.num_labels}: upload the set in the model's space "
                "(for text, `format=jsonl&like=<training set id>`)",
                loc=("body", "dataset_id"),
            )
        row = EvaluationRow(
            id=uuid.uuid4().hex,
            model_id=model_id,
            dataset_id=dataset_id,
            model_version=loaded.version,
            mode=mode,
            k=k,
            state="running",
        )
        with self.db.session() as s:
            s.add(row)
        with self._lock:
            self._running.add(row.id)
        if ds_row.num_points <= INLINE_POINTS:
            return self._run(row.id, loaded, job.train_dataset_id), True
        threading.Thread(
            target=self._run, args=(row.id, loaded, job.train_dataset_id), name=f"evaluate-{row.id[:8]}", daemon=True
        ).start()
        return row, False

    def _run(self, evaluation_id: str, loaded: LoadedModel, train_dataset_id: str) -> EvaluationRow:
        with self.db.session() as s:
            row = s.get(EvaluationRow, evaluation_id)
            assert row is not None  # inserted by start() before it runs
            dataset_id, k, mode = row.dataset_id, row.k, row.mode
        values: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            data = engine.load_dataset(self.settings.dataset_dir(dataset_id), mmap=True)
            inv_p = None
            try:
                train = engine.load_dataset(self.settings.dataset_dir(train_dataset_id), mmap=True)
                if train.num_labels == loaded.model.num_labels:
                    inv_p = propensity_scores(train.label_counts(), train.num_points)
            except (OSError, ValueError):
                pass  # the training set was deleted: no PSP
            result = evaluate_model(loaded.model, data, k=k, mode=mode, inv_propensity=inv_p)
            metrics = {key: result.get(key) for key in METRIC_KEYS}
            values = {"state": "succeeded", "metrics": metrics, "seconds": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - recorded on the row, which the client polls
            log.exception("evaluation %s failed", evaluation_id)
            values = {"state": "failed", "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
        finally:
            with self._lock:
                self._running.discard(evaluation_id)
        with self.db.session() as s:
            row = s.get(EvaluationRow, evaluation_id)
            assert row is not None
            for key, value in values.items():
                setattr(row, key, value)
            row.finished_at = utcnow()
        return row

    def get(self, evaluation_id: str) -> EvaluationRow:
        with self.db.session() as s:
            row = s.get(EvaluationRow, evaluation_id)
        if row is None:
            raise NotFound("evaluation", evaluation_id)
        if row.state == "running":
            with self._lock:
                alive = evaluation_id in self._running
            if not alive and row.finished_at is None and time.time() - row.created_at.timestamp() > 5:
                row.state, row.error = "failed", "the service restarted while this evaluation ran; start it again"
        return row

    def for_model(self, model_id: str) -> list[EvaluationRow]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(EvaluationRow)
                    .where(EvaluationRow.model_id == model_id, EvaluationRow.state == "succeeded")
                    .order_by(EvaluationRow.created_at.desc())
                )
            )
