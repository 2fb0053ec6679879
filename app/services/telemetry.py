"""Prometheus metrics, one registry per app (so tests can build several apps in one process).

Request counts and latency are labelled by route template (not raw path) to keep cardinality bounded. Training
gauges are read from the database at scrape time, so they are right whichever process runs the trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select
from starlette.routing import Match, Mount

from app.db import Database, JobRow
from app.domain import TRAINING_STATES, JobState

log = logging.getLogger("app.telemetry")


class JobCollector:
    """Per-job training gauges, from the jobs table."""

    def __init__(self, db: Database):
        self.db = db

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rate = GaugeMetricFamily(
            "slide_training_samples_per_second", "Training throughput of a running job", labels=["job_id"]
        )
        p1 = GaugeMetricFamily("slide_training_p_at_1", "Latest evaluated precision@1 of a job", labels=["job_id"])
        p5 = GaugeMetricFamily("slide_training_p_at_5", "Latest evaluated precision@5 of a job", labels=["job_id"])
        steps = GaugeMetricFamily("slide_training_step", "Training steps done by a job", labels=["job_id"])
        states = GaugeMetricFamily("slide_jobs", "Jobs by state", labels=["state"])
        try:
            with self.db.session() as s:
                rows = s.execute(
                    select(JobRow.id, JobRow.state, JobRow.samples_per_s, JobRow.latest_metrics, JobRow.step)
                ).all()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is busy
            log.exception("could not read jobs for /metrics")
            rows = []
        counts = dict.fromkeys(JobState, 0)
        for job_id, state, sps, latest, step in rows:
            counts[state] = counts.get(state, 0) + 1
            steps.add_metric([job_id], float(step or 0))
            if state in TRAINING_STATES and sps is not None:
                rate.add_metric([job_id], float(sps))
            latest = latest or {}
            if latest.get("p_at_1") is not None:
                p1.add_metric([job_id], float(latest["p_at_1"]))
            if latest.get("p_at_5") is not None:
                p5.add_metric([job_id], float(latest["p_at_5"]))
        for state, n in counts.items():
            states.add_metric([str(state)], n)
        yield from (rate, p1, p5, steps, states)


class Telemetry:
    def __init__(self, db: Database):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "slide_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "slide_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.predict_requests = Counter(
            "slide_predict_requests", "Predict requests", ["model_id", "mode"], registry=self.registry
        )
        self.predicted_instances = Counter(
            "slide_predicted_instances", "Instances predicted", ["model_id", "mode"], registry=self.registry
        )
        self.predict_latency = Histogram(
            "slide_predict_duration_seconds",
            "Model time per predict request",
            ["mode"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.registry.register(JobCollector(db))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_predict(self, model_id: str, mode: str, n: int, seconds: float) -> None:
        self.predict_requests.labels(model_id, mode).inc()
        self.predicted_instances.labels(model_id, mode).inc(n)
        self.predict_latency.labels(mode).observe(seconds)


def route_template(scope: dict[str, Any]) -> str:
    """The route a request was served by, as its template (`/v1/jobs/{job_id}`): bounded label values.

    FastAPI's API routes put themselves in the scope; the rest (/openapi.json, static files under a mount) are
    found by asking the app's route table, a mount being labelled `<prefix>/{path}`. `unmatched` = no route."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    app = scope.get("app")
    probe = {**scope, "root_path": ""}
    partial = None
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        try:
            match, _ = candidate.matches(probe)
        except Exception:  # noqa: BLE001 - a route that cannot judge this scope is not the one
            continue
        if match is Match.FULL:
            partial = candidate
            break
        if match is Match.PARTIAL and partial is None:  # the path matched, the method did not (a 405)
            partial = candidate
    if partial is None:
        return "unmatched"
    path = getattr(partial, "path", None) or "unmatched"
    return path + "/{path}" if isinstance(partial, Mount) else path


class MetricsMiddleware:
    """Pure ASGI middleware (streams untouched, SSE included): counts and times each HTTP request."""

    def __init__(self, app: Any, telemetry: Telemetry):
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.telemetry.observe_request(
                scope.get("method", ""), route_template(scope), status["code"], time.perf_counter() - start
            )
