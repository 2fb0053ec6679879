"""/healthz (the process answers) and /readyz (database, data dir and supervisor usable). No API key needed."""

from __future__ import annotations

import errno
import os
import tempfile

from fastapi import APIRouter, Request

from app.api.deps import ServicesDep
from app.errors import ProblemResponse, problem, problem_responses
from app.schemas import Health, Readiness
from app.settings import Settings
from engine.memory import format_bytes

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
def readyz(request: Request, services: ServicesDep) -> Readiness | ProblemResponse:
    checks: dict[str, str] = {}
    try:
        services.db.ping()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"error: {type(exc).__name__}: {exc}"
    checks["data_dir"] = data_dir_check(services.settings)
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


def data_dir_check(settings: Settings) -> str:
    """'ok', or 'error: ...' naming why the data dir cannot take writes: read-only, full (less than
    SLIDE_MIN_FREE_DISK free), or a write that fails (with its errno name)."""
    data_dir = settings.data_dir
    try:
        st = os.statvfs(data_dir)
    except OSError as exc:
        return f"error: {errno.errorcode.get(exc.errno or 0, 'OSError')}: {exc}"
    if st.f_flag & os.ST_RDONLY:
        return f"error: read-only (EROFS): {data_dir} is on a read-only file system"
    free = st.f_bavail * st.f_frsize
    if free < settings.min_free_disk:
        return (
            f"error: full (ENOSPC): {format_bytes(free)} free on the file system of {data_dir}, less than "
            f"SLIDE_MIN_FREE_DISK = {format_bytes(settings.min_free_disk)}; free space for uploads and snapshots"
        )
    try:
        fd, path = tempfile.mkstemp(prefix=".readyz-", dir=data_dir)
        os.close(fd)
        os.unlink(path)
    except OSError as exc:
        return f"error: {errno.errorcode.get(exc.errno or 0, 'OSError')}: {exc}"
    return "ok"
