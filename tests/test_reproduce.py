"""The reproduction path: the table's arithmetic, the papers' numbers as data, the papers' split,
bad input, and one tiny reproduction end to end under Ray with a real MLflow server over HTTP."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from search import reproduce
from tests.conftest import REPO
from trainables import data, papers, protocols, recipes, registry
from trainables.config import LARGE_DATASETS

REPRODUCE = os.path.join(REPO, "search", "reproduce.py")


# ----------------------------------------------------------------------------- the table


def test_summary_is_the_mean_and_sample_std_over_seeds_minus_the_paper():
    entry = papers.PaperResult("la", "cifar10", "test", "offline",
                               {"test_acc": 80.0, "test_fpr95_idpos": 40.0}, {"test_acc": 1.0})
    per_seed = [{"test_acc": 0.70, "test_fpr95_idpos": 0.50}, {"test_acc": 0.80, "test_fpr95_idpos": 0.30},
                {"test_acc": 0.75, "test_fpr95_idpos": 0.40}]
    acc, fpr = reproduce.summarize(entry, per_seed)
    # ACC: 70, 80, 75 -> mean 75; deviations -5, 5, 0 -> sum of squares 50 / (3 - 1) -> std 5.
    assert (acc["metric"], acc["n"]) == ("test_acc", 3)
    assert acc["mean"] == pytest.approx(75.0) and acc["std"] == pytest.approx(5.0)
    assert acc["diff"] == pytest.approx(-5.0) and acc["paper_std"] == 1.0
    # FPR95: 50, 30, 40 -> mean 40, std 10, diff 0.
    assert fpr["mean"] == pytest.approx(40.0) and fpr["std"] == pytest.approx(10.0)
    assert fpr["diff"] == pytest.approx(0.0)
    table = reproduce.format_table([acc, fpr]).splitlines()
    assert table[2] == "| ACC | 80.00 ± 1.00 | 75.00 ± 5.00 (3) | -5.00 |"
    assert table[3] == "| FPR95 (ID positive) | 40.00 | 40.00 ± 10.00 (3) | +0.00 |"


def test_one_seed_has_no_std_and_a_missing_metric_no_mean():
    entry = papers.PaperResult("la", "cifar10", "test", "offline", {"test_acc": 77.67, "test_auroc": 90.0})
    acc, auroc = reproduce.summarize(entry, [{"test_acc": 0.5}])
    assert acc["mean"] == pytest.approx(50.0) and math.isnan(acc["std"])
    assert auroc["n"] == 0 and math.isnan(auroc["mean"])
    table = reproduce.format_table([acc, auroc]).splitlines()
    assert table[2] == "| ACC | 77.67 | 50.00 (1) | -27.67 |"
    assert table[3] == "| AUROC | 90.00 | - (0) | - |"


# ----------------------------------------------------------------------------- the papers' numbers


def test_every_paper_entry_names_a_method_a_protocol_and_metrics_we_log():
    seen = set()
    for r in papers.RESULTS:
        assert r.method in registry.names(), r
        protocol = protocols.get(r.protocol)
        assert (r.method, r.dataset) not in seen, f"two entries for {r.method} on {r.dataset}"
        seen.add((r.method, r.dataset))
        assert r.dataset in ("cifar10", "cifar100", *LARGE_DATASETS) and r.imbalance_ratio == 100
        if r.dataset in LARGE_DATASETS:   # trained with its paper's recipe, tested on the protocol's sets
            assert recipes.get(r.method, r.dataset) is not None and protocol.sets_for(r.dataset), r
        assert r.values and set(r.values) <= set(papers.METRICS), r
        assert set(r.std) <= set(r.values), r
        assert all(0 < v <= 100 for v in r.values.values()), r
        assert "Table" in r.source and "row" in r.source, r
        # An FPR95 column sits under the convention the paper's protocol reports as its headline.
        fprs = [k for k in r.values if k.startswith("test_fpr95")]
        assert all(k == f"test_{protocol.headline_fpr}" for k in fprs), (r.method, fprs, protocol.headline_fpr)


def test_darl_rows_satisfy_the_group_identity_the_spec_derives():
    # darl.md §6: overall = 0.3 head + 0.4 middle + 0.3 tail on CIFAR-10 (3/4/3 classes, balanced
    # test set), 33/34/33 on CIFAR-100; a typo in the copied numbers would break it.
    for dataset, weights, tol in (("cifar10", (0.3, 0.4, 0.3), 0.01), ("cifar100", (0.33, 0.34, 0.33), 0.01)):
        v = papers.get("darl", dataset).values
        for m in ("acc", "auroc"):
            parts = [v[f"test_{m}_{g}"] for g in ("head", "middle", "tail")]
            assert float(np.dot(weights, parts)) == pytest.approx(v[f"test_{m}"], abs=tol), (dataset, m)
    assert papers.get("darl").values["test_acc"] == 89.06 and papers.get("rna").runs == 6


def test_a_method_without_numbers_is_refused_naming_what_exists():
    with pytest.raises(ValueError, match="no paper numbers for method 'cocl'; accepted: darl"):
        papers.get("cocl")
    with pytest.raises(ValueError, match="no paper numbers for ce on cifar100-lt-ir100; accepted: --dataset cifar10"):
        papers.get("ce", "cifar100")


# ----------------------------------------------------------------------------- the papers' split


def test_unused_validation_keeps_ldam_drws_exact_build(data_dir, cache_dir):
    paper = data.load_id_data(data.DatasetSpec(val_source="unused"), data_dir, cache_dir, False)
    plain = data.load_id_data(data.DatasetSpec(val_per_class=0), data_dir, cache_dir, False)
    assert paper.counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(paper.train) == 12406 and np.array_equal(paper.train_index, plain.train_index)
    # Validation: 50 per class from the images the build leaves unused; the head uses all 5000.
    assert paper.record["val_counts"] == "0," + ",".join(["50"] * 9)
    assert not set(paper.val_index) & set(paper.train_index)
    assert paper.record["val_source"] == "unused" and "nothing held out" in paper.record["lt_rule"]
    with pytest.raises(ValueError, match="val_source='nope'; accepted: holdout, unused"):
        data.DatasetSpec(val_source="nope")


def test_unused_validation_with_nothing_unused_is_one_clear_error(data_dir, cache_dir):
    with pytest.raises(ValueError, match="none is left for validation; accepted: val_source='holdout'"):
        data.load_id_data(data.DatasetSpec(val_source="unused", imbalance_ratio=1), data_dir, cache_dir, False)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, expected", [
    (["nope"], "unknown method 'nope'"),
    (["cocl"], "no paper numbers for method 'cocl'; accepted: darl"),
    (["ce", "--dataset", "cifar100"], "no paper numbers for ce on cifar100-lt-ir100"),
    (["la", "--seeds", "0"], "--seeds 0: expected an integer >= 1"),
    (["la", "--epochs", "0"], "--epochs 0: expected an integer >= 1"),
    (["la", "--seed-list", "1,x"], "--seed-list 1,x: expected comma-separated integers >= 0"),
    (["la", "--seed-list", "1,1"], "--seed-list 1,1: expected distinct integers >= 0"),
    (["la", "--seeds", "2", "--seed-list", "1,2"], "--seeds 2 with --seed-list 1,2: give one of them"),
    (["la", "--precision", "fp8"], "--precision fp8: expected one of fp32, bf16, auto"),
    (["la", "--protocol", "nope"], "--protocol nope: unknown protocol 'nope'"),
    (["la", "--set", "seed=3"], "--set seed: use --seed-list"),
    (["la", "--set", "weight_decay=-1"], "weight_decay=-1; accepted: a number >= 0"),
    ([], "no method given"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = reproduce.main([*argv, "--storage", str(tmp_path / "ray_results")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert os.listdir(tmp_path) == []   # no results folder, no local MLflow store


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory, data_dir, cache_dir, tracking_uri):
    """Runs a 2-seed, 1-epoch `la` reproduction on the smoke data budget; returns (output, name, cwd)."""
    cwd = tmp_path_factory.mktemp("reproduce")
    name = "repro-it"
    proc = subprocess.run(
        [sys.executable, REPRODUCE, "la", "--seeds", "2", "--epochs", "1", "--preset", "smoke",
         "--protocol", "offline", "--tracking-uri", tracking_uri, "--data-dir", data_dir, "--cache-dir",
         cache_dir, "--no-download", "--name", name, "--storage", str(cwd / "ray_results")],
        cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, capture_output=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, name, cwd


def test_reproduction_logs_a_parent_two_seed_runs_and_the_table(reproduction, tracking_uri):
    out, name, _ = reproduction
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tailtune/la/cifar10-lt-ir100")
    parents = client.search_runs([experiment.experiment_id], f"tags.`tailtune.reproduction` = '{name}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["tailtune.kind"] == "reproduction"
    p = parent.data.params
    assert p["val_source"] == "unused" and p["precision"] == "fp32" and p["reproduce.seeds"] == "123,124"
    assert p["protocol"] == "offline" and p["reproduce.paper_protocol"] == "cala"
    assert "Table 1" in p["reproduce.paper_source"] and p["reproduce.checkpoint_rule"].startswith("final epoch")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.params["seed"] for c in children) == ["123", "124"]
    assert all(c.info.status == "FINISHED" and c.data.params["train_size"] == "242" for c in children)
    for c in children:   # every metric a paper entry can hold is logged by every run
        assert set(papers.METRICS) <= set(c.data.metrics), set(papers.METRICS) - set(c.data.metrics)
    accs = [100 * c.data.metrics["test_acc"] for c in children]
    m = parent.data.metrics
    assert m["repro_acc_mean"] == pytest.approx(np.mean(accs) / 100)
    assert m["repro_acc_std"] == pytest.approx(np.std(accs, ddof=1) / 100)
    assert m["repro_seeds_finished"] == 2
    row = f"| ACC | 77.67 | {np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f} (2) | {np.mean(accs) - 77.67:+.2f} |"
    assert row in out and "checkpoint: final epoch" in out
    assert "the paper's numbers use protocol 'cala', this run 'offline'" in out
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"reproduction.md", "reproduction.csv", "seeds.csv"} <= artifacts
    local = client.download_artifacts(parent.info.run_id, "reproduction.md")
    with open(local) as f:
        assert row in f.read()


def test_a_finished_reproduction_resumes_to_nothing(reproduction):
    out, name, cwd = reproduction
    proc = subprocess.run([sys.executable, REPRODUCE, "--resume", name, "--storage", str(cwd / "ray_results")],
                          cwd=cwd, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0 and f"reproduction {name} already finished" in proc.stdout, proc.stderr


def test_champion_without_a_registered_model_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    # A store of its own (the default local SQLite store under a fresh folder): the suite's shared
    # server may already hold an rna champion registered by another test.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = reproduce.main(["rna", "--champion", "--protocol", "offline", "--data-dir", data_dir,
                           "--storage", str(tmp_path / "ray_results")])
    # MLflow's own notice that it created the new SQLite store's tables is not ours.
    ours = [line for line in capsys.readouterr().err.splitlines() if "INFO mlflow.store" not in line]
    assert code == 2 and len(ours) == 1 and "--champion: no registered model rna-cifar10-lt-ir100@champion" in ours[0]


def test_from_search_takes_the_champions_searched_values(tracking_uri, tmp_path, monkeypatch):
    # A finished search as search/run.py leaves it: a parent naming its best child, a child that
    # lists what was sampled; reproduce reads those values over the paper point and nothing else.
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"tailtune/test-reproduce/{tmp_path.name}")
    child = client.create_run(experiment, tags={"tailtune.searched": "tau_energy,lr"})
    for key, value in (("tau_energy", "3.5"), ("lr", "0.05"), ("weight_decay", "0.001")):
        client.log_param(child.info.run_id, key, value)
    name = f"search-{tmp_path.name}"
    client.create_run(experiment, tags={"tailtune.search": name, "tailtune.method": "darl",
                                        "tailtune.best_run_id": child.info.run_id})
    monkeypatch.chdir(tmp_path)
    args = reproduce.parse_args(["darl", "--from-search", name, "--epochs", "1"])
    values = reproduce.champion_values(args, tracking_uri)
    assert values == {"tau_energy": 3.5, "lr": 0.05}
    plan = reproduce.build_plan(args, values)
    assert plan["config"]["tau_energy"] == 3.5 and plan["config"]["lr"] == 0.05
    assert plan["config"]["mixup_alpha"] == 1.0 and "weight_decay" not in plan["config"]   # paper point
    assert plan["params_from"] == f"search {name}'s champion (run {child.info.run_id})"
    with pytest.raises(reproduce.UsageError, match=f"--from-search {name}: a search of darl, not of rna"):
        reproduce.champion_values(reproduce.parse_args(["rna", "--from-search", name]), tracking_uri)
