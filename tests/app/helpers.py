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


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["type"]
    return body
