#!/usr/bin/env python
"""What the service costs on top of bare training, and what ASHA saves.

    python bench/overhead.py --method ce --trials 4 --epochs 3 --json overhead.json

1. Service: `search/run.py METHOD` (Ray Tune + Optuna + MLflow, champion registration included),
   no pruning (grace period = epochs), on the smoke preset, one trial at a time.
2. Direct: the same configurations (read back from the search's trial folders) trained one after
   another by `engine.fit` in one new Python process on data prepared once: no Ray, no Optuna, no
   MLflow, the least a hand-written script over the configurations would cost. Both sides are
   timed as whole commands, from process start to exit.
3. ASHA: the same search and seed with pruning (grace 1, reduction factor 2): epochs spent and the
   best validation score, against the unpruned search.
Overhead = service wall time / direct wall time - 1, split into what the trials themselves take
under Ray (Tune's time_total_s per trial: training, reporting, checkpointing) against the direct
fits, and a fixed part (imports, Ray start, the first actor, the MLflow run set-up, registering the
champion). Data comes from --data-dir (offline archives) and the decoded-image cache is warmed
first, so neither side pays for decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from search.run import PRESETS  # noqa: E402
from trainables import engine, registry  # noqa: E402
from trainables.config import DEFAULT_CACHE_DIR  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_OOD = "cifar100,tin,textures,mnist,fashion_mnist"


def search(args, root: str, name: str, grace: int) -> tuple[float, str]:
    """Runs one search; returns (wall seconds, its trial folder)."""
    storage = os.path.join(root, "ray_results")
    cmd = [sys.executable, os.path.join(REPO, "search", "run.py"), args.method,
           "--trials", str(args.trials), "--epochs", str(args.epochs), "--grace-period", str(grace),
           "--reduction-factor", "2", "--seed", str(args.seed), "--data-dir", args.data_dir,
           "--cache-dir", args.cache_dir, "--no-download", "--test-ood", TEST_OOD, "--name", name,
           "--storage", storage, "--tracking-uri", args.tracking_uri or f"sqlite:///{root}/mlflow.db"]
    for item in args.set:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"search {name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return seconds, os.path.join(storage, name)


def trials(folder: str) -> list[dict]:
    """Returns each trial's sampled config, epochs run and last validation score."""
    out = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not os.path.exists(os.path.join(path, "params.json")):
            continue
        with open(os.path.join(path, "params.json")) as f:
            params = json.load(f)
        with open(os.path.join(path, "result.json")) as f:
            results = [json.loads(line) for line in f if line.strip()]
        out.append({"params": params, "epochs": results[-1]["epoch"] if results else 0,
                    "val_score": results[-1]["val_score"] if results else None,
                    "seconds": results[-1]["time_total_s"] if results else 0.0})
    return out


def direct(method: str, fixed: dict, configs: list[dict], root: str) -> tuple[float, list[float], list[float]]:
    """Trains `configs` one after another in a new process; returns (wall seconds of the whole
    command, seconds of each fit, each fit's last val_score)."""
    spec, result = os.path.join(root, "direct.json"), os.path.join(root, "direct-out.json")
    with open(spec, "w") as f:
        json.dump({"method": method, "fixed": fixed, "configs": configs, "out": result}, f)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--direct-from", spec],
                          cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"direct training failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    with open(result) as f:
        out = json.load(f)
    return seconds, out["seconds"], out["val_scores"]


