"""A search's folder is one driver's at a time; a killed driver leaves no Ray processes and no
stale lock; a failed start leaves no RUNNING parent; a resumed search prunes as an uninterrupted
one would."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from search import scheduler
from tests.conftest import REPO

RUN = os.path.join(REPO, "search", "run.py")
EXPERIMENT = "tailtune/ce/cifar10-lt-ir100"


def search(args: list[str], cwd, method: str = "ce") -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, RUN, method, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def parents(client: MlflowClient, name: str, experiment: str = EXPERIMENT):
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], f"tags.`tailtune.search` = '{name}'")


def wait_for_trial_result(client: MlflowClient, name: str, proc: subprocess.Popen, timeout_s: float = 300):
    """Waits until a trial of search `name` has reported an epoch to MLflow; returns the parent."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        found = parents(client, name)
        if found:
            exp_id = found[0].info.experiment_id
            kids = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{found[0].info.run_id}'")
            if any("val_score" in k.data.metrics for k in kids):
                return found[0]
        time.sleep(2)
    raise AssertionError(f"no trial result of {name} within {timeout_s} s")


@pytest.mark.integration
def test_second_driver_refused_and_sigkill_leaves_no_ray_processes(tmp_path, data_dir, cache_dir, tracking_uri):
    name = "lock-it"
    storage = tmp_path / "ray_results"
    common = ["--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download", "--tracking-uri", tracking_uri,
              "--storage", str(storage)]
    client = MlflowClient(tracking_uri)
    driver = search([*common, "--name", name], tmp_path)
    try:
        wait_for_trial_result(client, name, driver)
        ray_procs = [p for p in psutil.Process(driver.pid).children(recursive=True)
                     if "watchdog.py" not in " ".join(p.cmdline())]
        assert any("raylet" in p.name() for p in ray_procs), [p.name() for p in ray_procs]

        # The same name again, at once: refused before Ray starts, no second parent run.
        again = search([*common, "--name", name], tmp_path)
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 2, out
        assert f"a search named '{name}' exists" in out
        # Resuming it while its driver runs: refused by the lock.
        resumed = search([*common, "--resume", name], tmp_path)
        out, _ = resumed.communicate(timeout=120)
        assert resumed.returncode == 2, out
        assert f"search {name} is running in another driver" in out
        assert len(parents(client, name)) == 1

        workers = [p for p in ray_procs]
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        if driver.poll() is None:
            driver.kill()
    # The kernel dropped the killed driver's lock: the search can be taken again.
    fd = os.open(storage / name / "tailtune.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


@pytest.mark.integration
def test_failed_start_leaves_no_running_parent_and_no_folder(tmp_path, monkeypatch, data_dir, cache_dir,
                                                             tracking_uri):
    # A full disk when the search state is first written: a fault we cannot cause here.
    from search import orchestrate, run

    def disk_full(path, state):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(orchestrate, "save_state", disk_full)
    monkeypatch.chdir(tmp_path)
    name = "fails-to-start"
    with pytest.raises(OSError, match="No space left"):
        run.main(["ce", "--name", name, "--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download",
                  "--tracking-uri", tracking_uri, "--storage", str(tmp_path / "ray_results")])
    found = parents(MlflowClient(tracking_uri), name)
    assert [p.info.status for p in found] == ["FAILED"]
    assert os.listdir(tmp_path / "ray_results") == []   # nothing to resume, nothing left


def trial_outcomes(client: MlflowClient, name: str) -> list[tuple]:
    """Returns (lr, state, epochs done) for the trials of search `name`, in the order they started
    (one at a time in the smoke preset, so the n-th of one search is the n-th of another)."""
    (parent,) = parents(client, name)
    kids = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"])
    return [(round(float(k.data.params["lr"]), 8), k.data.tags["tailtune.state"], k.data.tags["epochs_done"])
            for k in kids]


@pytest.mark.integration
def test_resumed_asha_prunes_as_an_uninterrupted_search(tmp_path, data_dir, cache_dir, tracking_uri):
    common = ["--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download", "--tracking-uri", tracking_uri,
              "--storage", str(tmp_path / "ray_results"), "--trials", "4", "--epochs", "2", "--seed", "3"]
    client = MlflowClient(tracking_uri)
    whole = search([*common, "--name", "asha-whole"], tmp_path)
    out, _ = whole.communicate(timeout=900)
    assert whole.returncode == 0, out[-4000:]
    expected = trial_outcomes(client, "asha-whole")
    assert len(expected) == 4 and any(state == "pruned" for _, state, _ in expected), expected   # ASHA had work

    cut = search([*common, "--name", "asha-cut"], tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline:   # interrupt once the first trial is complete: its rungs are recorded
        found = parents(client, "asha-cut")
        kids = client.search_runs([found[0].info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{found[0].info.run_id}'") if found else []
        if any(k.data.tags.get("tailtune.state") == "completed" for k in kids):
            break
        assert cut.poll() is None, cut.stdout.read()[-4000:]
        time.sleep(1)
    cut.send_signal(signal.SIGINT)
    out, _ = cut.communicate(timeout=300)
    assert cut.returncode == 130, out[-4000:]
    resumed = search([*common, "--resume", "asha-cut"], tmp_path)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    assert trial_outcomes(client, "asha-cut") == expected
    # The saved rungs hold every trial, those before the interruption and those after it.
    with open(tmp_path / "ray_results" / "asha-cut" / scheduler.STATE_FILE) as f:
        (rungs,) = json.load(f)["brackets"]
    assert {m: len(recorded) for m, recorded in rungs} == {2: sum(e == "2" for _, _, e in expected), 1: 4}
