"""Helpers shared by tests/app and tests/e2e."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import merge_settings


def merged(*configs: dict[str, Any]) -> dict[str, Any]:
    """Job configs merged group by group, later ones winning: `merged(FAST, {"schedule": {"epochs": 1}})`."""
    return merge_settings(*configs)


def upload(client: Any, path: Path, name: str = "tiny", **kwargs: Any):
    data = path.read_bytes()
    headers = {"Content-Type": "text/plain"}
    if path.name.endswith(".gz"):
        headers = {"Content-Type": "application/gzip"}
    headers.update(kwargs.pop("headers", {}))
    return client.post("/v1/datasets", params={"name": name}, content=data, headers=headers, **kwargs)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: str = "condition",
    diagnose: Callable[[], str] | None = None,
):
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


# ------------------------------------------------------------------------------------------ bad-input helpers


@dataclass(frozen=True)
class DataState:
    """Everything a request could leave behind: every file and directory under the data dir (by content hash),
    and every row of every table. The SQLite files themselves are compared through their rows."""

    files: dict[str, str]
    rows: dict[str, list[str]]

    def diff(self, other: DataState) -> str:
        lines = []
        for path in sorted(self.files.keys() | other.files.keys()):
            if self.files.get(path) != other.files.get(path):
                what = "added" if path not in self.files else "removed" if path not in other.files else "changed"
                lines.append(f"file {what}: {path}")
        for table in sorted(self.rows.keys() | other.rows.keys()):
            before, after = self.rows.get(table, []), other.rows.get(table, [])
            for row in sorted(set(after) - set(before)):
                lines.append(f"row added to {table}: {row[:200]}")
            for row in sorted(set(before) - set(after)):
                lines.append(f"row gone from {table}: {row[:200]}")
        return "\n".join(lines)


def data_state(client: Any) -> DataState:
    from sqlalchemy import select
    from sqlalchemy.engine import make_url

    from app.db import Base

    services = client.app.state.services
    root: Path = services.settings.data_dir
    database = make_url(services.settings.database_url).database or ""
    db_files = {database, database + "-wal", database + "-shm", database + "-journal"}
    files: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames:
            files[os.path.relpath(os.path.join(directory, name), root) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(directory, name)
            if path not in db_files:
                files[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with services.db.engine.connect() as conn:
        rows = {t.name: sorted(repr(tuple(r)) for r in conn.execute(select(t))) for t in Base.metadata.sorted_tables}
    return DataState(files, rows)


def assert_unchanged(before: DataState, after: DataState) -> None:
    assert before == after, "the request left the data dir or the database changed:\n" + before.diff(after)


@dataclass
class StreamedResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    bytes_read: int
    """How much of the request body the app pulled before it answered."""
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def asgi_request(
    client: Any,
    method: str,
    path: str,
    chunks: Iterable[bytes] = (),
    headers: dict[str, str] | None = None,
    query: str = "",
) -> StreamedResponse:
    """Call the app as a server would: `path` reaches it exactly as given (percent-decoded, dot segments and all;
    the TestClient's httpx would normalise `..` away), and the body goes one ASGI message per chunk, pulled only
    when the app asks (as a slow upload arrives), counting how much it read. The TestClient hands it all at once."""
    from urllib.parse import quote

    import anyio

    pending = iter(chunks)
    pulled = 0
    done = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled, done
        if done:
            return {"type": "http.disconnect"}
        chunk = next(pending, None)
        if chunk is None:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": quote(path, safe="/").encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    start = time.perf_counter()
    try:
        anyio.run(client.app, scope, receive, send)
    except Exception:  # Starlette re-raises after sending its 500: that answer is what a client gets
        if not messages:
            raise
    seconds = time.perf_counter() - start
    head = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return StreamedResponse(
        head["status"],
        {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head["headers"]},
        body,
        pulled,
        seconds,
    )


def all_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, included routers too, as its route table has them."""
    try:  # FastAPI >= 0.16x keeps included routers nested; this is what it builds the OpenAPI document from
        from fastapi.routing import iter_route_contexts

        routes: Iterable[Any] = iter_route_contexts(app.routes)
    except ImportError:  # older FastAPI flattens them into app.routes
        routes = app.routes
    return sorted(
        (method, route.path)
        for route in routes
        for method in (getattr(route, "methods", None) or ())
        if method != "HEAD"
    )


def copy_trained(trained: Any, settings: Any) -> Any:
    """The data dir of a trained fixture (tests/app/conftest.py) copied to settings.data_dir, before a service
    starts on it; returns the fixture (its ids hold in the copy)."""
    import shutil

    shutil.copytree(trained.data_dir, settings.data_dir)
    return trained