def run_direct(spec_path: str) -> None:
    """The direct side's process: prepare once, then `engine.fit` each configuration."""
    with open(spec_path) as f:
        spec = json.load(f)
    method_cls = registry.get(spec["method"])
    fixed = spec["fixed"]
    prepared = engine.prepare(method_cls.config_cls.from_dict(fixed), method_cls.uses_outliers)
    seconds, scores = [], []
    for params in spec["configs"]:
        cfg = method_cls.config_cls.from_dict({**fixed, **params})
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            scores.append(engine.fit(method_cls, cfg, engine.LocalReporter(out), prepared)["val_score"])
        seconds.append(time.perf_counter() - started)
    with open(spec["out"], "w") as f:
        json.dump({"seconds": seconds, "val_scores": scores}, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/overhead.py", description=__doc__.split("\n")[0])
    p.add_argument("--method", default="ce")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"))
    p.add_argument("--cache-dir", default=os.environ.get("TAILTUNE_CACHE_DIR", DEFAULT_CACHE_DIR))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a smoke-preset field on both sides, e.g. n_max=1000 (longer epochs)")
    p.add_argument("--tracking-uri", help="MLflow server for the searches (default: a fresh sqlite "
                   "file, whose table creation, about 5 s, counts as service time)")
    p.add_argument("--json", help="write the numbers here as JSON")
    p.add_argument("--direct-from", help=argparse.SUPPRESS)   # internal: the direct side's process
    args = p.parse_args(argv)
    if args.direct_from:
        run_direct(args.direct_from)
        return 0
    if not args.data_dir:
        raise SystemExit("error: pass --data-dir (or set TAILTUNE_DATA_DIR) to the offline archives")
    method_cls = registry.get(args.method)
    fixed = {**PRESETS["smoke"]["config"], "data_dir": args.data_dir, "cache_dir": args.cache_dir,
             "download": False, "epochs": args.epochs, "seed": args.seed,
             "test_ood": tuple(TEST_OOD.split(","))}
    fixed.update(engine.parse_settings(p, args.set))
    engine.prepare(method_cls.config_cls.from_dict(fixed), method_cls.uses_outliers)   # warm the cache

    with tempfile.TemporaryDirectory() as root:
        service_s, folder = search(args, root, "no-pruning", grace=args.epochs)
        full = trials(folder)
        direct_s, direct_trial_s, direct_scores = direct(args.method, fixed, [t["params"] for t in full], root)
        asha_s, asha_folder = search(args, root, "asha", grace=1)
        pruned = trials(asha_folder)

    def best(rows):
        done = [r["val_score"] for r in rows if r["epochs"] == args.epochs]
        return max(done) if done else None

    report = {
        "method": args.method, "trials": args.trials, "epochs": args.epochs, "preset": "smoke",
        "overrides": args.set,
        "service_seconds": service_s, "direct_seconds": direct_s,
        "overhead": service_s / direct_s - 1,
        "service_trial_seconds": [t["seconds"] for t in full], "direct_trial_seconds": direct_trial_s,
        "in_trial_overhead": sum(t["seconds"] for t in full) / sum(direct_trial_s) - 1,
        "fixed_seconds": service_s - sum(t["seconds"] for t in full),
        "direct_fixed_seconds": direct_s - sum(direct_trial_s),
        "service_vs_direct_val_score": [[t["val_score"], d] for t, d in zip(full, direct_scores)],
        "no_pruning": {"seconds": service_s, "epochs_spent": sum(t["epochs"] for t in full),
                       "best_val_score": best(full)},
        "asha": {"seconds": asha_s, "epochs_spent": sum(t["epochs"] for t in pruned),
                 "best_val_score": best(pruned)},
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "command": " ".join(sys.argv)},
    }
    print(f"{args.trials} trials x {args.epochs} epochs of {args.method}, smoke preset "
          f"{' '.join(args.set)}, one trial at a time")
    print(f"{'':<34}{'wall s':>9}")
    print(f"{'direct (engine.fit, no services)':<34}{direct_s:>9.1f}")
    print(f"{'  of which the fits':<34}{sum(direct_trial_s):>9.1f}")
    print(f"{'  of which fixed (start, data)':<34}{report['direct_fixed_seconds']:>9.1f}")
    print(f"{'search/run.py (Ray+Optuna+MLflow)':<34}{service_s:>9.1f}")
    in_trials = sum(t["seconds"] for t in full)
    print(f"{'  of which inside the trials':<34}{in_trials:>9.1f}   ({100 * report['in_trial_overhead']:+.1f}% "
          f"over the direct fits)")
    print(f"{'  of which fixed (start, end)':<34}{report['fixed_seconds']:>9.1f}")
    print(f"overhead of the service: {100 * report['overhead']:+.1f}% (target < 10%)")
    print(f"{'':<14}{'epochs spent':>14}{'best val_score':>16}{'wall s':>9}")
    for label, row in (("no pruning", report["no_pruning"]), ("ASHA", report["asha"])):
        score = f"{row['best_val_score']:.4f}" if row["best_val_score"] is not None else "-"
        print(f"{label:<14}{row['epochs_spent']:>14}{score:>16}{row['seconds']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
