"""Every registered method through the whole service: a two-trial search under real Ray on real
images, tracked by the real MLflow server, ending with a registered model that loads and scores.

DARL's search is exercised in depth by test_search.py; here each other method gets the same path
at the smallest budget that still trains, tests and registers (one epoch per trial).
"""
from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import spaces
from tests.conftest import REPO
from trainables import data, registry

RUN = os.path.join(REPO, "search", "run.py")
# DARL's search is test_search.py's; CE's runs (to a pulled champion) in test_faults and test_cluster.
METHODS = [m for m in registry.names() if m not in ("darl", "ce")]
OFFLINE_TEST_OOD = "cifar100,tin,textures,mnist,fashion_mnist"


def test_every_method_has_a_space_with_its_paper_point_inside():
    for name in registry.names():
        space = spaces.get(name)
        method_cls = registry.get(name)
        assert space.distributions, name
        fields = set(method_cls.config_cls.__dataclass_fields__)
        assert set(space.distributions) <= fields, (name, set(space.distributions) - fields)
        assert set(space.paper_point) == set(space.distributions), name
        for param, value in space.paper_point.items():
            assert spaces._contains(space.distributions[param], value), (name, param, value)


def test_list_shows_every_method_with_its_space():
    out = subprocess.run([sys.executable, RUN, "--list"], capture_output=True, text=True, check=True).stdout
    for name in registry.names():
        assert f"{name}:" in out
        for param in spaces.get(name).distributions:
            assert param in out


@pytest.mark.parametrize("method", METHODS)
def test_two_trial_search_registers_a_loadable_model(method, tmp_path, data_dir, cache_dir, tracking_uri):
    name = f"{method}-two-trials"
    proc = subprocess.run(
        [sys.executable, RUN, method, "--trials", "2", "--epochs", "1", "--grace-period", "1",
         "--max-concurrent", "2", "--cpus-per-trial", "1",
         "--tracking-uri", tracking_uri, "--data-dir", data_dir, "--cache-dir", cache_dir,
         "--no-download", "--test-ood", OFFLINE_TEST_OOD, "--name", name,
         "--storage", str(tmp_path / "ray_results"),
         # smaller evaluation sets than the smoke preset's: this checks the path, not the numbers
         "--set", "test_per_class=10", "--set", "ood_max_images=50", "--set", "val_ood_size=50"],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"tailtune/{method}/cifar10-lt-ir100")
    parents = client.search_runs([experiment.experiment_id], f"tags.`mlflow.runName` = '{name}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(trials) == 2
    method_cls = registry.get(method)
    for run in trials:
        assert run.data.tags["tailtune.state"] == "completed"
        for key in ("val_score", "test_acc", "test_acc_tail", "test_auroc", "test_fpr95"):
            assert np.isfinite(run.data.metrics[key]), (key, run.data.metrics)
        assert set(spaces.get(method).distributions) <= set(run.data.params)
        if method_cls.uses_outliers:   # the set actually trained on is traceable
            assert run.data.params["outlier_set"] in data.OUTLIER_ORDER

    model = mlflow.pyfunc.load_model(f"models:/{method}-cifar10-lt-ir100@champion")
    images = np.concatenate([data.load_ood("cifar100", data_dir, cache_dir, False, 6, seed=1).x,
                             data.load_ood("mnist", data_dir, cache_dir, False, 6, seed=1).x])
    out = model.predict(images)
    assert len(out) == 12 and set(out["label_index"]) <= set(range(10))
    assert np.isfinite(out["ood_score"].to_numpy(dtype=float)).all()
    assert out["is_ood"].dtype == bool
