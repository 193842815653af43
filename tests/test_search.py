"""The main path end to end: a real smoke search under Ray on real CIFAR-10 images, tracked by a
real MLflow server over HTTP, then read back: runs, metrics, pruning, artifacts, the champion."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import psutil
import pytest
from mlflow.tracking import MlflowClient

import spaces
from tests.conftest import REPO
from tests.test_report import check_in_chromium
from trainables import data

RUN = os.path.join(REPO, "search", "run.py")
EXPERIMENT = "tailtune/darl/cifar10-lt-ir100"
MODEL = "darl-cifar10-lt-ir100"


class PeakMemory(threading.Thread):
    """Samples the summed PSS (shared pages split between their users, so shared libraries count
    once) of a process tree plus every Ray process on the machine."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self):
        while self.running:
            try:
                root = psutil.Process(self.pid)
                procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
                for p in psutil.process_iter(["name", "cmdline"]):
                    if "ray" in " ".join(p.info["cmdline"] or []) or "raylet" in (p.info["name"] or ""):
                        procs.setdefault(p.pid, p)
                total = 0
                for p in procs.values():
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(2)


def search(args: list[str], cwd, env_extra=None, method: str = "darl", **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, RUN, method, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir, cache_dir, tracking_uri):
    """Runs `search/run.py darl` on the smoke preset once; returns (output, seconds, peak bytes, name)."""
    cwd = tmp_path_factory.mktemp("smoke")
    name = "smoke-it"
    started = time.time()
    proc = search(["--tracking-uri", tracking_uri, "--data-dir", data_dir, "--cache-dir", cache_dir,
                   "--no-download", "--name", name, "--storage", str(cwd / "ray_results")], cwd)
    watch = PeakMemory(proc.pid)
    watch.start()
    out, _ = proc.communicate(timeout=900)
    watch.running = False
    seconds = time.time() - started
    print(out[-3000:])
    print(f"smoke search: {seconds:.0f} s, peak memory {watch.peak / 2**30:.2f} GiB")
    assert proc.returncode == 0, out[-5000:]
    return out, seconds, watch.peak, name


def children(client: MlflowClient, parent_id: str, experiment_id: str):
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parent_run(client: MlflowClient, name: str, experiment: str = EXPERIMENT):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], f"tags.`tailtune.search` = '{name}'")
    assert len(runs) == 1
    return exp, runs[0]


@pytest.mark.integration
def test_smoke_search_budget(smoke):
    out, seconds, peak, _ = smoke
    assert seconds < 300 + 60, f"smoke preset took {seconds:.0f} s"   # 5 min budget, CI slack
    assert peak < 6 * 2**30, f"peak memory {peak / 2**30:.2f} GiB"
    assert "champion: trial" in out and "registered: models:/darl-cifar10-lt-ir100@champion" in out


@pytest.mark.integration
def test_mlflow_runs_params_metrics(smoke, tracking_uri):
    client = MlflowClient(tracking_uri)
    exp, parent = parent_run(client, smoke[3])
    assert parent.info.status == "FINISHED"
    kids = children(client, parent.info.run_id, exp.experiment_id)
    assert len(kids) == 4
    states = [k.data.tags.get("tailtune.state") for k in kids]
    assert "pruned" in states and "completed" in states, states
    for kid in kids:
        params = kid.data.params
        for key in ("tau_energy", "mixup_alpha", "lambda_mix", "lr", "num_experts", "lt_rule", "split_seed",
                    "counts", "fpr_conventions", "group_rule", "val_ood_sets", "test_ood_sets", "seed"):
            assert key in params, key
        assert params["val_ood_sets"] == "gaussian,rademacher,blobs"
        assert "svhn" not in params["test_ood_sets"]      # not offline: skipped and not claimed
        # "auto" speed settings are logged as asked and tagged as resolved on the trial's device.
        assert params["precision"] == "auto" and params["eval_every"] == "1"
        tags = kid.data.tags
        assert (tags["tailtune.device"], tags["tailtune.precision"], tags["tailtune.channels_last"],
                tags["tailtune.fused_optimizer"], tags["tailtune.compile"]) == ("cpu", "fp32", "False", "False", "none")
        history = client.get_metric_history(kid.info.run_id, "val_score")
        epochs = int(kid.data.tags["epochs_done"])
        assert [m.step for m in history] == list(range(1, epochs + 1))
        for m in history:
            assert 0 <= m.value <= 1
    for kid in (k for k in kids if k.data.tags["tailtune.state"] == "completed"):
        metrics = kid.data.metrics
        for key in ("test_acc", "test_acc_head", "test_acc_middle", "test_acc_tail", "test_auroc",
                    "test_fpr95", "test_aupr_in", "test_aupr_out", "test_cifar100_auroc", "test_mnist_auroc"):
            assert 0 <= metrics[key] <= 1, key
        assert metrics["test_auroc"] == pytest.approx(np.mean(
            [metrics[f"test_{s}_auroc"] for s in ("cifar100", "tin", "textures", "mnist", "fashion_mnist")]))


