"""Faults of the tracking stack, caused for real: the whole stack (MLflow server and PostgreSQL)
restarted in the middle of a search. The search finishes, no per-epoch metric is lost, and the
champion it registers can be pulled over HTTP from another directory."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, free_port, run_stack as stack, world_readable_tmp

RUN = os.path.join(REPO, "search", "run.py")
EPOCHS = 2


@pytest.fixture
def own_stack():
    root = world_readable_tmp()
    started = stack("start", root, "--port", str(free_port()), "--pg-port", str(free_port()), "--workers", "1")
    assert started.returncode == 0, started.stderr
    yield root, started.stdout.split("MLFLOW_TRACKING_URI=")[1].split()[0]
    stack("stop", root)


@pytest.mark.integration
def test_search_survives_a_tracking_stack_restart(own_stack, tmp_path, data_dir, cache_dir):
    root, uri = own_stack
    name = "restart-it"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}   # the env route
    proc = subprocess.Popen(
        [sys.executable, RUN, "ce", "--trials", "2", "--epochs", str(EPOCHS), "--grace-period", str(EPOCHS),
         "--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download", "--test-ood", "cifar100,mnist",
         "--name", name, "--storage", str(tmp_path / "ray_results")],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:               # restart everything once the first epoch is reported
        lines.append(line)
        if f"epoch 1/{EPOCHS}" in line:
            assert stack("stop", root).returncode == 0
            assert stack("health", root).returncode == 1
            restarted = stack("start", root)
            assert restarted.returncode == 0, restarted.stderr
            break
    rest, _ = proc.communicate(timeout=900)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-5000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tailtune/ce/cifar10-lt-ir100")
    parent = client.search_runs([experiment.experiment_id], f"tags.`tailtune.search` = '{name}'")[0]
    assert parent.info.status == "FINISHED"
    kids = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 2
    for kid in kids:
        for key in ("val_score", "val_acc", "train_loss"):
            steps = [m.step for m in client.get_metric_history(kid.info.run_id, key)]
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)
        assert np.isfinite(kid.data.metrics["test_auroc"])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    np.save(elsewhere / "x.npy", images)
    pulled = subprocess.run([sys.executable, os.path.join(REPO, "search", "pull.py"),
                             "ce-cifar10-lt-ir100", "x.npy"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    assert "ood_score" in pulled.stdout and len(pulled.stdout.strip().splitlines()) == 3
