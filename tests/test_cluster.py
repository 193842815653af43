"""A real two-node Ray cluster on this machine (a head and a worker node, token auth on), a search
driven through `--address`, tracked by the PostgreSQL-backed MLflow server, and the loss of the
worker node mid-search: its trial resumes from its last checkpoint on the node that remains."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, free_port

RUN = os.path.join(REPO, "search", "run.py")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
EXPERIMENT = "tailtune/ce/cifar10-lt-ir100"
EPOCHS = 3   # the lost trial is killed with at least one whole epoch left (see the test)


@pytest.fixture
def cluster():
    """Starts a head (1 CPU) and a worker node (1 CPU, its own process group so the test can kill
    it); yields (address, env, worker process)."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_urlsafe(24)}
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                   env=env, check=True, capture_output=True, timeout=120)
    worker = subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{port}", "--block", *common],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], env=env,
                                    capture_output=True, text=True)
            if status.stdout.count(" node_") >= 2:
                break
            time.sleep(2)
        else:
            pytest.fail(f"worker node did not join: {status.stdout[-2000:]}")
        yield f"127.0.0.1:{port}", env, worker
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def trial_runs(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None, []
    parents = client.search_runs([experiment.experiment_id], f"tags.`tailtune.search` = '{name}'")
    if not parents:
        return None, []
    kids = client.search_runs([experiment.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return parents[0], kids


@pytest.mark.integration
def test_search_on_two_nodes_survives_losing_one(cluster, tmp_path, data_dir, cache_dir, tracking_uri):
    address, env, worker = cluster
    name = "cluster-it"
    proc = subprocess.Popen(
        [sys.executable, RUN, "ce", "--address", address, "--trials", "3", "--epochs", str(EPOCHS),
         "--grace-period", str(EPOCHS), "--max-concurrent", "2", "--cpus-per-trial", "1",
         "--tracking-uri", tracking_uri, "--data-dir", data_dir, "--cache-dir", cache_dir,
         "--no-download", "--test-ood", "cifar100,mnist", "--name", name,
         "--storage", str(tmp_path / "ray_results")],
        cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = MlflowClient(tracking_uri)
    # Once a trial on each node has reported its first epoch (the node tag comes with a result)
    # and none of them more, kill the worker node (raylet and its trial process): its trial then
    # has whole epochs left to train elsewhere. A trial seen "running" in its last epoch may
    # already be done, and its loss would then move nothing.
    killed_node = None
    deadline = time.time() + 600
    while killed_node is None and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        _, kids = trial_runs(client, name)
        running = [k for k in kids if k.data.tags.get("tailtune.state") == "running"
                   and k.data.tags.get("tailtune.node_id") and k.data.metrics.get("epoch", EPOCHS) < EPOCHS - 1]
        nodes = {k.data.tags["tailtune.node_id"] for k in running}
        if len(nodes) == 2:
            os.killpg(worker.pid, signal.SIGKILL)
            killed_node = nodes
    out, _ = proc.communicate(timeout=900)
    assert killed_node is not None, f"never saw trials on both nodes:\n{out[-4000:]}"
    assert proc.returncode == 0, out[-5000:]

    parent, kids = trial_runs(client, name)
    assert parent.info.status == "FINISHED" and len(kids) == 3
    all_nodes = {n for k in kids for n in k.data.tags["tailtune.nodes"].split(",")}
    assert len(all_nodes) == 2, all_nodes                      # trials ran on both nodes
    moved = [k for k in kids if len(k.data.tags["tailtune.nodes"].split(",")) == 2]
    assert moved, [k.data.tags["tailtune.nodes"] for k in kids]   # the lost node's trial moved
    for kid in kids:
        assert kid.data.tags["tailtune.state"] == "completed"
        # Resumed from its checkpoint, not rerun: every epoch recorded once, none lost.
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "val_score")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (kid.data.tags["tailtune.nodes"], steps)