@pytest.mark.integration
def test_parent_artifacts_and_champion(smoke, tracking_uri, data_dir, cache_dir, tmp_path):
    client = MlflowClient(tracking_uri)
    exp, parent = parent_run(client, smoke[3])
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "trials.csv" in names
    assert {"optuna/history.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    best_run = parent.data.tags["tailtune.best_run_id"]
    ckpt = {a.path for a in client.list_artifacts(best_run, "checkpoint")}
    assert {"checkpoint/state.pt", "checkpoint/meta.json", "checkpoint/scores.npz"} <= ckpt

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    cifar = data.load_id_data(data.DatasetSpec(val_per_class=10, test_per_class=2), data_dir, cache_dir, False)
    mnist = data.load_ood("mnist", data_dir, cache_dir, False, max_images=4)
    images = np.concatenate([cifar.test.x, mnist.x])
    table = model.predict(images)
    assert list(table.columns) == ["label", "label_index", "confidence", "ood_score", "is_ood"]
    assert len(table) == len(images)
    assert set(table["label"]) <= set(cifar.class_names)
    assert ((table["confidence"] > 0) & (table["confidence"] <= 1)).all()
    assert np.isfinite(table["ood_score"]).all()
    assert table["is_ood"].dtype == bool

    np.save(tmp_path / "images.npy", images[:3])
    pulled = subprocess.run([sys.executable, os.path.join(REPO, "search", "pull.py"), MODEL,
                             str(tmp_path / "images.npy"), "--tracking-uri", tracking_uri],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert "ood_score" in pulled.stdout and len(pulled.stdout.strip().splitlines()) == 4


@pytest.mark.integration
def test_interrupted_search_resumes_without_duplicates(tmp_path, data_dir, cache_dir, tracking_uri):
    # Resuming is the same machinery for every method; LA's ResNet-32 keeps the test short.
    name = "resume-it"
    common = ["--trials", "3", "--epochs", "2", "--grace-period", "2",
              "--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download",
              "--tracking-uri", tracking_uri, "--storage", str(tmp_path / "ray_results")]
    proc = search([*common, "--name", name], tmp_path, method="la")
    lines = []
    for line in proc.stdout:                  # interrupt once the first trial has finished
        lines.append(line)
        if re.search(r" complete\s+\|", line):   # the progress line, not the champion rule's text
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(lines) + rest
    assert f"--resume {name}" in rest

    client = MlflowClient(tracking_uri)
    exp, parent = parent_run(client, name, "tailtune/la/cifar10-lt-ir100")
    before = {k.data.tags["tailtune.trial_id"]: k for k in children(client, parent.info.run_id, exp.experiment_id)}
    finished = {t: k for t, k in before.items() if k.data.tags.get("tailtune.state") == "completed"}
    assert finished

    resumed = search([*common, "--resume", name], tmp_path, method="la")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-4000:]
    after = children(client, parent.info.run_id, exp.experiment_id)
    ids = [k.data.tags["tailtune.trial_id"] for k in after]
    assert len(ids) == len(set(ids)) == 3
    for trial_id, run in finished.items():    # kept, not rerun: same run, same two epochs
        again = next(k for k in after if k.data.tags["tailtune.trial_id"] == trial_id)
        assert again.info.run_id == run.info.run_id
        history = client.get_metric_history(run.info.run_id, "val_score")
        assert [m.step for m in history] == [1, 2]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.integration
def test_nsga2_reports_pareto_front(tmp_path, data_dir, cache_dir, tracking_uri):
    name = "nsga2-it"
    # Two trials at once on one core each: the concurrent path of the scheduler (LA: a short test).
    proc = search(["--sampler", "nsga2", "--trials", "2", "--epochs", "1", "--grace-period", "1",
                   "--max-concurrent", "2", "--cpus-per-trial", "1",
                   "--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download", "--name", name,
                   "--tracking-uri", tracking_uri, "--storage", str(tmp_path / "ray_results")], tmp_path,
                  method="la")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "Pareto front (val_auroc, val_acc):" in out
    client = MlflowClient(tracking_uri)
    _, parent = parent_run(client, name, "tailtune/la/cifar10-lt-ir100")
    optuna_files = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/pareto_front.png", "optuna/pareto.csv"} <= optuna_files
    pareto = client.download_artifacts(parent.info.run_id, "optuna/pareto.csv", str(tmp_path))
    front = open(pareto).read().splitlines()
    assert front[0].endswith("val_auroc,val_acc") and len(front) >= 2


SEARCHED = set(spaces.get("darl").distributions)   # tau_energy, mixup_alpha, lambda_mix, lr, num_experts
# Start-up and bookkeeping lines of Ray, Tune, MLflow and Optuna that only --verbose shows.
NOISE = ("Started a local Ray instance", "Token authentication is enabled", "Configuration for experiment",
         "View detailed results here", "A new study created", "Creating initial MLflow database",
         "Successfully registered model", "Inferring model signature", "Wrote the latest version")


@pytest.mark.integration
def test_terminal_lines_fit_and_follow_the_champion_rule(smoke):
    out = smoke[0]
    lines = out.splitlines()
    # Data notices name file paths (as long as they are); every other line fits 100 columns.
    long = [line for line in lines if len(line) > 100 and not line.startswith("notice: ")]
    assert not long, long
    for noise in NOISE:
        assert noise not in out, noise
    assert "champion rule: the best val_score at the final epoch of a completed trial" in out
    starts = [i for i, line in enumerate(lines) if re.match(r"\[ *[\d:]+\] start \w{8} \(\d/4\)", line)]
    assert len(starts) == 4
    for i in starts:   # the parameter lines under each start line name every sampled parameter
        block = []
        for line in lines[i + 1:]:
            if not line.startswith("         "):
                break
            block.append(line)
        named = set(re.findall(r"(\w+)=", " ".join(block)))
        assert named == SEARCHED, block
    live = [line for line in lines if re.match(r"\[ *[\d:]+\] \w{8} epoch \d/3: 0\.\d{4}", line)]
    assert live and all(" | done " in line for line in live)
    assert any(re.search(r"\| ETA \d+:\d\d ", line) for line in live)
    # The last live line's "best final" is the summary's champion: one rule in both.
    best_final = re.findall(r"best final (0\.\d{4}) (\w{8})", out)[-1]
    champion = re.search(r"champion: trial (\w{8}), the best val_score at the final epoch", out).group(1)
    summary_score = re.search(r"^  val_score +(0\.\d{4})$", out, re.M).group(1)
    assert best_final == (summary_score, champion)


@pytest.mark.integration
def test_trial_runs_read_by_state(smoke, tracking_uri):
    client = MlflowClient(tracking_uri)
    exp, parent = parent_run(client, smoke[3])
    assert {k.removeprefix("space.") for k in parent.data.params if k.startswith("space.")} == SEARCHED
    kids = children(client, parent.info.run_id, exp.experiment_id)
    for kid in kids:
        state, trial_id = kid.data.tags["tailtune.state"], kid.data.tags["tailtune.trial_id"]
        assert set(kid.data.tags["tailtune.searched"].split(",")) == SEARCHED
        assert not any(k.startswith("space.") for k in kid.data.params)
        history = client.get_metric_history(kid.info.run_id, "val_score")
        if state == "completed":
            assert (kid.info.status, kid.info.run_name) == ("FINISHED", f"trial-{trial_id}")
            final = max(history, key=lambda m: m.step)
            assert kid.data.metrics["final_val_score"] == pytest.approx(final.value)
            assert kid.data.metrics["final_val_acc"] == pytest.approx(kid.data.metrics["val_acc"])
        else:
            assert state == "pruned"
            assert (kid.info.status, kid.info.run_name) == ("KILLED", f"trial-{trial_id}-pruned")
            assert not any(k.startswith("final_") for k in kid.data.metrics)
    # Sorted by final_val_score, the champion's run comes first.
    ranked = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                "and metrics.final_val_score > -1", order_by=["metrics.final_val_score DESC"])
    assert ranked[0].info.run_id == parent.data.tags["tailtune.best_run_id"]


