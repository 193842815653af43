#!/usr/bin/env python
"""Images/s of the large-set training input pipeline: ours (uint8 cache on the device, crop/flip/
normalise there per batch) against the conventional DataLoader + PIL pipeline, at 224.

    python bench/large_lt.py --device cpu --json large-lt-cpu.json      # 2 cores: ~1-2 min
    python bench/large_lt.py --device cuda --images 4096 --batch 256 --workers 8

Both sides produce the same thing: normalised float batches [B, 3, 224, 224] on `--device`, from
the same generated JPEGs (`--images` of them, `--width` x `--height`, about ImageNet's median
size; seeded noise with a colour gradient, quality 90), with RandomResizedCrop(224,
scale=(0.08, 1)) and a horizontal flip.

- **conventional**: a Dataset that opens each JPEG with PIL per item, torchvision's
  RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, a shuffled DataLoader
  with `--workers` processes (pin_memory on CUDA), each batch copied to the device.
- **ours**: the files decoded once into the uint8 cache (`trainables.large_lt`, shorter side
  `--store-side`, centre square; timed apart, as `decode_once_s`), placed on the device, then per
  batch a random index, `large_lt.View(224).train` (one grid_sample for the batch), on the device.

No network is trained: this is the input pipeline alone. Each side runs one untimed pass, then
`--repeats` timed passes over all images; the median pass gives images/s.

For bench/gpu_suite.py's `large_lt` stage, also: `write_lt_tree` (a generated ImageNet-LT-format
set) and `training_epochs` (a ResNet-50 epoch through the engine with the images resident,
streamed, and streamed with prefetch, and a check that all three leave the same weights).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from trainables import data, large_lt  # noqa: E402


def write_jpegs(folder: str, n: int, width: int, height: int, seed: int = 0) -> list[str]:
    """Writes n seeded JPEGs and returns their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    paths = []
    for i in range(n):
        noise = rng.randint(0, 64, size=(height, width, 3)).astype(np.float32)
        pixels = np.clip(noise + ramp * rng.uniform(0.3, 1.0, size=(1, 1, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:05d}.JPEG")
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


class JpegFiles(torch.utils.data.Dataset):
    """The conventional per-item Dataset: PIL decode + torchvision transforms."""

    def __init__(self, paths: list[str], size: int):
        from torchvision import transforms
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(large_lt.IMAGENET_MEAN, large_lt.IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_passes(one_pass, repeats: int, device: torch.device) -> list[float]:
    one_pass()                                     # warm-up: worker start, allocator, kernels
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        one_pass()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_conventional(paths: list[str], device: torch.device, size: int, batch: int, workers: int,
                      repeats: int) -> list[float]:
    """Returns the DataLoader + PIL pipeline's pass times; its workers end when this returns,
    before ours is timed."""
    loader = torch.utils.data.DataLoader(JpegFiles(paths, size), batch_size=batch, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)

    def conventional_pass() -> None:
        for x, _ in loader:
            x.to(device, non_blocking=True)

    return time_passes(conventional_pass, repeats, device)


def compare(paths: list[str], device: torch.device, size: int = 224, store_side: int = 256, batch: int = 64,
            workers: int = 2, repeats: int = 3) -> dict:
    """Returns both pipelines' images/s over the JPEGs `paths` (median of `repeats` passes after
    one untimed pass), their ratio ours/conventional and the one-time decode into the cache."""
    conventional = time_conventional(paths, device, size, batch, workers, repeats)
    start = time.perf_counter()
    cached = large_lt.decode_paths(paths, store_side)
    decode_once_s = time.perf_counter() - start
    images = large_lt.Placement(device, None).place(data.ImageSet(cached, np.zeros(len(cached)), "bench"))
    view = large_lt.View(size)
    gen = torch.Generator(device=device).manual_seed(0)

    def ours_pass() -> None:
        order = torch.randperm(len(images), device=device, generator=gen)
        for start in range(0, len(images), batch):
            view.train(images[order[start:start + batch]], gen)

    ours = time_passes(ours_pass, repeats, device)
    rate = lambda times: len(paths) / statistics.median(times)   # noqa: E731
    return {"images": len(paths), "size": size, "store_side": store_side, "batch": batch, "workers": workers,
            "conventional_images_per_s": rate(conventional), "ours_images_per_s": rate(ours),
            "ratio_ours_over_conventional": rate(ours) / rate(conventional),
            "decode_once_s": decode_once_s, "conventional_pass_s": conventional, "ours_pass_s": ours}


# -- a training epoch: resident, streamed, streamed with prefetch -----------------------------------
# The three placements of the image sets engine.Trial knows (trainables.large_lt.Placement): all on
# the device; all in pinned host memory, each batch gathered when drawn; the same, the next batch
# gathered and copied (on a side CUDA stream) while the current step runs.
PLACEMENTS = {"resident": {"device_image_budget_gb": None},
              "streamed": {"device_image_budget_gb": 0.0, "prefetch_streamed": False},
              "streamed_prefetch": {"device_image_budget_gb": 0.0, "prefetch_streamed": True}}
# Losses after the checked epoch may differ by this much (relative) where weights are not bit-identical.
LOSS_TOLERANCE = 1e-3


def write_lt_tree(data_dir: str, counts: list[int], width: int, height: int, eval_per_class: int = 1) -> list[str]:
    """Writes a generated ImageNet-LT-format set under `data_dir`: ImageNet_LT/{train,val,test}/
    JPEGs (`counts[c]` training images of class c, `eval_per_class` per class in val and test), the
    three split lists, and an open set of as many images as val (ImageNet_LT_open.txt, the test
    OOD set `imagenet_lt_open`). Returns the training images' paths."""
    root = os.path.join(data_dir, large_lt.SETS["imagenet-lt"].folder)
    per_split = {"train": counts, "val": [eval_per_class] * len(counts), "test": [eval_per_class] * len(counts),
                 "open": [eval_per_class * len(counts)]}
    train_paths = []
    for seed, (split, split_counts) in enumerate(per_split.items()):
        paths = write_jpegs(os.path.join(root, split), sum(split_counts), width, height, seed)
        labels = np.repeat(np.arange(len(split_counts)), split_counts) if split != "open" else [-1] * len(paths)
        with open(os.path.join(root, f"{large_lt.SETS['imagenet-lt'].prefix}_{split}.txt"), "w") as f:
            f.writelines(f"{os.path.relpath(path, root)} {label}\n" for path, label in zip(paths, labels))
        if split == "train":
            train_paths = paths
    return train_paths


@contextlib.contextmanager
def deterministic():
    """cuDNN and torch's deterministic kernels for the block (warn only where an op has none):
    on CUDA, two runs of the same steps otherwise differ in their last bits (autotuned
    convolution algorithms, atomic adds in backward), whatever the data's placement."""
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


def training_epochs(data_dir: str, cache_dir: str, device: str, size: int = 224, store_side: int = 256,
                    batch: int = 128, repeats: int = 3, backbone: str = "resnet50",
                    progress: Callable[[dict], None] | None = None) -> dict:
    """Returns images/s of engine.Trial.train_epoch (method `ce`, `backbone`, `size` px views) on
    the ImageNet-LT-format set in `data_dir`, per placement (PLACEMENTS): the median of `repeats`
    epochs after a warm-up, and their ratios to resident.

    Checked first: one epoch per placement from the same initial weights, under `deterministic()`,
    must leave bit-identical weights; where they are not (`weights_check`), the losses must agree
    to LOSS_TOLERANCE, else the check reads "DIFFER". `progress`, if given, gets the result so
    far after each placement (a caller under a time limit keeps what was measured)."""
    from trainables import engine, registry
    method = registry.get("ce")
    base = {"dataset": "imagenet-lt", "device": device, "image_store_side": store_side, "image_size": size,
            "backbone": backbone, "data_dir": data_dir, "cache_dir": cache_dir, "download": False,
            "val_per_class": 1, "batch_size": batch, "eval_batch_size": batch, "val_ood": ("rademacher",),
            "val_ood_size": 8, "test_ood": ("imagenet_lt_open",), "warmup_epochs": 0,
            "lr": 0.001}   # from scratch, the default 0.1 can overflow BN statistics in a few steps
    started = time.perf_counter()
    prepared = engine.prepare(method.config_cls.from_dict(base))
    result: dict = {"method": "ce", "backbone": backbone, "size": size, "store_side": store_side, "batch": batch,
                    "repeats": repeats, "prepare_s": time.perf_counter() - started, "placements": {}}
    weights, losses = {}, {}
    for name, values in PLACEMENTS.items():
        trial = engine.Trial(method, method.config_cls.from_dict({**base, **values}), prepared)
        dev = trial.device
        with deterministic():
            losses[name] = trial.train_epoch()["train_loss"]
        weights[name] = {k: v.detach().cpu().clone() for k, v in trial.model.state_dict().items()}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = time_passes(trial.train_epoch, repeats, dev)
        images = len(trial.train_y)
        result["images"] = images
        result["speed_settings"] = trial.speed
        result["placements"][name] = {
            "images_per_s": images / statistics.median(seconds), "epoch_s": seconds,
            "streamed_sets": trial.resolved["resolved.streamed_sets"],
            "peak_device_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
            "check_train_loss": losses[name]}
        del trial
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if progress:
            progress(result)
    resident = result["placements"]["resident"]
    for name, row in result["placements"].items():
        row["ratio_over_resident"] = row["images_per_s"] / resident["images_per_s"]
        a, b = weights["resident"], weights[name]
        row["identical_weights"] = all(torch.equal(a[k], b[k]) for k in a)
        row["max_abs_weight_diff"] = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    result["prefetch_over_no_prefetch"] = (result["placements"]["streamed_prefetch"]["images_per_s"]
                                           / result["placements"]["streamed"]["images_per_s"])
    rows = result["placements"].values()
    if all(row["identical_weights"] for row in rows):
        result["weights_check"] = "identical"
    elif all(abs(row["check_train_loss"] - losses["resident"]) <= LOSS_TOLERANCE * abs(losses["resident"])
             for row in rows):
        result["weights_check"] = f"not bit-identical; losses agree to {LOSS_TOLERANCE:g} relative"
    else:
        result["weights_check"] = "DIFFER"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--store-side", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(tmp, args.images, args.width, args.height)
        measured = compare(paths, device, args.size, args.store_side, args.batch, args.workers, args.repeats)
    result = {"device": str(device), "source_size": f"{args.width}x{args.height}", **measured,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    decode_once_s = result["decode_once_s"]
    print(f"device {device}, {args.images} JPEGs {args.width}x{args.height} -> {args.size}px, batch {args.batch}, "
          f"{args.workers} DataLoader workers")
    print(f"{'pipeline':<34}{'images/s':>12}")
    print(f"{'conventional (DataLoader + PIL)':<34}{result['conventional_images_per_s']:>12.1f}")
    print(f"{'ours (uint8 cache on device)':<34}{result['ours_images_per_s']:>12.1f}")
    print(f"ratio ours/conventional: {result['ratio_ours_over_conventional']:.2f}x; "
          f"one-time decode into the cache ({args.store_side}px): {decode_once_s:.1f} s "
          f"({args.images / decode_once_s:.0f} images/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
