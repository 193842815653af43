"""docker-compose.yml checked structurally (no docker engine here): every service, volume,
healthcheck and variable the docs mention exists, and versions, ports and names agree with
pyproject.toml and server/stack.py, so the compose stack and the script stack stay in step."""
from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import version

import pytest
import yaml

from server import stack
from tests.conftest import REPO


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(read("docker-compose.yml"))


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    deps = tomllib.loads(read("pyproject.toml"))["project"]["dependencies"]
    return {re.split(r"[\[<>=]", d)[0]: d for d in deps}


def dockerfile_base(path: str) -> str:
    return next(line.split()[1] for line in read(path).splitlines() if line.startswith("FROM "))


def test_services_and_volumes(compose):
    assert set(compose["services"]) == {"postgres", "mlflow", "ray-head", "ray-worker", "search"}
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts", "ray_results"}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in compose["volumes"], (name, volume)
            if source.startswith("./"):
                assert os.path.exists(os.path.join(REPO, source)), (name, volume)


def test_postgres(compose):
    pg = compose["services"]["postgres"]
    assert pg["image"] == "postgres:16"
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]
    assert pg["environment"]["POSTGRES_USER"] == stack.PG_USER and pg["environment"]["POSTGRES_DB"] == stack.PG_DB
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["ports"] == [f"127.0.0.1:{stack.PG_PORT}:5432"]       # the script stack's port
    initdb = read("server/initdb/10-mlflow-auth.sql")
    assert f"CREATE DATABASE {stack.PG_AUTH_DB} OWNER {stack.PG_USER}" in initdb


def test_mlflow_server(compose, pins):
    ml = compose["services"]["mlflow"]
    assert ml["depends_on"]["postgres"]["condition"] == "service_healthy"
    base = dockerfile_base(ml["build"]["dockerfile"])
    installed = version("mlflow")
    assert base == f"ghcr.io/mlflow/mlflow:v{installed}", (base, installed)
    assert pins["mlflow"] == "mlflow[auth]>=3.17,<3.18" and installed.startswith("3.17.")
    assert "psycopg2-binary" in read(ml["build"]["dockerfile"])   # the official image lacks it
    assert ml["image"].endswith(installed)
    command = ml["command"][-1]
    for piece in ("--serve-artifacts", "--app-name basic-auth", f"--port {stack.MLFLOW_PORT}",
                  f"/{stack.PG_DB}\"", f"/{stack.PG_AUTH_DB}\\n"):
        assert piece in command, piece
    hosts = re.search(r'--allowed-hosts "([^"]+)"', command).group(1).split(",")
    assert {"mlflow", "mlflow:*", *stack.LOCAL_HOSTS} <= set(hosts)
    assert ml["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    probe = " ".join(ml["healthcheck"]["test"])
    assert "/api/2.0/mlflow/" in probe and "'Host': 'mlflow:5000'" in probe and "Authorization" in probe
    assert ml["ports"] == [f"127.0.0.1:{stack.MLFLOW_PORT}:{stack.MLFLOW_PORT}"]


def test_ray_nodes_and_driver(compose, pins):
    services = compose["services"]
    ray_pin = pins["ray"].split("==")[1]
    python = tomllib.loads(read("pyproject.toml"))["project"]["requires-python"]
    base = dockerfile_base("server/tailtune.Dockerfile")
    assert base == f"rayproject/ray:{ray_pin}-py311-gpu" and ">=3.11" in python
    for name in ("ray-head", "ray-worker", "search"):
        service = services[name]
        assert service["build"]["dockerfile"] == "server/tailtune.Dockerfile"
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "${RAY_AUTH_TOKEN" in env["RAY_AUTH_TOKEN"]
        assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{stack.MLFLOW_PORT}"
        assert "ray_results:/srv/ray_results" in service["volumes"]
    assert "--head --port=6379" in services["ray-head"]["command"]
    assert "ray status" in " ".join(services["ray-head"]["healthcheck"]["test"])
    worker = services["ray-worker"]
    assert "--address=ray-head:6379" in worker["command"]
    assert "container_name" not in worker and "ports" not in worker    # so --scale works
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    driver = services["search"]["entrypoint"]
    assert driver[:2] == ["python", "search/run.py"]
    assert driver[driver.index("--address") + 1] == "ray-head:6379"
    assert driver[driver.index("--storage") + 1] == "/srv/ray_results"


def test_every_variable_is_known_and_documented(compose):
    text = read("docker-compose.yml")
    used = set(re.findall(r"\$\{(\w+)", text)) | set(re.findall(r"\$\$(\w+)", text))
    example = {line.split("=")[0] for line in read(".env.example").splitlines()
               if line and not line.startswith("#")}
    assert used <= set(stack.SECRETS), used - set(stack.SECRETS)
    assert example == set(stack.SECRETS)
    readme = read("README.md")
    for name in stack.SECRETS:
        assert name in readme, name
    for phrase in ("docker compose up", "--scale ray-worker=", "python server/stack.py start",
                   "python server/stack.py health", "python server/stack.py stop",
                   "ray start --head", "RAY_AUTH_TOKEN", "--address"):
        assert phrase in readme, phrase


def test_env_file_is_ignored_by_git():
    ignored = read(".gitignore").splitlines()
    assert ".env" in ignored and "/tailtune-server/" in ignored