@pytest.mark.integration
def test_parent_description_and_registered_model_metadata(smoke, tracking_uri):
    client = MlflowClient(tracking_uri)
    _, parent = parent_run(client, smoke[3])
    note = parent.data.tags["mlflow.note.content"]
    best_run = parent.data.tags["tailtune.best_run_id"]
    protocol = parent.data.tags["tailtune.protocol"]
    assert "checkpoint: final epoch" in protocol and "fpr95: ID positive" in protocol
    assert "gaussian,rademacher,blobs" in protocol and "cifar100,tin,textures,mnist,fashion_mnist" in protocol
    for text in ("**method**: darl", "cifar10-LT, imbalance ratio 100", "smoke preset: 4 trials x 3 epochs",
                 protocol, "final epoch of a completed trial", f"{tracking_uri}/#/experiments/"
                 f"{parent.info.experiment_id}/runs/{best_run})", f"models:/{MODEL}/"):
        assert text in note, text
    version = client.get_model_version_by_alias(MODEL, "champion")
    model = client.get_registered_model(MODEL)
    best_score = client.get_run(best_run).data.metrics["final_val_score"]
    for tags in (model.tags, version.tags):
        assert tags["search"] == smoke[3] and tags["dataset"] == "cifar10-lt-ir100"
        assert tags["protocol"] == protocol and tags["val_score"] == f"{best_score:.4f}"
    assert version.tags["source_run"] == best_run
    assert "final epoch of a completed trial" in model.description and version.description == model.description
    # The input example is real validation images: 4 classes, not a blank array.
    mlflow.set_tracking_uri(tracking_uri)
    uri = f"models:/{MODEL}@champion"
    example = np.asarray(mlflow.models.Model.load(uri).load_input_example(uri))
    assert example.shape == (4, 32, 32, 3) and example.dtype == np.uint8
    assert example.std() > 10 and len({e.tobytes() for e in example}) == 4


