"""/metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import TelemetryDep
from app.errors import problem_responses

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}, **problem_responses(401)},
)
def metrics(telemetry: TelemetryDep) -> Response:
    """Request counts and latency by route, predictions per model, and per job: training samples/s, latest
    P@1 / P@5, steps; jobs by state."""
    return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)
