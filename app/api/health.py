"""/healthz (the process answers) and /readyz (database, data dir and supervisor usable). No API key needed."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Request

from app.api.deps import ServicesDep
from app.errors import problem, problem_responses
from app.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: database, data dir, job supervisor",
    responses=problem_responses(503),
)
def readyz(request: Request, services: ServicesDep):
    checks: dict[str, str] = {}
    try:
        services.db.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"error: {type(exc).__name__}: {exc}"
    try:
        fd, path = tempfile.mkstemp(prefix=".readyz-", dir=services.settings.data_dir)
        os.close(fd)
        os.unlink(path)
        checks["data_dir"] = "ok"
    except OSError as exc:
        checks["data_dir"] = f"error: {exc}"
    sup = services.supervisor
    if not sup.active:
        checks["supervisor"] = "ok (another process supervises jobs)"
    elif sup.healthy and sup.error is None:
        checks["supervisor"] = "ok"
    else:
        checks["supervisor"] = f"error: {sup.error or 'the supervisor thread is not running'}"
    if all(v.startswith("ok") for v in checks.values()):
        return Readiness(status="ready", checks=checks)
    failing = ", ".join(f"{k} ({v})" for k, v in checks.items() if not v.startswith("ok"))
    return problem(request, 503, f"not ready: {failing}", slug="not-ready", title="Not ready", checks=checks)
