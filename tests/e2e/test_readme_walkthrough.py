"""The README's curl walk-through, run as written and in order against a real server.

Each command of the block runs in bash as the README shows it; only the host (a free port instead of 8000), the
scratch directory (/tmp/tiny) and the placeholders change: <TRAIN>, <TEST> and <JOB> take the ids the commands
annotated `# -> {"id": "<X>", ...}` answered. Every HTTP answer must be a success, except where the README says a
command answers otherwise for a while (predict: 503 until the first snapshot; the job is `stopped` "a moment
later"), which are retried until they do what it says.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.helpers import wait_for
from tests.e2e.server import ROOT, Server

README = ROOT / "README.md"


def walkthrough() -> list[str]:
    """The commands of the README's 'Walk-through with curl' block, continuation lines joined, each with the
    comment lines that follow it."""
    text = README.read_text()
    section = text[text.index("## Walk-through with curl") :]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("\n```", start)]
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if pending:
            pending += "\n" + line
        elif line.strip().startswith("#"):
            if commands and line.startswith(" "):  # an indented comment annotates the command above
                commands[-1] += "\n" + line
            continue
        elif line.strip():
            pending = line
        if pending and not pending.endswith("\\"):
            commands.append(pending)
            pending = ""
    return commands


def test_readme_walkthrough_runs_as_written(tmp_path: Path, warm_engine: None) -> None:
    if shutil.which("curl") is None:
        pytest.fail("the README walk-through test needs curl (apt-get install curl)", pytrace=False)
    commands = walkthrough()
    assert len(commands) >= 10 and any("/stop" in c for c in commands) and any("/resume" in c for c in commands)
    server = Server(tmp_path / "data", tmp_path / "server.log").start()
    ids: dict[str, str] = {}
    try:
        for command in commands:
            run = command.replace("localhost:8000", f"127.0.0.1:{server.port}")
            run = run.replace(".venv/bin/slide", str(Path(sys.executable).parent / "slide"))
            run = run.replace("/tmp/tiny", str(tmp_path / "tiny"))
            for name, value in ids.items():
                run = run.replace(f"<{name}>", value)
            assert not re.search(r"<[A-Z]+>", run.split("#")[0]), f"a placeholder nobody answered: {run}"
            is_curl = run.lstrip().startswith("curl")
            streams = " -N " in run
            if is_curl and not streams:
                run = run.replace("curl -s", "curl -s -w '\\n%{http_code}'", 1)

            def attempt(run: str = run, is_curl: bool = is_curl, streams: bool = streams) -> tuple[int, str, int]:
                done = subprocess.run(["bash", "-c", run], cwd=ROOT, capture_output=True, text=True, timeout=120)
                out = done.stdout
                status = 0
                if is_curl and not streams:
                    out, _, code = out.rpartition("\n")
                    status = int(code)
                return done.returncode, out, status

            if "/predict" in run:  # "503 until its first snapshot"
                code, out, status = wait_for(
                    lambda: (r := attempt())[2] == 200 and r, timeout=60, what="the first snapshot", interval=0.5
                )
            elif '"stopped" a moment later' in run:
                code, out, status = wait_for(
                    lambda: (r := attempt())[2] == 200 and json.loads(r[1])["state"] == "stopped" and r,
                    timeout=60,
                    what="the job to be stopped",
                    interval=0.3,
                )
            else:
                code, out, status = attempt()
            if streams:  # --max-time ends it: curl's exit code 28
                assert code in (0, 28) and "event: progress" in out, (run, code, out)
                continue
            assert code == 0, (run, code, out, server.log())
            if is_curl:
                assert 200 <= status < 300, (run, status, out)
            if "/stop" in run:
                assert status == 202 and json.loads(out)["state"] in ("stopping", "stopped"), out
            if "/resume" in run:
                assert status == 202 and json.loads(out)["state"] == "queued", out
            for name in re.findall(r'# -> \{"id": "<([A-Z]+)>"', command):
                ids[name] = json.loads(out)["id"]
        assert set(ids) == {"TRAIN", "TEST", "JOB"}, ids
    finally:
        server.cleanup()
