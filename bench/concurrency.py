#!/usr/bin/env python
"""Aggregate throughput of N concurrent trials sharing one device, as Ray Tune runs them.

    python bench/concurrency.py --device cuda --concurrent 1,2,4,8 --json concurrency.json
    python bench/concurrency.py --device cpu --concurrent 1,2 --n-max 100     # the CPU check

For each N, N Ray tasks are started with a 1/N share of the device (num_gpus=1/N on cuda, the CPUs
split on cpu), exactly the fractional resources `search/run.py --gpus-per-trial` asks for. Each
task builds one DARL trial (its own model and data on the device) and runs one untimed warm-up
epoch; then all N wait at a barrier and run `--epochs` timed epochs together. Aggregate images/s =
all tasks' long-tailed images / (last task's end - the barrier's release). The table gives it per
N, the speed-up over N = 1 and each trial's peak device memory. `--launcher processes` runs the
same trials as N plain processes (no Ray needed; each sees the whole device).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainables import darl, engine  # noqa: E402
from trainables.config import DEFAULT_CACHE_DIR  # noqa: E402

MIB = 2 ** 20


class Barrier:
    """Releases every waiter once `parties` have arrived (a Ray actor: `ray.remote(num_cpus=0)(Barrier)`)."""

    def __init__(self, parties: int):
        self.parties, self.arrived, self.released = parties, 0, asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.released.set()
        await self.released.wait()


def run_trial(values: dict, epochs: int, wait: Callable[[], object]) -> dict:
    """Returns the timed window, the long-tailed images of one trial's epochs and its peak device
    memory (MiB, None on cpu); `wait()` returns once every concurrent trial is warm."""
    import torch
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = darl.DarlConfig.from_dict(values)
    trial = engine.Trial(darl.Method, cfg, engine.prepare(cfg))
    cuda = trial.device.type == "cuda"
    trial.train_epoch()                                  # warm-up: allocations, kernels, caches
    if cuda:
        torch.cuda.synchronize()
    wait()
    started = time.time()
    for _ in range(epochs):
        trial.train_epoch()
    if cuda:
        torch.cuda.synchronize()
    return {"start": started, "end": time.time(), "images": epochs * len(trial.train_y),
            "peak_device_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None}


def ray_windows(values: dict, n: int, epochs: int, device: str) -> list[dict]:
    """Runs `run_trial` in N Ray tasks with a 1/N share of the device (Ray already started)."""
    import ray
    cpus = ray.cluster_resources().get("CPU", 1)
    share = ({"num_gpus": 1 / n, "num_cpus": max(cpus / n / 2, 0.01)} if device == "cuda"
             else {"num_cpus": cpus / n})
    threads = str(max(1, int(cpus // n)))

    def ray_trial(values: dict, epochs: int, barrier) -> dict:
        return run_trial(values, epochs, lambda: ray.get(barrier.wait.remote()))

    task = ray.remote(**share)(ray_trial).options(runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    barrier = ray.remote(num_cpus=0)(Barrier).remote(n)
    return ray.get([task.remote(values, epochs, barrier) for _ in range(n)])


def _process_trial(values: dict, epochs: int, barrier, results, threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        results.put(run_trial(values, epochs, lambda: barrier.wait(timeout=1800)))
    except BaseException as e:  # reported by the parent, which stops the others
        results.put({"error": f"{type(e).__name__}: {e}"})
        barrier.abort()


def process_windows(values: dict, n: int, epochs: int, threads: int | None = None,
                    timeout_s: float = 1800) -> list[dict]:
    """Runs `run_trial` in N spawned processes sharing the device, all released by one barrier,
    each with `threads` torch threads (default: the CPUs split N ways). Raises RuntimeError naming
    the first trial's error."""
    ctx = multiprocessing.get_context("spawn")   # CUDA cannot be used in forked children
    barrier, results = ctx.Barrier(n), ctx.Queue()
    threads = threads or max(1, (os.cpu_count() or 1) // n)
    procs = [ctx.Process(target=_process_trial, args=(values, epochs, barrier, results, threads))
             for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        windows = [results.get(timeout=timeout_s) for _ in range(n)]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    errors = [w["error"] for w in windows if "error" in w]
    if errors:
        raise RuntimeError(f"{n} concurrent trials: {errors[0]}")
    return windows


def aggregate(n: int, windows: list[dict]) -> dict:
    """Returns one row: all trials' LT images over the window from the barrier to the last end."""
    seconds = max(w["end"] for w in windows) - min(w["start"] for w in windows)
    images = sum(w["images"] for w in windows)
    peaks = [w["peak_device_mib"] for w in windows if w.get("peak_device_mib") is not None]
    return {"concurrent": n, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "peak_device_mib_per_trial": max(peaks) if peaks else None}


def trial_values(device: str, batch_size: int, n_max: int | None, data_dir: str | None,
                 cache_dir: str | None) -> dict:
    """The config every concurrent trial trains with (evaluation sets trimmed: never read)."""
    return {"device": device, "batch_size": batch_size, "data_dir": data_dir, "cache_dir": cache_dir,
            "download": False, "test_ood": ("mnist",), "ood_max_images": 100, "val_ood_size": 100,
            "n_max": n_max}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/concurrency.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--concurrent", default="1,2,4,8", help="comma-separated trial counts")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per trial")
    p.add_argument("--n-max", type=int, default=None, help="head-class size (default: full build)")
    p.add_argument("--batch-size", type=int, default=128, help="per stream (paper: 128)")
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"))
    p.add_argument("--cache-dir", default=os.environ.get("TAILTUNE_CACHE_DIR", DEFAULT_CACHE_DIR))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more config for every trial, e.g. precision=bf16")
    p.add_argument("--launcher", choices=("ray", "processes"), default="ray",
                   help="ray: N Ray tasks with 1/N of the device each, as a search runs them (default); "
                        "processes: N plain processes")
    p.add_argument("--json", help="write the numbers here as JSON")
    args = p.parse_args(argv)
    values = trial_values(args.device, args.batch_size, args.n_max, args.data_dir, args.cache_dir)
    values.update(engine.parse_settings(p, args.set))
    engine.prepare(darl.DarlConfig.from_dict(values))      # decode once, before the tasks start

    if args.launcher == "ray":
        import ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 2**20)
    rows = []
    for n in [int(v) for v in args.concurrent.split(",")]:
        windows = (ray_windows(values, n, args.epochs, args.device) if args.launcher == "ray"
                   else process_windows(values, n, args.epochs))
        rows.append(aggregate(n, windows))
        print(f"{n} concurrent: {rows[-1]['images_per_s']:.1f} images/s aggregate", flush=True)
    if args.launcher == "ray":
        ray.shutdown()

    base = rows[0]["images_per_s"]
    print(f"\nDARL, batch {args.batch_size} per stream, device {args.device}; images/s counts "
          f"long-tailed-stream images (4 network rows each)")
    print(f"{'trials':>7}{'images/s':>11}{'speed-up':>10}{'peak MiB/trial':>16}")
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
        peak = row["peak_device_mib_per_trial"]
        print(f"{row['concurrent']:>7}{row['images_per_s']:>11.1f}{row['speedup']:>9.2f}x"
              f"{'-' if peak is None else f'{peak:,.0f}':>16}")
    if args.json:
        import torch
        env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
               "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "launcher": args.launcher, "config": values, "environment": env}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
