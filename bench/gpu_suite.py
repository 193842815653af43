#!/usr/bin/env python
"""Every GPU speed target in one prepared run: one JSON, one table.

    python3 bench/gpu_suite.py --json gpu-suite.json                   # a GPU machine (estimate: 6-8 min)
    python bench/gpu_suite.py --device cpu --quick --json quick.json   # the CPU check (a few minutes)
    python3 bench/gpu_suite.py --install-only                          # install carried wheels only

Stages, in this order (DARL on CIFAR-10-LT IR100, 128 images per stream, unless named otherwise):

  epoch         the papers' conventional DataLoader loop and our trainable (eager), one process,
                same data and initial weights: median of 3 epochs after a warm-up (bench/epoch.py)
  evaluation    one validation and one final test at a search's sizes: with the epoch times, the
                projected 400-epoch trial (validated every 5 epochs)
  concurrency   aggregate images/s of 1, 2, 4, 8 trials training at once on the device, each in its
                own process, and each trial's peak device memory (bench/concurrency.py)
  compiled      our trainable with compile=reduce-overhead (CUDA graphs), its own process
  smoke_search  search/run.py darl --preset smoke --epochs 3 with --gpus-per-trial 0.25 (Ray's
                fractional-GPU path), sqlite tracking in a temporary folder; needs ray, optuna, mlflow
  rna           RNA's epoch (ResNet-18, 128 ID + 128 outliers per step), our trainable
  open_sampling Open-sampling's epoch (ResNet-32, 128 ID + 512 outliers per step), our trainable
  large_lt      on a generated ImageNet-LT-format set (1,279 JPEGs, 500x375, 16 classes): the input
                pipeline at 224, ours vs DataLoader + PIL with the machine's cores as workers
                (bench/large_lt.py); then ce's epoch with a ResNet-50 at 224, its images resident on
                the device, streamed from host memory, streamed with prefetch: images/s, and a check
                that one epoch leaves the same weights in all three. Its time is kept for it.

Each stage runs in its own process under a time limit (and the suite under --budget-s); its result
goes into the JSON as soon as it ends, and a stage that fails or runs out of time is recorded with
one line and the suite goes on. Each stage's output is in the `<json>-logs` folder. First of all,
with --device cuda, the suite stops with one line if torch sees no CUDA device; then wheels carried
in .gpu-payload (bench/gpu_payload.py) are installed and put on the path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:0] = [REPO, BENCH]

import gpu_payload  # noqa: E402  (standard library only; torch is imported after the payload is on the path)

STAGES = ("epoch", "evaluation", "concurrency", "compiled", "smoke_search", "rna", "open_sampling", "large_lt")
# Per mode: sizes, and each stage's time limit in seconds (the suite's own budget caps them too).
MODES = {
    "full": {"n_max": None, "set": {}, "batch_size": 128, "repeats": 3, "workers": 8,
             "concurrent": (1, 2, 4, 8), "concurrency_epochs": 2, "eval": {}, "budget_s": 470,
             "search": ["--epochs", "3"],
             "limits": {"epoch": 150, "evaluation": 90, "concurrency": 180, "compiled": 180,
                        "smoke_search": 180, "rna": 90, "open_sampling": 90, "large_lt": 90},
             # Kept for these stages out of the budget: an earlier stage's limit ends that much sooner.
             "reserve_s": {"large_lt": 90},
             # 16 classes, 200 to 20 images (IR 10): 1,279 training JPEGs at about ImageNet's median
             # size; workers None = every core of the machine for the conventional loader.
             "large_lt": {"classes": 16, "n_max": 200, "imbalance_ratio": 10, "source": (500, 375), "size": 224,
                          "store_side": 256, "pipeline_batch": 256, "train_batch": 128, "workers": None}},
    # Tiny sizes: every stage's code runs on 2 CPU cores in a few minutes; the numbers mean nothing.
    # Limits are generous: on a shared CPU machine the stages may run many times slower.
    "quick": {"n_max": 10, "set": {"imbalance_ratio": 10}, "batch_size": 8, "repeats": 1, "workers": 0,
              "concurrent": (1, 2), "concurrency_epochs": 1, "budget_s": 1500,
              "eval": {"val_per_class": 5, "test_per_class": 3, "val_ood_size": 40, "ood_max_images": 30,
                       "test_ood": ("textures",)},
              "search": ["--trials", "1", "--epochs", "1", "--cpus-per-trial", "1", "--imbalance-ratio", "10",
                         "--set", "n_max=20", "--set", "test_per_class=5", "--set", "ood_max_images=30",
                         "--test-ood", "textures"],
              "limits": {"epoch": 300, "evaluation": 300, "concurrency": 300, "compiled": 600,
                         "smoke_search": 400, "rna": 300, "open_sampling": 300, "large_lt": 300},
              "reserve_s": {"large_lt": 120},
              "large_lt": {"classes": 4, "n_max": 8, "imbalance_ratio": 4, "source": (64, 48), "size": 32,
                           "store_side": 40, "pipeline_batch": 8, "train_batch": 8, "workers": 0}},
}
# Read only by evaluation, never by an epoch: trimmed, and a set the trimmed payload carries.
LIGHT_EVAL = {"test_ood": ("textures",), "ood_max_images": 100, "val_ood_size": 100}
TRIAL_EPOCHS, EVAL_EVERY = 400, 5
SEARCH_GPUS = 0.25
TARGETS = {"epoch_s": 1.0, "ratio": 5.0, "concurrency_4_over_1": 2.5, "trial_min": 8.0}
SEARCH_PACKAGES = ("ray", "ray.tune", "optuna", "mlflow", "sqlalchemy", "alembic")


# -- stages: each runs in a child process and calls `out(result)` whenever it has more ------------
def darl_values(p: dict) -> dict:
    return {**LIGHT_EVAL, "device": p["device"], "data_dir": p["data_dir"], "cache_dir": p["cache_dir"],
            "download": False, "n_max": p["n_max"], "batch_size": p["batch_size"], **p["set"]}


def stage_epoch(p: dict, out: Callable[[dict], None], compile_mode: str = "none") -> None:
    import epoch
    from trainables import darl, data, engine
    cfg = darl.DarlConfig.from_dict(darl_values(p))
    prepared = engine.prepare(cfg)
    initial = epoch.initial_weights(cfg, prepared)
    classes, per_class = epoch.FULL_TRAIN[cfg.dataset]
    images, full = len(prepared.id.train), sum(data.lt_counts(classes, per_class, cfg.imbalance_ratio))
    result = {"images_per_epoch": images, "full_lt_images": full, "steps_per_epoch": math.ceil(images / cfg.batch_size),
              "batch_size_per_stream": cfg.batch_size, "repeats": p["repeats"]}
    if compile_mode == "none":
        result["reference_workers_per_loader"] = p["workers"]
        seconds, memory = epoch.reference_side(cfg, prepared, initial, p["workers"], p["repeats"])
        result["reference"] = epoch.summary(seconds, memory, images, full)
        out(result)
    ours_cfg = darl.DarlConfig.from_dict({**cfg.to_dict(), "compile": compile_mode})
    result["ours_speed_settings"] = ours_cfg.speed(engine.resolve_device(cfg.device).type)
    seconds, memory, ops = epoch.ours_side(ours_cfg, prepared, initial, p["repeats"])
    result["ours"] = epoch.summary(seconds, memory, images, full)
    result["ours_aten_ops_per_step"] = ops
    out(result)


def stage_compiled(p: dict, out: Callable[[dict], None]) -> None:
    stage_epoch(p, out, p["compile_mode"])


def stage_evaluation(p: dict, out: Callable[[dict], None]) -> None:
    import epoch
    from trainables import darl
    cfg = darl.DarlConfig.from_dict({**darl_values(p), **p["eval"]})
    out(epoch.evaluation_seconds(cfg, p["repeats"], set(p["eval"])))


def stage_concurrency(p: dict, out: Callable[[dict], None]) -> None:
    import concurrency
    from trainables import darl, engine
    values = {**concurrency.trial_values(p["device"], p["batch_size"], p["n_max"], p["data_dir"], p["cache_dir"]),
              **LIGHT_EVAL, **p["set"]}
    engine.prepare(darl.DarlConfig.from_dict(values))   # decode once, before the trials start
    result = {"launcher": "processes (one per trial, all on the one device)", "epochs": p["concurrency_epochs"],
              "rows": []}
    for n in p["concurrent"]:
        windows = concurrency.process_windows(values, n, p["concurrency_epochs"], p["threads"])
        result["rows"].append(concurrency.aggregate(n, windows))
        out(result)


def method_stage(name: str) -> Callable[[dict, Callable[[dict], None]], None]:
    def stage(p: dict, out: Callable[[dict], None]) -> None:
        import epoch
        from trainables import engine, registry
        method_cls = registry.get(name)
        cfg = method_cls.config_cls.from_dict({**LIGHT_EVAL, "device": p["device"], "data_dir": p["data_dir"],
                                               "cache_dir": p["cache_dir"], "download": False,
                                               "n_max": p["n_max"], **p["set"],
                                               **({"batch_size": p["batch_size"]} if p["quick"] else {})})
        prepared = engine.prepare(cfg, method_cls.uses_outliers)
        trial = engine.Trial(method_cls, cfg, prepared)
        seconds, memory = epoch.measure(lambda index: trial.train_epoch(), p["repeats"], trial.device)
        images = len(trial.train_y)
        out({"method": name, "images_per_epoch": images, "batch_size": cfg.batch_size,
             "outliers": prepared.record.get("outlier_set", "-") if method_cls.uses_outliers else None,
             "speed_settings": cfg.speed(trial.device.type),
             **epoch.summary(seconds, memory, images, images)})
    return stage


def stage_smoke_search(p: dict, out: Callable[[dict], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu-suite-search-") as tmp:
        db = os.path.join(tmp, "mlflow.db")
        gpus = SEARCH_GPUS if p["device"] == "cuda" else 0
        cmd = [sys.executable, os.path.join(REPO, "search", "run.py"), "darl", "--preset", "smoke",
               *p["search"], "--no-download", "--data-dir", p["data_dir"], "--cache-dir", p["cache_dir"],
               "--tracking-uri", f"sqlite:///{db}", "--storage", os.path.join(tmp, "ray_results"),
               "--name", "gpu-suite-smoke", "--gpus-per-trial", f"{gpus:g}"]
        print(" ".join(cmd), flush=True)
        started = time.perf_counter()
        run = subprocess.run(cmd, cwd=tmp, stdout=sys.stdout, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        result = {"command": " ".join(cmd[1:]), "returncode": run.returncode, "wall_seconds": wall,
                  "gpus_per_trial": gpus}
        out(result)
        if run.returncode != 0:
            raise RuntimeError(f"search/run.py exited {run.returncode} (its output is in this stage's log)")
        with sqlite3.connect(db) as con:   # the trials' own record of where they ran
            tags = con.execute("SELECT key, value FROM tags WHERE key IN "
                               "('tailtune.state', 'tailtune.device')").fetchall()
    states = Counter(v for k, v in tags if k == "tailtune.state")
    devices = sorted({v for k, v in tags if k == "tailtune.device"})
    result.update({"trial_runs": sum(states.values()), "states": dict(states), "devices": devices})
    out(result)
    if devices != [p["device"]]:
        raise RuntimeError(f"the trials ran on {devices or 'no recorded device'}, expected {p['device']}")


def stage_large_lt(p: dict, out: Callable[[dict], None]) -> None:
    if p["device"] == "cuda":
        # The weights check runs cuBLAS deterministically, which needs this before CUDA starts
        # (this process only: each stage has its own).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import large_lt
    import torch
    from trainables import data
    q = p["large_lt"]
    workers = q["workers"] if q["workers"] is not None else os.cpu_count()
    counts = data.lt_counts(q["classes"], q["n_max"], q["imbalance_ratio"])
    with tempfile.TemporaryDirectory(prefix="gpu-suite-large-lt-") as tmp:
        started = time.perf_counter()
        paths = large_lt.write_lt_tree(tmp, counts, *q["source"])
        result = {"set": f"generated ImageNet-LT format: {len(counts)} classes, {counts[0]} to {counts[-1]} images "
                         f"(IR {q['imbalance_ratio']:g}), {len(paths)} training JPEGs "
                         f"{q['source'][0]}x{q['source'][1]}", "write_s": time.perf_counter() - started,
                  "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
        result["pipeline"] = large_lt.compare(paths, torch.device(p["device"]), q["size"], q["store_side"],
                                              q["pipeline_batch"], workers, p["repeats"])
        out(result)

        def progress(training: dict) -> None:
            out({**result, "training": training})

        result["training"] = large_lt.training_epochs(tmp, os.path.join(tmp, "cache"), p["device"], q["size"],
                                                      q["store_side"], q["train_batch"], p["repeats"],
                                                      progress=progress)
        out(result)
    check = result["training"]["weights_check"]
    if check == "DIFFER":
        losses = {k: row["check_train_loss"] for k, row in result["training"]["placements"].items()}
        raise RuntimeError(f"one epoch resident, streamed and prefetched left different weights and losses {losses}")


STAGE_FUNCTIONS = {"epoch": stage_epoch, "evaluation": stage_evaluation, "concurrency": stage_concurrency,
                   "compiled": stage_compiled, "smoke_search": stage_smoke_search,
                   "rna": method_stage("rna"), "open_sampling": method_stage("open_sampling"),
                   "large_lt": stage_large_lt}


def child(name: str, params_json: str, out_path: str) -> int:
    """Runs one stage in this process, writing its (partial) result to `out_path` as it goes."""
    def out(result: dict) -> None:
        with open(out_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(out_path + ".tmp", out_path)

    params = json.loads(params_json)
    if params["device"] == "cpu" and params.get("threads"):
        import torch
        torch.set_num_threads(params["threads"])
    STAGE_FUNCTIONS[name](params, out)
    return 0


# -- the suite -------------------------------------------------------------------------------------
def last_line(path: str) -> str:
    """Returns the last non-empty line of a log: for a traceback, the exception and its message."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f.read().splitlines()[-400:] if line.strip()]
    return lines[-1][:400] if lines else "no output"


