"""Scripted subprocesses for the crash tests: a Python script (`start`) that reports where it is on stdout with
`say(word)` and, at the moment a test chose, says "ready" and waits for its SIGKILL with `hold()` (both defined for
every script), the test reading its lines (`readline`), killing it (`kill`) and cleaning up (`close`)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

from tests.e2e.server import ROOT

PRELUDE = r"""
import os, sys, time

def say(word):
    sys.stdout.write(word + "\n")
    sys.stdout.flush()

def hold():  # tell the test where we are, then wait for its SIGKILL
    say("ready")
    time.sleep(600)
"""


def start(script: str, *args: str) -> subprocess.Popen:
    """The script (after PRELUDE) in a new interpreter, with the project importable and args in sys.argv[1:]."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def readline(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The script's next line; fails if it says nothing in time or exits (with the end of its stderr)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the script said nothing in time"
    line = proc.stdout.readline().decode().strip()
    assert line, f"the script exited early (code {proc.poll()}): {proc.stderr.read().decode()[-3000:]}"
    return line


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def close(proc: subprocess.Popen) -> None:
    """Kill the script if it still runs, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()
