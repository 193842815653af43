#!/usr/bin/env python
"""One DARL training epoch two ways, side by side: the papers' conventional loop and our trainable.

    python bench/epoch.py --device cpu --json bench-cpu.json     # small LT subset, ~5 min on 2 cores
    python bench/epoch.py --device cuda --json bench-gpu.json    # paper: CIFAR-10-LT IR100, 128/stream

reference: the loop the papers' code runs. A Dataset over the same long-tailed uint8 images that
    makes a PIL image per item (as torchvision's CIFAR10 does), torchvision transforms per image
    (crop, flip, AutoAugment CIFAR10 policy when the config has autoaugment on, as DARL does by
    default, ToTensor, cutout, Normalize), a shuffled LT DataLoader and a class-balanced one
    (WeightedRandomSampler, weights 1/n_y) with worker processes, batches moved to the device,
    float32 eager model, `loss.item()` logged every step.
ours: `engine.Trial(darl.Method, cfg, prepared).train_epoch()`: images already on the device,
    augmented there in whole batches.
Both sides build their rows with DARL's own `Method.loss` (compose: LT, balanced, Mixup, CutMix
rows; LGLA 3-expert ResNet-32; ALA + AAW loss) from the same initial weights and SGD settings,
so only the input pipeline and its execution differ.

images/s counts long-tailed-stream images: every step also trains as many class-balanced images
and their Mixup and CutMix rows, 4 network rows per LT image on both sides. Each side runs one
untimed warm-up epoch, then `--repeats` timed epochs; the median is reported.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler  # noqa: E402
from torchvision import transforms  # noqa: E402

from trainables import augment, darl, data, engine  # noqa: E402
from trainables.config import DEFAULT_CACHE_DIR  # noqa: E402
from trainables.method import Batch  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover
    raise SystemExit("bench/epoch.py needs psutil for peak host memory: pip install psutil")

# The papers' epoch: CIFAR-10-LT IR100 with no validation hold-out, 12,406 images.
FULL_TRAIN = {"cifar10": (10, 5000), "cifar100": (100, 500)}   # classes, training images per class
# Read only by evaluation, never by train_epoch; trimmed so prepare() is quick.
LIGHT_EVAL = {"test_ood": ["mnist"], "ood_max_images": 100, "val_ood_size": 100}
# Per device: n_max (None = the trainable's full build), DataLoader workers per loader, repeats.
DEFAULTS = {"cpu": {"n_max": 100, "workers": 2, "repeats": 3, "trial_epochs": 0},
            "cuda": {"n_max": None, "workers": 8, "repeats": 3, "trial_epochs": 400}}
MIB = 2 ** 20


# -- the reference: the papers' input pipeline ------------------------------------------------
class Cutout:
    """DeVries & Taylor's cutout on a [3, H, W] tensor: one length x length hole (clipped at the
    border) set to 0; placed before Normalize, as in the papers' code, so the hole is black."""

    def __init__(self, length: int = 16):
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[1:]
        y, x = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y1, y2 = max(y - self.length // 2, 0), min(y + self.length // 2, h)
        x1, x2 = max(x - self.length // 2, 0), min(x + self.length // 2, w)
        img = img.clone()
        img[:, y1:y2, x1:x2] = 0
        return img


class LongTailImages(Dataset):
    """torchvision's CIFAR10 `__getitem__` over our long-tailed arrays: uint8 HWC -> PIL -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_loaders(train: data.ImageSet, batch_size: int, workers: int, pin: bool,
                      seed: int, autoaugment: bool = False) -> tuple[DataLoader, DataLoader]:
    """Returns (long-tailed loader, class-balanced loader), each with `workers` processes; with
    `autoaugment`, torchvision's AutoAugment CIFAR10 policy (fill 128) after the flip, as LGLA."""
    policy = ([transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10, fill=[128, 128, 128])]
              if autoaugment else [])
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *policy,
        transforms.ToTensor(), Cutout(16), transforms.Normalize(augment.CIFAR_MEAN, augment.CIFAR_STD)])
    dataset = LongTailImages(train.x, train.y, transform)
    counts = np.bincount(train.y)
    sampler = WeightedRandomSampler(torch.as_tensor(1.0 / counts[train.y], dtype=torch.double),
                                    num_samples=len(dataset), replacement=True,
                                    generator=torch.Generator().manual_seed(seed + 1))
    lt = DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
                    generator=torch.Generator().manual_seed(seed))
    balanced = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=pin)
    return lt, balanced


