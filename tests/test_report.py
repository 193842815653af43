"""The search report (search/report.py) and the terminal's progress lines (search/progress.py):
the HTML's content from hand-made trials, and its rendering in headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from search import progress, report

SPACE = {"tau": FloatDistribution(0.5, 2.0), "lr": FloatDistribution(0.02, 0.2, log=True),
         "num_experts": CategoricalDistribution([2, 3])}
OOD_SETS = ("cifar100", "mnist")


def trial(trial_id: str, state: str, curve: dict[int, float], tau: float, lr: float, experts: int = 3,
          auroc: float = 0.6, acc: float = 0.5) -> dict:
    """A trial as orchestrate hands it to the report; a completed one carries test metrics."""
    metrics = {"epoch": max(curve) if curve else 0}
    if curve:
        metrics.update(val_score=curve[max(curve)], val_auroc=auroc, val_acc=acc)
    if state == "completed":
        metrics.update(test_acc=0.25, test_acc_head=0.5, test_acc_middle=0.2, test_acc_tail=0.05)
        for i, s in enumerate(OOD_SETS):   # cifar100: 0.6000 ..., mnist: 0.7000 ...
            metrics.update({f"test_{s}_auroc": 0.6 + i / 10, f"test_{s}_aupr_in": 0.55 + i / 10,
                            f"test_{s}_aupr_out": 0.45 + i / 10, f"test_{s}_fpr95_idpos": 0.9 - i / 10,
                            f"test_{s}_fpr95_oodpos": 0.8 - i / 10, f"test_{s}_auroc_head": 0.1})
        metrics.update(test_auroc=0.65, test_aupr_in=0.6, test_aupr_out=0.5, test_fpr95_idpos=0.85,
                       test_fpr95_oodpos=0.75, test_fpr95=0.85)
    return {"trial_id": trial_id, "state": state, "epochs_done": max(curve) if curve else 0,
            "params": {"tau": tau, "lr": lr, "num_experts": experts}, "history": curve, "metrics": metrics}


def small_search() -> list[dict]:
    # b's early peak (0.9 at epoch 1) and c's pruned 0.95 must not make either the champion.
    return [trial("aaaa0001", "completed", {1: 0.3, 2: 0.4, 3: 0.5}, 1.0, 0.1),
            trial("aaaa0002", "completed", {1: 0.9, 2: 0.35, 3: 0.45}, 1.5, 0.05, 2),
            trial("aaaa0003", "pruned", {1: 0.95}, 0.7, 0.15),
            trial("aaaa0004", "failed", {}, 1.9, 0.03)]


def info(champion: str | None) -> dict:
    return {"title": "Search test-search", "champion": champion,
            "summary": [("method", "darl", None), ("champion", f"trial {champion}", "http://mlflow.example/#/x")]}


def test_report_sections_tables_and_notes(tmp_path):
    written = report.write(str(tmp_path), small_search(), SPACE, False, info("aaaa0001"))
    names = {os.path.basename(p) for p in written}
    assert {"report.html", "objective.png", "learning_curves.png", "history.png",
            "parallel_coordinates.png"} <= names
    assert "importances.png" not in names and "pareto_front.png" not in names   # 2 completed, 1 objective
    page = (tmp_path / "report.html").read_text()
    for anchor in ("objective", "trials", "curves", "parallel", "importances", "champion-test"):
        assert f'<section id="{anchor}">' in page, anchor
    assert "Importances need at least 4 completed trials; this search has 2" in page
    assert 'href="http://mlflow.example/#/x"' in page
    assert page.count("data:image/png;base64,") == 3   # objective, curves, parallel coordinates
    # Trials table: a pruned trial's partial score sits in its own column, never under "final".
    rows = re.findall(r"<tr>\s*<td>(aaaa\d+)</td>\s*<td>(\w+)</td>(.*?)</tr>", page, re.S)
    cells = {tid: (state, re.findall(r"<td>([^<]*)</td>", rest)) for tid, state, rest in rows}
    assert cells["aaaa0003"][0] == "pruned" and cells["aaaa0003"][1][-2:] == ["", "0.9500"]
    assert cells["aaaa0001"][0] == "completed" and cells["aaaa0001"][1][-2:] == ["0.5000", ""]
    assert cells["aaaa0004"][0] == "failed" and cells["aaaa0004"][1][-2:] == ["", ""]
    # The champion's test metrics, one row per OOD set and the mean, as the metrics were given.
    ood = page[page.index('id="champion-test"'):]
    assert re.search(r"<th>cifar100</th>\s*<td>0\.6000</td>\s*<td>0\.5500</td>\s*<td>0\.4500</td>"
                     r"\s*<td>0\.9000</td>\s*<td>0\.8000</td>", ood)
    assert re.search(r"<th>mnist</th>\s*<td>0\.7000</td>\s*<td>0\.6500</td>", ood)
    assert re.search(r"<th>mean</th>\s*<td>0\.6500</td>\s*<td>0\.6000</td>\s*<td>0\.5000</td>"
                     r"\s*<td>0\.8500</td>\s*<td>0\.7500</td>", ood)
    assert "<td>0.2500</td>" in ood   # test_acc


def test_report_importances_with_enough_trials_and_pareto_for_nsga2(tmp_path):
    trials = [trial(f"bbbb000{i}", "completed", {1: 0.2 + i / 20, 2: 0.3 + i / 20}, 0.6 + i / 5,
                    0.03 + i / 50, 2 + i % 2, auroc=0.5 + i / 20, acc=0.6 - i / 20) for i in range(5)]
    written = report.write(str(tmp_path), trials, SPACE, True, info("bbbb0002"))
    names = {os.path.basename(p) for p in written}
    assert {"importances.png", "pareto_front.png", "pareto.csv"} <= names
    page = (tmp_path / "report.html").read_text()
    assert '<section id="pareto">' in page and "Importances need" not in page
    # auroc rises while acc falls with i: every trial is on the front.
    front = (tmp_path / "pareto.csv").read_text().splitlines()
    assert front[0].split(",")[0] == "trial_id" and front[0].endswith("val_auroc,val_acc")
    assert len(front) == 1 + 5


def test_report_without_a_completed_trial_says_so(tmp_path):
    trials = [trial("cccc0001", "pruned", {1: 0.4}, 1.0, 0.1), trial("cccc0002", "failed", {}, 1.2, 0.1)]
    report.write(str(tmp_path), trials, SPACE, False, info(None))
    page = (tmp_path / "report.html").read_text()
    assert "No trial completed: there is no champion." in page
    assert "No trial completed, so there is nothing to draw." in page


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (CI installs the Debian package `chromium`)")
    return path


def headless(page: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", *args, f"file://{page}"],
        capture_output=True, text=True, timeout=120)


def rendered_plots(dom: str) -> tuple[int, int]:
    """Returns (plots on the page, plots the browser decoded), as the page's script recorded them."""
    found = re.search(r'<body[^>]*data-plots="(\d+)"[^>]*data-plots-rendered="(\d+)"', dom)
    assert found, dom[:2000]
    return int(found.group(1)), int(found.group(2))


