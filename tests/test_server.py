"""The shared stack for real: server/stack.py starts PostgreSQL and an MLflow server on it, reports
health, stops, and starts again with every run, metric, artifact and registered model intact;
exposed, it asks for credentials and checks Host headers."""
from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port, run_stack as stack, world_readable_tmp



class Doubler(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True   # a test model; no signature needed
    def predict(self, context, model_input, params=None):
        return model_input * 2


@pytest.fixture
def root():
    path = world_readable_tmp()
    yield path
    stack("stop", path)


def api(uri: str, host: str | None = None, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    if host:
        request.add_header("Host", host)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.integration
def test_stack_restarts_with_everything_intact(root, tmp_path):
    ports = ["--port", str(free_port()), "--pg-port", str(free_port())]
    first = stack("start", root, *ports)
    assert first.returncode == 0, first.stderr
    uri = first.stdout.split("MLFLOW_TRACKING_URI=")[1].split()[0]
    env_file = open(os.path.join(root, ".env")).read()
    assert "TAILTUNE_PG_PASSWORD=" in env_file and oct(os.stat(os.path.join(root, ".env")).st_mode)[-3:] == "600"
    assert stack("health", root).returncode == 0

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("stack-restart")
    with mlflow.start_run(run_name="kept") as run:
        for step in range(1, 4):
            mlflow.log_metric("val_score", step / 10, step=step)
        mlflow.log_param("seed", 7)
        (tmp_path / "note.txt").write_text("artifact body")
        mlflow.log_artifact(str(tmp_path / "note.txt"))
        info = mlflow.pyfunc.log_model(name="model", python_model=Doubler(), pip_requirements=[])
    version = mlflow.register_model(info.model_uri, "stack-doubler")
    MlflowClient().set_registered_model_alias("stack-doubler", "champion", version.version)

    again = stack("start", root)                         # harmless while running
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr
    assert stack("stop", root).returncode == 0
    down = stack("health", root)
    assert down.returncode == 1 and "postgres: DOWN" in down.stdout and "mlflow: DOWN" in down.stdout
    restarted = stack("start", root)
    assert restarted.returncode == 0, restarted.stderr

    client = MlflowClient(uri)
    kept = client.get_run(run.info.run_id)
    assert kept.data.params["seed"] == "7"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_score")] == [0.1, 0.2, 0.3]
    path = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
    assert open(path).read() == "artifact body"
    model = mlflow.pyfunc.load_model("models:/stack-doubler@champion")
    assert list(model.predict(np.array([1.0, 2.5]))) == [2.0, 5.0]


@pytest.mark.integration
def test_exposed_stack_asks_for_credentials_and_checks_hosts(root):
    port = free_port()
    started = stack("start", root, "--port", str(port), "--pg-port", str(free_port()),
                    "--expose", "--public-name", "tailtune-mlflow")
    assert started.returncode == 0, started.stderr
    assert "basic auth on" in started.stdout
    password = [line.strip().split("=", 1)[1] for line in open(os.path.join(root, ".env"))
                if line.startswith("MLFLOW_AUTH_ADMIN_PASSWORD=")][0]
    uri = f"http://127.0.0.1:{port}"
    assert api(uri) == 401
    assert api(uri, auth=("admin", "wrong")) == 401
    assert api(uri, auth=("admin", password)) == 200
    assert api(uri, host=f"tailtune-mlflow:{port}", auth=("admin", password)) == 200
    assert api(uri, host="attacker.example", auth=("admin", password)) == 403
    assert stack("health", root).returncode == 0


def test_public_name_without_expose_is_a_usage_error(tmp_path):
    proc = stack("start", str(tmp_path), "--public-name", "x")
    assert proc.returncode == 2 and "--public-name only makes sense with --expose" in proc.stderr


def test_health_of_a_stack_never_started(tmp_path):
    proc = stack("health", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: no stack in {tmp_path}/state (run `python server/stack.py start` first)"]
