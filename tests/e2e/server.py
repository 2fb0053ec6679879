"""A real `uvicorn app.main:app` in a subprocess on a free port, for the end-to-end and fault tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.app.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`start()` waits for /readyz; `stop(sig)` signals and waits. In its own session (process group), so a test
    can kill the server and its trainers at once (`kill_group`), as a container runtime or systemd would."""

    def __init__(self, data_dir: Path, log_path: Path, preexec_fn: Callable[[], None] | None = None, **settings: str):
        self.data_dir = data_dir
        self.log_path = log_path
        self.preexec_fn = preexec_fn
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDE_")}
        env.update(
            {
                "SLIDE_DATA_DIR": str(self.data_dir),
                "SLIDE_SNAPSHOT_INTERVAL_S": "0.3",
                "SLIDE_PROGRESS_INTERVAL_S": "0.2",
                "SLIDE_SUPERVISOR_POLL_S": "0.1",
                "SLIDE_TRAINER_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                **self.settings,
            }
        )
        self.port = free_port()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self.preexec_fn,
        )
        log.close()

        def up() -> bool:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60, interval=0.2, what="the server to be ready")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"server did not exit after {sig!r}:\n{self.log()}") from None

    def kill_group(self) -> None:
        """SIGKILL to the server's whole process group: the server and every trainer it started."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop_gracefully(self) -> None:
        """SIGTERM; uvicorn finishes the lifespan (trainers checkpoint) and re-raises the signal on exit."""
        code = self.stop(signal.SIGTERM)
        assert code in (0, -signal.SIGTERM), self.log()
        assert "Application shutdown complete" in self.log(), self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def cleanup(self) -> None:
        """Teardown: nothing of this server's process group survives the test."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