def reference_side(cfg: darl.DarlConfig, prepared: engine.Prepared, initial: dict, workers: int,
                   repeats: int) -> tuple[list[float], dict[str, float | None]]:
    """Returns `measure`'s (epoch seconds, warm-up first; peak memory) for the papers' loop."""
    dev = engine.resolve_device(cfg.device)
    # The papers' optimiser: torch's default (for-each) SGD, not the fused kernel.
    method = darl.Method(darl.DarlConfig(**{**cfg.to_dict(), "fused_optimizer": False}),
                         prepared.id.counts, dev)
    model = method.build_model().to(dev)
    model.load_state_dict(initial)
    optimizer = method.build_optimizer(model)
    lt_loader, balanced_loader = reference_loaders(prepared.id.train, cfg.batch_size, workers,
                                                   dev.type == "cuda", cfg.seed, cfg.autoaugment)

    def epoch(index: int) -> None:
        rng = np.random.RandomState((cfg.seed * 100_003 + index) % 2**32)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(index)
        model.train()
        running = 0.0
        for (x, y), (x_bal, y_bal) in zip(lt_loader, balanced_loader):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            x_bal, y_bal = x_bal.to(dev, non_blocking=True), y_bal.to(dev, non_blocking=True)
            # DARL's own rows, forward and loss: the very function the engine calls.
            loss, _ = method.loss(model, Batch(x, y, x_bal=x_bal, y_bal=y_bal), rng)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()   # the papers' per-step AverageMeter: a host sync every step

    return measure(epoch, repeats, dev)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched: on a GPU each is at least one kernel launch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ours_side(cfg: darl.DarlConfig, prepared: engine.Prepared, initial: dict,
              repeats: int) -> tuple[list[float], dict[str, float | None], float | None]:
    """Returns `measure`'s (epoch seconds, warm-up first; peak memory) for our trainable, and the
    ATen operators per training step, counted over one more, untimed, epoch."""
    trial = engine.Trial(darl.Method, cfg, prepared)
    trial.model.load_state_dict(initial)
    seconds, memory = measure(lambda index: trial.train_epoch(), repeats, trial.device)
    if cfg.compile != "none":   # compiled kernels bypass the dispatcher: no count
        return seconds, memory, None
    with OpCounter() as ops:
        trial.train_epoch()
    return seconds, memory, ops.count / math.ceil(len(trial.train_y) / cfg.batch_size)


def evaluation_seconds(cfg: darl.DarlConfig, repeats: int, kept: set[str]) -> dict[str, float]:
    """Returns the median seconds of one validation and of the final test, at the evaluation
    sizes a search uses (the config's defaults: 1,000 images per synthetic validation set, the
    full test OOD sets; `kept` names the fields the user set), with our trainable."""
    full = darl.DarlConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                      if k not in LIGHT_EVAL or k in kept})
    trial = engine.Trial(darl.Method, full, engine.prepare(full))
    sync = torch.cuda.synchronize if trial.device.type == "cuda" else (lambda: None)
    times = {"validate": [], "test": []}
    for _ in range(1 + repeats):                 # the first of each is a warm-up
        for name, run in (("validate", trial.validate), ("test", trial.test)):
            started = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - started)
    return {"validate_seconds": statistics.median(times["validate"][1:]),
            "test_seconds": statistics.median(times["test"][1:]),
            "validation_images": len(trial.val_x) + sum(len(x) for x in trial.val_ood_x),
            "test_images": len(trial.test_x) + sum(len(x) for x in trial.test_ood_x)}


def initial_weights(cfg: darl.DarlConfig, prepared: engine.Prepared) -> dict[str, torch.Tensor]:
    """Returns the initial weights engine.Trial builds for `cfg` (seeded), on the host: every
    side loads them, so all start from the same model."""
    torch.manual_seed(cfg.seed)
    return {k: v.clone() for k, v in
            darl.Method(cfg, prepared.id.counts, torch.device("cpu")).build_model().state_dict().items()}


