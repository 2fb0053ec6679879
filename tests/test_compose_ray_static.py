"""Static checks of the compose file's ray profile (`docker compose --profile ray up`): a Ray head, Ray workers,
PostgreSQL and the service that drives the cluster, on one shared volume. No Docker engine is used: what
`compose up` would trip over (a port the head does not open, a volume one node lacks, credentials that differ,
an extra the image does not install) is checked here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.test_docker_static import COMPOSE, DOCKERFILE, ROOT, data_dir, instr

PROFILE = "ray"
RAY_SERVICES = ("ray-head", "ray-worker", "postgres", "slide-ray")
RAY_NODES = ("ray-head", "ray-worker")
ENV_FILE = ROOT / "docker" / "ray.env"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_values() -> dict[str, str]:
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line), f"ray.env: expected KEY=value, got {line!r}"
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _flag(command: list[str], name: str) -> str:
    for arg in command:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{command} has no --{name}=")


def test_the_profile_has_head_workers_database_and_service(services):
    for name in RAY_SERVICES:
        assert name in services, f"the ray profile needs a {name} service"
        assert services[name].get("profiles") == [PROFILE], f"{name} must start only with --profile {PROFILE}"
    assert "profiles" not in services["slide"], "plain `docker compose up` must still start the service alone"
    assert services["ray-worker"].get("deploy", {}).get("replicas", 1) >= 1


def test_ray_images_are_built_from_this_dockerfile_with_the_ray_extra(services):
    import tomllib

    head = services["ray-head"]
    build = head["build"]
    assert (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    extras = [e for e in build["args"]["EXTRAS"].split(",") if e]
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"ray", "postgres"} <= set(extras) and set(extras) <= set(optional)
    for name in ("ray-worker", "slide-ray"):
        assert services[name]["image"] == head["image"], f"{name} must run the image the head builds (one Ray)"
        assert "build" not in services[name]
    assert head["image"] != services["slide"]["image"], "the ray image must not replace the plain one"


def test_dockerfile_installs_the_extras_it_is_given(tmp_path):
    """Run the Dockerfile's requirements step (python -c ...) with EXTRAS=ray,postgres against pyproject.toml."""
    assert any(re.fullmatch(r'EXTRAS=("")?', a.strip()) for a in instr("ARG")), "the Dockerfile must declare ARG EXTRAS"
    (run,) = [r for r in instr("RUN") if "requirements.txt" in r and "tomllib" in r]
    command = shlex.split(run.split(">", 1)[0])
    assert command[:2] == ["python", "-c"]
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    out = subprocess.run(
        [sys.executable, "-c", command[2]],
        cwd=tmp_path,
        env={**os.environ, "EXTRAS": "ray,postgres"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert any(r.startswith("ray") for r in out) and any(r.startswith("psycopg") for r in out)
    env = {**os.environ, "EXTRAS": ""}
    plain = subprocess.run(
        [sys.executable, "-c", command[2]], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert not any(r.startswith("ray") for r in plain), "without EXTRAS the image must not install Ray"


def test_the_service_reaches_the_head_and_the_workers_join_it(services):
    env = env_values()
    address = urlparse(env["SLIDE_RAY_ADDRESS"])
    head = services["ray-head"]["command"]
    assert "--head" in head and "--block" in head
    assert address.scheme == "ray" and address.hostname == "ray-head"
    assert str(address.port) == _flag(head, "ray-client-server-port")
    worker = services["ray-worker"]["command"]
    host, port = _flag(worker, "address").split(":")
    assert host == "ray-head" and port == _flag(head, "port")
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "healthcheck" in services["ray-head"]


def test_nodes_and_service_share_one_volume_on_the_data_dir(compose, services):
    mounts = {}
    for name in ("slide-ray", *RAY_NODES):
        found = [str(v).split(":")[0] for v in services[name]["volumes"] if str(v).split(":")[1] == data_dir()]
        assert found, f"{name} mounts nothing on the data dir {data_dir()}"
        mounts[name] = found[0]
    assert len(set(mounts.values())) == 1, f"one volume for the data dir everywhere, got {mounts}"
    (volume,) = set(mounts.values())
    assert volume in compose["volumes"]
    assert volume not in [str(v).split(":")[0] for v in services["slide"]["volumes"]], (
        "two services on one data dir would share its supervisor lock"
    )
    for name in RAY_NODES:
        assert services[name].get("shm_size"), f"{name}: Ray's object store lives in /dev/shm"


def test_database_url_matches_the_postgres_service(services):
    url = urlparse(env_values()["SLIDE_DATABASE_URL"])
    pg = services["postgres"]["environment"]
    assert url.scheme == "postgresql+psycopg"
    assert (url.username, url.password, url.hostname, url.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        "postgres",
        pg["POSTGRES_DB"],
    )
    assert services["slide-ray"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_ray_env_names_real_settings_with_valid_values():
    from app.settings import Settings

    values = env_values()
    fields = {k.removeprefix("SLIDE_").lower(): v for k, v in values.items() if k.startswith("SLIDE_")}
    unknown = sorted(f for f in fields if f not in Settings.model_fields)
    assert not unknown, f"ray.env names settings the service does not have: {unknown}"
    Settings(_env_file=None, **fields)
    assert fields["data_dir"] == data_dir()


def test_both_services_publish_8000_on_different_host_ports(services):
    def host_ports(service: dict) -> dict[str, str]:
        return {str(p).split(":")[-1]: str(p).split(":")[0] for p in service["ports"]}

    plain, ray = host_ports(services["slide"]), host_ports(services["slide-ray"])
    assert "8000" in ray and ray["8000"] != plain["8000"]
    hc = services["slide-ray"]["healthcheck"]["test"]
    assert "/healthz" in " ".join(hc)


def test_readme_says_how_to_use_an_existing_cluster():
    text = (ROOT / "README.md").read_text()
    assert "--profile ray" in text and "SLIDE_RAY_ADDRESS" in text and "KubeRay" in text
    assert Path(ROOT / "docker" / "ray.env").is_file()