@pytest.mark.integration
def test_report_artifact_renders(smoke, tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    _, parent = parent_run(client, smoke[3])
    page = client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path))
    text = open(page).read()
    champion = client.get_run(parent.data.tags["tailtune.best_run_id"]).data.tags["tailtune.trial_id"]
    assert f"Trial {champion}; test sets are reported" in text
    for ood_set in ("cifar100", "tin", "textures", "mnist", "fashion_mnist", "mean"):
        assert f"<th>{ood_set}</th>" in text, ood_set
    assert "<td>pruned</td>" in text
    check_in_chromium(page, tmp_path, text.count("data:image/png;base64,"))


@pytest.mark.integration
def test_readme_load_model_snippet_runs(smoke, tracking_uri, data_dir, cache_dir, tmp_path):
    readme = open(os.path.join(REPO, "README.md")).read()
    snippet = re.search(r"```python\n(import mlflow\n.*?load_model.*?)```", readme, re.S).group(1)
    assert "mlflow.set_tracking_uri(" in snippet.split("load_model")[0]
    local = '"sqlite:///mlruns/mlflow.db"'
    assert local in snippet
    cifar = data.load_id_data(data.DatasetSpec(val_per_class=10, test_per_class=1), data_dir, cache_dir, False)
    np.save(tmp_path / "images.npy", cifar.test.x[:3])
    # As written, pointed at this test's server instead of the local store.
    ran = subprocess.run([sys.executable, "-c", snippet.replace(local, repr(tracking_uri))], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "ood_score" in ran.stdout and "is_ood" in ran.stdout
