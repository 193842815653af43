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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from trainables import data, large_lt  # noqa: E402


def write_jpegs(folder: str, n: int, width: int, height: int) -> list[str]:
    """Writes n seeded JPEGs and returns their paths."""
    rng = np.random.RandomState(0)
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
        loader = torch.utils.data.DataLoader(JpegFiles(paths, args.size), batch_size=args.batch, shuffle=True,
                                             num_workers=args.workers, pin_memory=device.type == "cuda",
                                             persistent_workers=args.workers > 0)

        def conventional_pass() -> None:
            for x, _ in loader:
                x.to(device, non_blocking=True)

        conventional = time_passes(conventional_pass, args.repeats, device)
        start = time.perf_counter()
        cached = large_lt.decode_paths(paths, args.store_side)
        decode_once_s = time.perf_counter() - start
        images = large_lt.Placement(device, None).place(data.ImageSet(cached, np.zeros(len(cached)), "bench"))
        view = large_lt.View(args.size)
        gen = torch.Generator(device=device).manual_seed(0)

        def ours_pass() -> None:
            order = torch.randperm(len(images), device=device, generator=gen)
            for start in range(0, len(images), args.batch):
                view.train(images[order[start:start + args.batch]], gen)

        ours = time_passes(ours_pass, args.repeats, device)
    rate = lambda times: args.images / statistics.median(times)   # noqa: E731
    result = {"device": str(device), "images": args.images, "source_size": f"{args.width}x{args.height}",
              "size": args.size, "store_side": args.store_side, "batch": args.batch, "workers": args.workers,
              "conventional_images_per_s": rate(conventional), "ours_images_per_s": rate(ours),
              "ratio_ours_over_conventional": rate(ours) / rate(conventional),
              "decode_once_s": decode_once_s, "conventional_pass_s": conventional, "ours_pass_s": ours,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
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