def check_in_chromium(page: str, tmp_path, expected_plots: int) -> None:
    """Opens the report in headless Chromium: every plot decoded, every section there."""
    dom = headless(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert rendered_plots(dom.stdout) == (expected_plots, expected_plots)
    for anchor in ("objective", "trials", "curves", "parallel", "importances", "champion-test"):
        assert f'id="{anchor}"' in dom.stdout, anchor
    shot = tmp_path / "report.png"
    headless(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 20_000   # a rendered page, not a blank one


def test_report_renders_in_headless_chromium(tmp_path):
    report.write(str(tmp_path), small_search(), SPACE, False, info("aaaa0001"))
    check_in_chromium(str(tmp_path / "report.html"), tmp_path, 3)


def test_progress_helpers():
    assert progress.clock(65) == "1:05" and progress.clock(3725) == "1:02:05"
    assert progress.format_params({"tau": 1.0, "lr": 0.070126, "num_experts": 3}) == [
        "tau=1", "lr=0.07013", "num_experts=3"]
    items = [f"param_{i}=0.{i}23456" for i in range(20)]
    lines = progress.wrap("         abcd1234 params:", items, 11)
    assert len(lines) > 1 and all(len(line) <= 100 for line in lines)
    assert all(line.startswith(" " * 11) for line in lines[1:])
    assert ", ".join(lines).replace(",  ", ", ").count("param_") == 20   # every item, whole
    assert all(item in " ".join(lines) for item in items)


def test_progress_eta_counts_unfinished_epochs():
    p = progress.Progress("val_score", epochs=3, total=4)
    # a finished its 3 epochs, b is at epoch 1, two trials not started: 2 + 2 * 3 = 8 epochs left.
    p.epochs_seen, p.finished = {"a": 3, "b": 1}, {"a"}
    assert p.remaining_epochs() == 8
    p.first_start = 1000.0
    assert p.eta(now=1040.0) == "ETA 1:20"   # 4 epochs in 40 s: 8 more take 80 s
    p.finished.add("b")                       # b pruned: its 2 epochs no longer count
    assert p.remaining_epochs() == 6 and p.eta(now=1040.0) == "ETA 1:00"
