#!/usr/bin/env python
"""Aggregate throughput of N concurrent trials sharing one device, as Ray Tune runs them.

    python bench/concurrency.py --device cuda --concurrent 1,2,4,8 --json concurrency.json
    python bench/concurrency.py --device cpu --concurrent 1,2 --n-max 100     # the CPU check

For each N, N Ray tasks are started with a 1/N share of the device (num_gpus=1/N on cuda, the CPUs
split on cpu), exactly the fractional resources `search/run.py --gpus-per-trial` asks for. Each
task builds one DARL trial (its own model and data on the device) and runs one untimed warm-up
epoch; then all N wait at a barrier and run `--epochs` timed epochs together. Aggregate images/s =
all tasks' long-tailed images / (last task's end - the barrier's release). The table gives it per
N and the speed-up over N = 1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from trainables import darl, engine  # noqa: E402
from trainables.config import DEFAULT_CACHE_DIR  # noqa: E402


@ray.remote(num_cpus=0)
class Barrier:
    """Releases every waiter once `parties` have arrived."""

    def __init__(self, parties: int):
        self.parties, self.arrived, self.released = parties, 0, asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.released.set()
        await self.released.wait()


def run_trial(values: dict, epochs: int, barrier) -> dict:
    """Returns the timed window and the long-tailed images of one trial's epochs."""
    import torch
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = darl.DarlConfig.from_dict(values)
    trial = engine.Trial(darl.Method, cfg, engine.prepare(cfg))
    trial.train_epoch()                                  # warm-up: allocations, kernels, caches
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    ray.get(barrier.wait.remote())
    started = time.time()
    for _ in range(epochs):
        trial.train_epoch()
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    return {"start": started, "end": time.time(), "images": epochs * len(trial.train_y)}


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
    p.add_argument("--json", help="write the numbers here as JSON")
    args = p.parse_args(argv)
    values = {"device": args.device, "batch_size": args.batch_size, "data_dir": args.data_dir,
              "cache_dir": args.cache_dir, "download": False, "test_ood": ("mnist",),
              "ood_max_images": 100, "val_ood_size": 100, "n_max": args.n_max}
    values.update(engine.parse_settings(p, args.set))
    engine.prepare(darl.DarlConfig.from_dict(values))      # decode once, before the tasks start

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    cpus = ray.cluster_resources().get("CPU", 1)
    rows = []
    for n in [int(v) for v in args.concurrent.split(",")]:
        share = ({"num_gpus": 1 / n, "num_cpus": max(cpus / n / 2, 0.01)} if args.device == "cuda"
                 else {"num_cpus": cpus / n})
        threads = str(max(1, int(cpus // n)))
        task = ray.remote(**share)(run_trial).options(runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
        barrier = Barrier.remote(n)
        windows = ray.get([task.remote(values, args.epochs, barrier) for _ in range(n)])
        seconds = max(w["end"] for w in windows) - min(w["start"] for w in windows)
        rows.append({"concurrent": n, "images": sum(w["images"] for w in windows), "seconds": seconds,
                     "images_per_s": sum(w["images"] for w in windows) / seconds})
        print(f"{n} concurrent: {rows[-1]['images_per_s']:.1f} images/s aggregate", flush=True)
    ray.shutdown()

    base = rows[0]["images_per_s"]
    print(f"\nDARL, batch {args.batch_size} per stream, device {args.device}; images/s counts "
          f"long-tailed-stream images (4 network rows each)")
    print(f"{'trials':>7}{'images/s':>11}{'speed-up':>10}")
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
        print(f"{row['concurrent']:>7}{row['images_per_s']:>11.1f}{row['speedup']:>9.2f}x")
    if args.json:
        import torch
        env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
               "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "config": values, "environment": env}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
