"""Fixtures for the fault tests: real servers that are always killed at teardown, and process inspection."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import Server


@pytest.fixture
def servers(tmp_path: Path, warm_engine: None) -> Iterator[Callable[..., Server]]:
    """`servers(data_dir, **SLIDE_settings)` starts a real uvicorn server (its own log file each time); every one
    started, and whatever is left of its process group, is killed at teardown."""
    started: list[Server] = []

    def start(data_dir: Path, preexec_fn: Callable[[], None] | None = None, **settings: Any) -> Server:
        log = tmp_path / f"server-{len(started)}.log"
        server = Server(data_dir, log, preexec_fn=preexec_fn, **{k: str(v) for k, v in settings.items()})
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.cleanup()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, grandchildren...), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier and child not in found}
        found |= frontier
    return {p for p in found if alive(p)}