# -- measuring ---------------------------------------------------------------------------------
class HostPeak:
    """Samples, in a thread, the host memory of this process plus its children (DataLoader workers).

    Counted: this process's RSS, sampled every `interval_s`, plus each worker's USS (private
    memory). A forked worker maps the parent's pages, and its own RSS would count them again
    (4 workers of a 3 GB parent "use" 12 GB by RSS). Reading USS walks the worker's page tables
    (tens of ms), so each worker's USS is refreshed every `worker_every_s` only; it changes little.
    """

    def __init__(self, interval_s: float = 0.05, worker_every_s: float = 2.0):
        self.interval_s, self.worker_every_s = interval_s, worker_every_s
        self.process = psutil.Process()
        self.peak_bytes = self.peak_main_bytes = 0
        self._workers: dict[int, tuple[float, int]] = {}   # pid -> (when read, USS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        main = self.process.memory_info().rss
        now, workers = time.monotonic(), {}
        for child in self.process.children(recursive=True):
            when, uss = self._workers.get(child.pid, (-math.inf, 0))
            if now - when >= self.worker_every_s:
                try:
                    when, uss = now, child.memory_full_info().uss
                except psutil.Error:   # a worker that exited between the listing and the read
                    continue
            workers[child.pid] = (when, uss)
        self._workers = workers
        self.peak_bytes = max(self.peak_bytes, main + sum(uss for _, uss in workers.values()))
        self.peak_main_bytes = max(self.peak_main_bytes, main)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "HostPeak":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def measure(epoch: Callable[[int], Any], repeats: int,
            dev: torch.device) -> tuple[list[float], dict[str, float | None]]:
    """Runs 1 + `repeats` epochs; returns (seconds of each, warm-up first; peak memory over all
    of them: host MiB with workers, host MiB of this process, device MiB allocated or None)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = []
    with HostPeak() as host:
        for index in range(1 + repeats):
            started = time.perf_counter()
            epoch(index)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds.append(time.perf_counter() - started)
    device_mib = torch.cuda.max_memory_allocated(dev) / MIB if dev.type == "cuda" else None
    return seconds, {"peak_host_mib": host.peak_bytes / MIB, "peak_host_main_mib": host.peak_main_bytes / MIB,
                     "peak_device_mib": device_mib}


def summary(seconds: list[float], memory: dict[str, float | None], images: int,
            full_images: int) -> dict[str, Any]:
    """Returns one side's numbers: median over the timed epochs (the warm-up is left out)."""
    median = statistics.median(seconds[1:])
    ips = images / median
    return {"images_per_second": ips, "epoch_seconds_measured": median,
            "epoch_seconds_full_lt": full_images / ips, **memory,
            "warmup_seconds": seconds[0], "epoch_seconds": seconds[1:]}


