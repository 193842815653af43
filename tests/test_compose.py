"""The compose files checked structurally (fast, no docker engine needed): every service, volume,
healthcheck and variable the docs mention exists; versions, ports and names agree with
pyproject.toml and server/stack.py, so the compose stack and the script stack stay in step.
The stack itself is built and run for real by the CI stage `.ci/compose`."""
from __future__ import annotations

import os
import re
import tomllib

import pytest
import yaml

from server import stack
from tests.conftest import REPO

SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "search"}
RAY_SERVICES = ("ray-head", "ray-worker", "search")
# Variables the compose files read besides the secrets: where the data is, and (CI override) the
# local base image, the torch pin and MLflow's host port.
SETTINGS = {"TAILTUNE_DATA_DIR"}
CI_SETTINGS = {"TAILTUNE_BASE_IMAGE", "TAILTUNE_TORCH", "TAILTUNE_MLFLOW_PORT"}


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: `!reset` (drop the base value) and `!override` (replace it)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: ("!reset", loader.construct_sequence(node)))
ComposeLoader.add_constructor("!override", lambda loader, node: ("!override", loader.construct_sequence(node)))


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def load(path: str) -> dict:
    return yaml.load(read(path), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def ci() -> dict:
    return load("docker-compose.ci.yml")


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads(read("pyproject.toml"))["project"]


def dockerfile_args(path: str) -> dict[str, str]:
    return dict(re.findall(r'^ARG (\w+)=(.*)$', read(path), re.M))


def test_services_and_volumes(compose):
    assert set(compose["services"]) == SERVICES
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts", "ray_results", "cache"}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if not volume.startswith("${") else volume.split("}")[0] + "}"
            if source.startswith("${TAILTUNE_DATA_DIR"):
                assert volume.endswith(":/data:ro"), (name, volume)   # searches read the archives only
                continue
            assert source.startswith("./") or source in compose["volumes"], (name, volume)
            if source.startswith("./"):
                assert os.path.exists(os.path.join(REPO, source)), (name, volume)


def test_postgres(compose, ci):
    pg = compose["services"]["postgres"]
    assert pg["image"] == "postgres:16"
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]
    assert pg["environment"]["POSTGRES_USER"] == stack.PG_USER and pg["environment"]["POSTGRES_DB"] == stack.PG_DB
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["ports"] == [f"127.0.0.1:{stack.PG_PORT}:5432"]       # the script stack's port
    initdb = read("server/initdb/10-mlflow-auth.sql")
    assert f"CREATE DATABASE {stack.PG_AUTH_DB} OWNER {stack.PG_USER}" in initdb
    # Without an image hub, PostgreSQL is built from the same base and honours the same contract.
    built = ci["services"]["postgres"]["build"]
    assert built["dockerfile"] == "server/postgres.Dockerfile" and "TAILTUNE_BASE_IMAGE" in built["args"]["BASE_IMAGE"]
    dockerfile = read("server/postgres.Dockerfile")
    assert "PGDATA=/var/lib/postgresql/data" in dockerfile and "postgresql-15" in dockerfile
    entrypoint = read("server/postgres-entrypoint.sh")
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "/docker-entrypoint-initdb.d/*.sql"):
        assert name in entrypoint, name


def test_one_image_for_mlflow_ray_and_the_driver(compose, project):
    services = compose["services"]
    ml = services["mlflow"]
    assert ml["build"]["dockerfile"] == "server/Dockerfile"
    assert ml["image"] == f"tailtune:{project['version']}"
    for name in RAY_SERVICES:   # built once, by mlflow; compose does not pull an image it builds
        assert services[name]["image"] == ml["image"] and "build" not in services[name], name
    args = dockerfile_args("server/Dockerfile")
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm"     # the official image by default
    assert ">=3.11" in project["requires-python"]
    dockerfile = read("server/Dockerfile")
    assert "sys.version_info[:2] == (3, 11)" in dockerfile      # Debian bases bring python3 3.11
    assert "pip install" in dockerfile and "-e ." in dockerfile  # pyproject.toml's pins, nothing else
    # Build-time extras (wheels, pip's CA bundle) are mounted for the install step, never copied.
    assert "--mount=type=bind,source=server/image" in dockerfile
    assert not re.search(r"^COPY server(/image)?/? ", dockerfile, re.M)
    ignored = read(".gitignore").splitlines()
    assert "/server/image/*" in ignored and "!/server/image/README.md" in ignored
    assert {".venv", ".git", ".ci-work"} <= set(read(".dockerignore").splitlines())