def run_stage(name: str, params: dict, limit_s: float, logs: str, env: dict) -> dict:
    """Runs one stage as a child process in its own process group; returns its JSON record."""
    log, out_path = os.path.join(logs, f"{name}.log"), os.path.join(logs, f"{name}.json")
    if os.path.exists(out_path):
        os.remove(out_path)
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--stage", name,
                                 "--stage-params", json.dumps(params), "--stage-out", out_path],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the stage and what it started (workers, trials)
            proc.wait()
            code, timed_out = None, True
    record: dict[str, Any] = {"seconds": time.perf_counter() - started, "limit_s": round(limit_s),
                              "log": os.path.relpath(log, os.path.dirname(logs))}
    if os.path.exists(out_path):
        with open(out_path) as f:
            record["result"] = json.load(f)
    if timed_out:
        record.update(status="timed out", error=f"stopped after its limit of {limit_s:.0f} s; "
                                                f"what it had measured is kept")
    elif code != 0:
        record.update(status="failed", error=last_line(log))
    else:
        record["status"] = "ok"
    return record


def importable(modules: tuple[str, ...], env: dict) -> str | None:
    """Returns None if every module imports in a fresh interpreter, else one line saying why not."""
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    try:
        run = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                             env=env, timeout=180)
    except subprocess.TimeoutExpired:
        return "importing them took over 180 s"
    return None if run.returncode == 0 else (run.stderr.strip().splitlines() or ["?"])[-1]


def versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib import metadata
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def find_data_dir(given: str | None) -> str | None:
    """Returns the first folder holding the CIFAR-10 archive: --data-dir, TAILTUNE_DATA_DIR, the
    carried payload's data, then ../shared/data beside the repository."""
    candidates = [given, os.environ.get("TAILTUNE_DATA_DIR"), gpu_payload.data_dir(),
                  os.path.join(os.path.dirname(REPO), "shared", "data"), os.path.join(REPO, "shared", "data")]
    for folder in candidates:
        if folder and (os.path.isfile(os.path.join(folder, "cifar10.tar.gz"))
                       or os.path.isdir(os.path.join(folder, "cifar-10-batches-py"))):
            return os.path.abspath(folder)
    return None


def summarise(stages: dict[str, dict], device: str, quick: bool) -> tuple[dict, list[dict]]:
    """Returns (the headline numbers, the targets with whether each is met), all computed from the
    stages' own numbers; a number whose stage did not deliver it is None."""
    res = {name: stages.get(name, {}).get("result") or {} for name in STAGES}
    ep, comp = res["epoch"], res["compiled"]
    ref = ep.get("reference")
    summary: dict[str, Any] = {}
    for label, side in (("eager", ep.get("ours")), ("compiled", comp.get("ours"))):
        summary[f"darl_epoch_s_{label}"] = side["epoch_seconds_measured"] if side else None
        summary[f"darl_epoch_s_full_lt_{label}"] = side["epoch_seconds_full_lt"] if side else None
        summary[f"darl_ratio_{label}_over_reference"] = (side["images_per_second"] / ref["images_per_second"]
                                                         if side and ref else None)
        summary[f"darl_peak_device_mib_{label}"] = side["peak_device_mib"] if side else None
        summary["darl_compile_warmup_s" if label == "compiled" else "darl_warmup_s"] = (
            side["warmup_seconds"] if side else None)
    summary["reference_epoch_s"] = ref["epoch_seconds_measured"] if ref else None
    summary["reference_epoch_s_full_lt"] = ref["epoch_seconds_full_lt"] if ref else None
    ev = res["evaluation"]
    validations = math.ceil(TRIAL_EPOCHS / EVAL_EVERY)
    for label in ("eager", "compiled"):
        epoch_s = summary[f"darl_epoch_s_{label}"]
        summary[f"projected_trial_min_{label}"] = (
            (TRIAL_EPOCHS * epoch_s + validations * ev["validate_seconds"] + ev["test_seconds"]) / 60
            if epoch_s is not None and ev else None)
    summary["projection"] = (f"{TRIAL_EPOCHS} x epoch + {validations} validations x "
                             f"{ev['validate_seconds']:.2f} s + test {ev['test_seconds']:.2f} s" if ev else None)
    rows = {row["concurrent"]: row for row in res["concurrency"].get("rows", [])}
    summary["concurrency_images_per_s"] = {str(n): row["images_per_s"] for n, row in rows.items()}
    summary["concurrency_peak_device_mib_per_trial"] = {str(n): row["peak_device_mib_per_trial"]
                                                        for n, row in rows.items()}
    summary["concurrency_speedup_over_1"] = ({str(n): row["images_per_s"] / rows[1]["images_per_s"]
                                              for n, row in rows.items()} if 1 in rows else {})
    summary["concurrency_4_over_1"] = summary["concurrency_speedup_over_1"].get("4")
    for name in ("rna", "open_sampling"):
        summary[f"{name}_epoch_s"] = res[name].get("epoch_seconds_measured")
        summary[f"{name}_peak_device_mib"] = res[name].get("peak_device_mib")
    pipeline, training = res["large_lt"].get("pipeline"), res["large_lt"].get("training")
    summary["large_lt_pipeline_images_per_s"] = ({side: pipeline[f"{side}_images_per_s"]
                                                  for side in ("conventional", "ours")} if pipeline else None)
    summary["large_lt_pipeline_ratio"] = pipeline["ratio_ours_over_conventional"] if pipeline else None
    summary["large_lt_pipeline_workers"] = pipeline["workers"] if pipeline else None
    summary["large_lt_size"] = pipeline["size"] if pipeline else None
    rows = (training or {}).get("placements", {})   # as far as the stage got
    ips = {k: row["images_per_s"] for k, row in rows.items()}
    summary["large_lt_train_images_per_s"] = ips or None
    summary["large_lt_train_ratio_over_resident"] = ({k: v / ips["resident"] for k, v in ips.items()}
                                                     if "resident" in ips else None)
    summary["large_lt_prefetch_over_no_prefetch"] = (ips["streamed_prefetch"] / ips["streamed"]
                                                     if {"streamed", "streamed_prefetch"} <= set(ips) else None)
    summary["large_lt_peak_device_mib"] = {k: row["peak_device_mib"] for k, row in rows.items()} or None
    summary["large_lt_weights_check"] = (training or {}).get("weights_check")
    search = res["smoke_search"]
    summary["smoke_search"] = ({k: search.get(k) for k in ("returncode", "wall_seconds", "trial_runs", "states",
                                                           "devices", "gpus_per_trial")} if search else None)

    def best(*values: float | None, lower: bool = True) -> float | None:
        found = [v for v in values if v is not None]
        return (min(found) if lower else max(found)) if found else None

    applies = device == "cuda" and not quick
    targets = []
    for what, value, goal, lower in (
            ("DARL epoch, full CIFAR-10-LT IR100 (s, best of eager/compiled)",
             best(summary["darl_epoch_s_full_lt_eager"], summary["darl_epoch_s_full_lt_compiled"]),
             TARGETS["epoch_s"], True),
            ("ours / conventional loop, same run (x, best)",
             best(summary["darl_ratio_eager_over_reference"], summary["darl_ratio_compiled_over_reference"],
                  lower=False), TARGETS["ratio"], False),
            ("4 concurrent trials / 1 (aggregate images/s)", summary["concurrency_4_over_1"],
             TARGETS["concurrency_4_over_1"], False),
            ("projected 400-epoch trial with evaluation (min, best)",
             best(summary["projected_trial_min_eager"], summary["projected_trial_min_compiled"]),
             TARGETS["trial_min"], True)):
        met = None if value is None or not applies else (value <= goal if lower else value >= goal)
        targets.append({"what": what, "value": value, "goal": f"{'<=' if lower else '>='} {goal:g}",
                        "met": met if applies else "not applicable (targets are for CUDA, full sizes)"})
    return summary, targets