# -- command line ------------------------------------------------------------------------------
def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def table(sides: dict[str, dict[str, Any]], images: int, full_images: int) -> str:
    head = ("side", "images/s", f"s/epoch ({images:,} img)", f"s/epoch (full LT, {full_images:,} img)",
            "peak host MiB", "peak device MiB")
    rows = [head]
    for name, s in sides.items():
        device = "-" if s["peak_device_mib"] is None else f"{s['peak_device_mib']:,.0f}"
        rows.append((name, f"{s['images_per_second']:,.1f}", f"{s['epoch_seconds_measured']:,.2f}",
                     f"{s['epoch_seconds_full_lt']:,.1f}", f"{s['peak_host_mib']:,.0f}", device))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(line(r) for r in rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="DARL epoch: the papers' conventional loop vs our trainable.")
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--json", required=True, metavar="OUT", help="write the results here")
    p.add_argument("--n-max", type=int, help="head-class size of the LT build (both sides); "
                   "default 100 on cpu, the trainable's full build on cuda")
    p.add_argument("--batch-size", type=int, default=128, help="images per stream per step [128]")
    p.add_argument("--repeats", type=int, help="timed epochs after one warm-up epoch [3]")
    p.add_argument("--workers", type=int, help="reference: worker processes per DataLoader "
                   "(two loaders) [2 on cpu, 8 on cuda]")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU [torch's default]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a DarlConfig field for both sides (e.g. imbalance_ratio=10)")
    p.add_argument("--ours-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="a DarlConfig field for our side only: execution options to compare")
    p.add_argument("--trial-epochs", type=int, help="project a whole trial of this many epochs from "
                   "ours' epoch time plus timed evaluations at a search's sizes; 0 = skip [400 on cuda, 0 on cpu]")
    p.add_argument("--eval-every", type=int, default=5, help="validations in the projected trial: "
                   "every N epochs and at the last [5]")
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"),
                   help="offline archives [env TAILTUNE_DATA_DIR]")
    p.add_argument("--cache-dir", default=os.environ.get("TAILTUNE_CACHE_DIR") or DEFAULT_CACHE_DIR,
                   help="decoded-image cache [env TAILTUNE_CACHE_DIR, ~/.cache/tailtune]")
    args = p.parse_args(argv)
    defaults = DEFAULTS[args.device]
    n_max = args.n_max if args.n_max is not None else defaults["n_max"]
    repeats = args.repeats if args.repeats is not None else defaults["repeats"]
    workers = args.workers if args.workers is not None else defaults["workers"]
    trial_epochs = args.trial_epochs if args.trial_epochs is not None else defaults["trial_epochs"]
    if args.eval_every < 1:
        p.error(f"--eval-every {args.eval_every}: expected an integer >= 1")
    if repeats < 1:
        p.error(f"--repeats {repeats}: need at least 1 timed epoch")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = engine.parse_settings(p, args.set)
    shared = {**LIGHT_EVAL, "device": args.device, "data_dir": args.data_dir, "cache_dir": args.cache_dir,
              "n_max": n_max, "batch_size": args.batch_size, **settings}
    extra = engine.parse_settings(p, args.ours_extra, "--ours-extra")
    try:
        cfg = darl.DarlConfig.from_dict(shared)
        cfg_ours = darl.DarlConfig.from_dict({**shared, **extra})
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if engine.dataset_spec(cfg_ours) != engine.dataset_spec(cfg) or cfg_ours.batch_size != cfg.batch_size:
        raise SystemExit(f"error: --ours-extra {args.ours_extra} changes the data or batch size; "
                         f"pass those with --set, which applies to both sides")
    try:
        prepared = engine.prepare(cfg)
    except (ValueError, data.MissingDataError) as e:
        raise SystemExit(f"error: {e}")
    classes, per_class = FULL_TRAIN[cfg.dataset]
    full_images = sum(data.lt_counts(classes, per_class, cfg.imbalance_ratio))
    images = len(prepared.id.train)
    steps = math.ceil(images / cfg.batch_size)
    load_before = os.getloadavg()
    initial = initial_weights(cfg, prepared)
    print(f"DARL on {cfg.dataset}-LT IR{cfg.imbalance_ratio:g}: {images:,} LT images per epoch, "
          f"batch {cfg.batch_size} per stream, {steps} steps; device {args.device}, "
          f"{torch.get_num_threads()} threads; 1 warm-up + {repeats} timed epochs per side", flush=True)
    speed = cfg_ours.speed(args.device)
    print(f"ours: {', '.join(f'{k} {v}' for k, v in speed.items())}; reference: fp32 eager, "
          f"contiguous, for-each SGD", flush=True)

    sides = {}
    for name in ("reference", "ours"):
        if name == "reference":
            seconds, memory = reference_side(cfg, prepared, initial, workers, repeats)
        else:
            seconds, memory, ops_per_step = ours_side(cfg_ours, prepared, initial, repeats)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        sides[name] = summary(seconds, memory, images, full_images)
        print(f"  {name}: epochs {', '.join(f'{s:.2f}' for s in seconds)} s (first = warm-up)", flush=True)
    ratio = sides["ours"]["images_per_second"] / sides["reference"]["images_per_second"]
    projection = None
    if trial_epochs > 0:
        evals = evaluation_seconds(cfg_ours, repeats, set(settings) | set(extra))
        validations = math.ceil(trial_epochs / args.eval_every)
        per_epoch = sides["ours"]["epoch_seconds_measured"]
        projection = {"epochs": trial_epochs, "eval_every": args.eval_every, "validations": validations, **evals,
                      "trial_seconds": trial_epochs * per_epoch + validations * evals["validate_seconds"]
                      + evals["test_seconds"]}

    print()
    print(table(sides, images, full_images))
    print("images/s counts long-tailed-stream images (4 network rows each: LT, balanced, Mixup, CutMix);")
    print("peak host = RSS of the process + USS (private memory) of its DataLoader workers")
    print(f"ratio ours/reference: {ratio:.2f}x")
    if ops_per_step:
        per_step = sides["ours"]["epoch_seconds_measured"] / steps
        print(f"ours: {ops_per_step:,.0f} ATen operators per step (eager; each one kernel launch or more on a "
              f"GPU), {1e6 * per_step / ops_per_step:,.1f} us of wall time per operator")
    if projection:
        print(f"projected {trial_epochs}-epoch trial (ours): {trial_epochs} x "
              f"{sides['ours']['epoch_seconds_measured']:.2f} s + {projection['validations']} "
              f"validations x {projection['validate_seconds']:.2f} s ({projection['validation_images']:,} images) "
              f"+ test {projection['test_seconds']:.2f} s ({projection['test_images']:,} images) = "
              f"{projection['trial_seconds'] / 60:.1f} min")
    result = {
        "method": "darl",
        "images_counted": "long-tailed-stream images; each step also trains as many class-balanced "
                          "images and their Mixup and CutMix rows (4 network rows per LT image)",
        "timing": f"median of {repeats} epochs after 1 untimed warm-up epoch",
        "host_memory": "peak of RSS of the process (sampled every 50 ms) + USS of each DataLoader "
                       "worker (refreshed every 2 s); peak_host_main_mib = the process alone",
        "device_memory": "torch.cuda.max_memory_allocated, reset before each side",
        "images_per_epoch": images, "steps_per_epoch": steps,
        "full_lt_images": full_images, "batch_size_per_stream": cfg.batch_size, "repeats": repeats,
        "reference_workers_per_loader": workers,
        "sides": sides,
        "ratio_ours_over_reference": ratio,
        "ours_speed_settings": speed, "trial_projection": projection,
        "ours_aten_ops_per_step": ops_per_step,
        "config": cfg.to_dict(), "ours_extra": extra, "data": prepared.id.record,
        "environment": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "python": platform.python_version(), "device": args.device,
                        "device_name": device_name(args.device), "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "command": [sys.executable, *sys.argv],
                        # Other work on a shared machine shows here, and in the timings.
                        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]]},
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