def test_mlflow_server(compose):
    ml = compose["services"]["mlflow"]
    assert ml["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = ml["command"][-1]
    for piece in ("--serve-artifacts", "--app-name basic-auth", f"--port {stack.MLFLOW_PORT}",
                  f"/{stack.PG_DB}\"", f"/{stack.PG_AUTH_DB}\\n", "--workers 2"):
        assert piece in command, piece
    assert ml["environment"]["TAILTUNE_PG_PASSWORD"] == "${TAILTUNE_PG_PASSWORD}"   # works with --env-file
    hosts = re.search(r'--allowed-hosts "([^"]+)"', command).group(1).split(",")
    assert {"mlflow", "mlflow:*", *stack.LOCAL_HOSTS} <= set(hosts)
    assert ml["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    probe = " ".join(ml["healthcheck"]["test"])
    assert "/api/2.0/mlflow/" in probe and "'Host': 'mlflow:5000'" in probe and "Authorization" in probe
    assert ml["ports"] == [f"127.0.0.1:{stack.MLFLOW_PORT}:{stack.MLFLOW_PORT}"]


def test_ray_nodes_and_driver(compose):
    services = compose["services"]
    for name in RAY_SERVICES:
        service = services[name]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "${RAY_AUTH_TOKEN" in env["RAY_AUTH_TOKEN"]
        assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{stack.MLFLOW_PORT}"
        assert env["TAILTUNE_DATA_DIR"] == "/data" and env["TAILTUNE_CACHE_DIR"] == "/srv/cache"
        assert {"ray_results:/srv/ray_results", "cache:/srv/cache"} <= set(service["volumes"])
        assert service["shm_size"]
    head = services["ray-head"]["command"]
    assert "--head --port=6379" in head and "--num-cpus=0" in head   # trials run on workers only
    assert "ray status" in " ".join(services["ray-head"]["healthcheck"]["test"])
    worker = services["ray-worker"]
    assert "--address=ray-head:6379" in worker["command"]
    assert "container_name" not in worker and "ports" not in worker    # so --scale works
    assert "deploy" not in worker                                       # CPU-only machines start it
    gpu = load("docker-compose.gpu.yml")["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    # The driver joins the cluster as a node of its own (ray.init needs a local raylet), holding
    # no CPUs or GPUs, then searches with --address auto.
    search = services["search"]
    assert search["profiles"] == ["tools"]
    assert search["entrypoint"] == ["sh", "server/search-node.sh", "ray-head:6379", "/srv/ray_results"]
    script = read("server/search-node.sh")
    assert 'ray start --address="$head" --num-cpus=0 --num-gpus=0' in script
    assert 'search/run.py --address auto --storage "$storage" "$@"' in script
    assert "ray stop" in script
    assert "server/search-node.sh" in read("server/Dockerfile")


def test_ci_override_builds_from_a_local_base_and_publishes_on_localhost(compose, ci):
    assert set(ci["services"]) <= SERVICES
    for name in ("postgres", "mlflow"):
        build = ci["services"][name]["build"]
        assert build["network"] == "host"   # the CI engine runs without iptables (no NAT)
        assert "TAILTUNE_BASE_IMAGE" in build["args"]["BASE_IMAGE"]
    assert "TAILTUNE_TORCH" in ci["services"]["mlflow"]["build"]["args"]["TORCH"]
    tag, ports = ci["services"]["mlflow"]["ports"]
    assert tag == "!override" and len(ports) == 1 and ports[0].startswith("127.0.0.1:")
    for name in ("postgres", "ray-head"):
        assert ci["services"][name]["ports"] == ("!reset", [])
    for name, service in compose["services"].items():   # never beyond this machine by default
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_every_variable_is_known_and_documented(compose):
    text = read("docker-compose.yml")
    used = set(re.findall(r"\$\{(\w+)", text)) | set(re.findall(r"\$\$(\w+)", text))
    assert used <= set(stack.SECRETS) | SETTINGS, used - set(stack.SECRETS) - SETTINGS
    ci_used = set(re.findall(r"\$\{(\w+)", read("docker-compose.ci.yml")))
    assert ci_used <= CI_SETTINGS, ci_used - CI_SETTINGS
    example = {line.split("=")[0] for line in read(".env.example").splitlines()
               if line and not line.startswith("#")}
    assert example == set(stack.SECRETS)
    readme = read("README.md")
    for name in (*stack.SECRETS, *SETTINGS, *CI_SETTINGS):
        assert name in readme, name
    for phrase in ("docker compose up", "--scale ray-worker=", "python server/stack.py start",
                   "python server/stack.py health", "python server/stack.py stop",
                   "ray start --head", "RAY_AUTH_TOKEN", "--address", "docker-compose.ci.yml",
                   "docker-compose.gpu.yml", "bash .ci/compose"):
        assert phrase in readme, phrase


def test_ci_runs_the_compose_stage():
    run = read(".ci/run")
    assert "bash .ci/compose" in run or ".ci/compose" in run
    stage = read(".ci/compose")
    for piece in ("set -euo pipefail", "--iptables=false", "trap cleanup EXIT", 'kill "$dockerd_pid"',
                  "debootstrap --variant=minbase bookworm", "docker import", "up -d --wait",
                  "run --rm -T search darl --preset smoke", 'docker stop "$victim"', "down -v",
                  "compose_check.py"):
        assert piece in stage, piece


def test_env_file_is_ignored_by_git():
    ignored = read(".gitignore").splitlines()
    assert ".env" in ignored and "/tailtune-server/" in ignored