def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict) -> None:
    s = report["summary"]
    print(f"\nGPU suite on {report['environment']['device_name']} ({report['suite']['mode']}, "
          f"torch {report['environment']['torch']}), {report['suite']['wall_seconds']:.0f} s")
    print(f"{'stage':<14}{'status':<11}{'s':>6}  notes")
    for name, st in report["stages"].items():
        note = st.get("reason") or st.get("error") or ""
        print(f"{name:<14}{st['status']:<11}{fmt(st.get('seconds'), '.0f'):>6}  {note}")
    print("\nDARL epoch (s, measured set / scaled to the whole LT set), images/s ratio to the reference:")
    print(f"  reference (DataLoader, fp32 eager)  {fmt(s['reference_epoch_s'])} / "
          f"{fmt(s['reference_epoch_s_full_lt'])}")
    for label in ("eager", "compiled"):
        print(f"  ours {label:<31}{fmt(s[f'darl_epoch_s_{label}'])} / {fmt(s[f'darl_epoch_s_full_lt_{label}'])}"
              f"   x{fmt(s[f'darl_ratio_{label}_over_reference'])}"
              f"   peak {fmt(s[f'darl_peak_device_mib_{label}'], ',.0f')} MiB"
              f"   projected {TRIAL_EPOCHS}-epoch trial {fmt(s[f'projected_trial_min_{label}'], '.1f')} min")
    if s["projection"]:
        print(f"  projection: {s['projection']}")
    if s["concurrency_images_per_s"]:
        print("concurrent trials: " + ", ".join(
            f"{n}: {ips:,.0f} img/s (x{s['concurrency_speedup_over_1'].get(n, float('nan')):.2f}, "
            f"peak {fmt(s['concurrency_peak_device_mib_per_trial'][n], ',.0f')} MiB/trial)"
            for n, ips in s["concurrency_images_per_s"].items()))
    print(f"RNA epoch {fmt(s['rna_epoch_s'])} s, Open-sampling epoch {fmt(s['open_sampling_epoch_s'])} s (ours, eager)")
    if s["large_lt_pipeline_ratio"] is not None:
        ips = s["large_lt_pipeline_images_per_s"]
        print(f"large-set input at {s['large_lt_size']} px (generated JPEGs, no network): DataLoader + PIL "
              f"({s['large_lt_pipeline_workers']} workers) {ips['conventional']:,.0f} img/s, ours {ips['ours']:,.0f} "
              f"img/s, ours/conventional x{s['large_lt_pipeline_ratio']:.2f}")
    if s["large_lt_train_images_per_s"]:
        ratio = s["large_lt_train_ratio_over_resident"]
        print(f"large-set ResNet-50 epoch at {s['large_lt_size']} px, images/s (x resident): " + ", ".join(
            f"{k.replace('_', ' + ')} {v:,.1f} (x{ratio[k]:.2f})" for k, v in s["large_lt_train_images_per_s"].items())
            + f"; prefetch / none x{fmt(s['large_lt_prefetch_over_no_prefetch'])}")
        print(f"  one epoch from the same weights, resident / streamed / prefetched: "
              f"{s['large_lt_weights_check'] or 'not checked (the stage did not finish)'}")
    if s["smoke_search"]:
        print(f"smoke search: exit {s['smoke_search']['returncode']}, "
              f"{fmt(s['smoke_search']['wall_seconds'], '.0f')} s, "
              f"trials {s['smoke_search']['states']} on {s['smoke_search']['devices']}, "
              f"{s['smoke_search']['gpus_per_trial']} GPU per trial")
    print("\ntargets:")
    for t in report["targets"]:
        met = {True: "met", False: "NOT met", None: "no number"}.get(t["met"], t["met"])
        print(f"  {t['what']:<66}{fmt(t['value']):>8}  goal {t['goal']:<7} {met}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_suite.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="[cuda]")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks every stage's code, not speed")
    p.add_argument("--json", metavar="OUT", help="write the results here (after every stage)")
    p.add_argument("--install-only", action="store_true", help="install carried wheels (.gpu-payload), then stop")
    p.add_argument("--skip", default="", help=f"comma-separated stages to leave out: {', '.join(STAGES)}")
    p.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    p.add_argument("--budget-s", type=float, help="stop starting stages after this many seconds "
                   f"[{MODES['full']['budget_s']}; quick {MODES['quick']['budget_s']}]")
    p.add_argument("--compile-mode", default="reduce-overhead", help="the compiled stage's compile= [reduce-overhead]")
    p.add_argument("--data-dir", help="offline archives [env TAILTUNE_DATA_DIR, the carried payload, ../shared/data]")
    p.add_argument("--cache-dir", default=os.environ.get("TAILTUNE_CACHE_DIR"),
                   help="decoded-image cache [env TAILTUNE_CACHE_DIR, ~/.cache/tailtune]")
    p.add_argument("--threads", type=int, help="torch threads per process on cpu [1 with --quick "
                   "(on a busy machine more threads wait on each other), else torch's default]")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-params", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return child(args.stage, args.stage_params, args.stage_out)

    if args.install_only:
        try:
            print(gpu_payload.install())
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if not args.json:
        p.error("--json OUT is required (unless --install-only)")
    chosen = {name.strip() for name in (args.only or ",".join(STAGES)).split(",") if name.strip()}
    skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = sorted((chosen | skipped) - set(STAGES))
    if unknown:
        p.error(f"unknown stage {', '.join(unknown)}; expected some of: {', '.join(STAGES)}")

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda but torch {torch.__version__} sees no CUDA device "
              f"(torch.cuda.is_available() is False); run on a GPU machine or pass --device cpu", file=sys.stderr)
        return 2
    try:
        payload = gpu_payload.install()
    except RuntimeError as e:
        payload = f"wheels not installed: {e}"   # only the search needs them
    site = gpu_payload.site_dir()
    if site:
        sys.path.append(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [REPO, *filter(None, [os.environ.get("PYTHONPATH"), site])])}
    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        print(f"error: no offline data: --data-dir {args.data_dir} and the defaults (TAILTUNE_DATA_DIR, "
              f".gpu-payload, ../shared/data) hold no cifar10.tar.gz", file=sys.stderr)
        return 2
    from trainables.config import DEFAULT_CACHE_DIR

    mode = MODES["quick" if args.quick else "full"]
    budget = args.budget_s if args.budget_s is not None else mode["budget_s"]
    params = {"device": args.device, "quick": args.quick, "data_dir": data_dir,
              "cache_dir": os.path.abspath(args.cache_dir or DEFAULT_CACHE_DIR),
              "threads": args.threads or (1 if args.quick and args.device == "cpu" else None),
              "compile_mode": args.compile_mode, **{k: mode[k] for k in (
                  "n_max", "set", "batch_size", "repeats", "workers", "concurrent", "concurrency_epochs",
                  "eval", "search", "large_lt")}}
    out = os.path.abspath(args.json)
    logs = os.path.splitext(out)[0] + "-logs"
    os.makedirs(logs, exist_ok=True)
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    report: dict[str, Any] = {
        "suite": {"mode": "quick" if args.quick else "full", "device": args.device, "budget_s": budget,
                  "started_utc": started.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
                  "trial_projection": {"epochs": TRIAL_EPOCHS, "eval_every": EVAL_EVERY},
                  "targets": TARGETS, "sizes": {k: v for k, v in params.items() if k not in ("data_dir", "cache_dir")}},
        "environment": {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                        "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                                        else platform.processor() or platform.machine()),
                        "device_memory_mib": (torch.cuda.get_device_properties(0).total_memory / 2**20
                                              if args.device == "cuda" else None),
                        "data_dir": data_dir, "payload": payload,
                        "packages": versions(("torchvision", "numpy", "ray", "optuna", "mlflow-skinny", "mlflow",
                                              "sqlalchemy", "alembic", "pyarrow")),
                        "load_average_1m_before": os.getloadavg()[0]},
        "stages": {}}

    def save() -> None:
        report["suite"]["wall_seconds"] = time.perf_counter() - t0
        report["summary"], report["targets"] = summarise(report["stages"], args.device, args.quick)
        with open(out + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(out + ".tmp", out)

    print(f"GPU suite: {report['environment']['device_name']}, torch {torch.__version__}, data {data_dir}; "
          f"{payload}; budget {budget:.0f} s; logs in {logs}", flush=True)
    for name in STAGES:
        reason = None
        if name not in chosen or name in skipped:
            reason = "left out (--only/--skip)"
        elif name == "compiled" and args.device == "cpu" and not args.only:
            reason = ("compile is measured on CUDA (on CPU its warm-up alone takes minutes); "
                      "--only compiled runs it anyway")
        elif name == "smoke_search":
            missing = importable(SEARCH_PACKAGES, env)
            if missing:
                reason = (f"needs ray, optuna and mlflow: {missing} ({payload}; "
                          f"see bench/gpu_payload.py)")
        # Time kept for later stages that will run (mode["reserve_s"]) is not this stage's.
        later = [n for n in STAGES[STAGES.index(name) + 1:] if n in chosen and n not in skipped]
        kept = sum(mode["reserve_s"].get(n, 0) for n in later)
        remaining = budget - (time.perf_counter() - t0) - kept
        if reason is None and remaining < 20:
            reason = (f"the suite's budget ({budget:.0f} s, --budget-s) was spent"
                      + (f" ({kept} s of it kept for {', '.join(n for n in later if n in mode['reserve_s'])})"
                         if kept else ""))
        if reason:
            report["stages"][name] = {"status": "skipped", "reason": reason}
        else:
            limit = min(mode["limits"][name], remaining)
            print(f"[{time.perf_counter() - t0:5.0f} s] {name} (limit {limit:.0f} s) ...", flush=True)
            report["stages"][name] = run_stage(name, params, limit, logs, env)
        st = report["stages"][name]
        print(f"[{time.perf_counter() - t0:5.0f} s] {name}: {st['status']}"
              + (f" ({st.get('reason') or st.get('error')})" if st["status"] != "ok" else ""), flush=True)
        save()
    report["suite"]["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    print_report(report)
    print(f"\nwritten: {out} (stage logs in {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
