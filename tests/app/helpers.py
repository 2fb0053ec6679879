"""Helpers shared by tests/app and tests/e2e."""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def upload(client: Any, path: Path, name: str = "tiny", **kwargs: Any):
    data = path.read_bytes()
    headers = {"Content-Type": "text/plain"}
    if path.name.endswith(".gz"):
        headers = {"Content-Type": "application/gzip"}
    headers.update(kwargs.pop("headers", {}))
    return client.post("/v1/datasets", params={"name": name}, content=data, headers=headers, **kwargs)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1, what: str = "condition",
             diagnose: Callable[[], str] | None = None):
    """Poll until predicate() is truthy; returns its value. On timeout, `diagnose()` adds context."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{diagnose()}" if diagnose else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}{extra}")


def job_diagnosis(client: Any, settings: Any, job_id: str) -> Callable[[], str]:
    """For wait_for(diagnose=...): the job as the API shows it and the end of its trainer log."""

    def diagnose() -> str:
        job = client.get(f"/v1/jobs/{job_id}").text
        log = settings.job_dir(job_id) / "trainer.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no trainer log)"
        return f"job: {job}\ntrainer log:\n{tail}"

    return diagnose


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["type"]
    return body
