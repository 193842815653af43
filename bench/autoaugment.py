#!/usr/bin/env python
"""AutoAugment's CIFAR-10 policy two ways, side by side: torchvision image by image, ours per batch.

    python bench/autoaugment.py --device cpu                 # random uint8 images, batch 128
    python bench/autoaugment.py --device cuda --batch-size 512

reference: torchvision's `AutoAugment(AutoAugmentPolicy.CIFAR10, fill=128)` called on one
    [3, 32, 32] uint8 tensor at a time (what a per-image transform in a DataLoader does, without
    the loader), on the same device.
ours: `trainables.autoaugment.autoaugment` on the whole [B, 3, 32, 32] batch (its draws included).
Each side runs one untimed warm-up batch, then `--repeats` timed rounds of `--batches` batches;
the best round is reported (least disturbed by other load). images/s and ratio ours/reference
(above 1 = ours faster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy  # noqa: E402

from trainables import autoaugment  # noqa: E402


def best_rate(run, images_per_call: int, calls: int, repeats: int, device: torch.device) -> float:
    """Returns the best images/s over `repeats` rounds of `calls` calls of `run` (after a warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    sync()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        best = max(best, images_per_call * calls / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0)).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    reference = AutoAugment(AutoAugmentPolicy.CIFAR10, fill=[float(autoaugment.LGLA_FILL)] * 3)

    def per_image() -> None:
        for image in x:
            reference(image)

    rates = {"reference": best_rate(per_image, len(x), args.batches, args.repeats, dev),
             "ours": best_rate(lambda: autoaugment.autoaugment(x, gen), len(x), args.batches,
                               args.repeats, dev)}
    result = {"device": str(dev), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "images_per_second": rates, "ratio_ours_over_reference": rates["ours"] / rates["reference"],
              "load_average": os.getloadavg()[0]}
    print(f"AutoAugment CIFAR10 policy on {dev}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads (load average {result['load_average']:.2f})")
    print(f"{'side':<10} {'images/s':>10}")
    for side, rate in rates.items():
        print(f"{side:<10} {rate:>10.0f}")
    print(f"ratio ours/reference: {result['ratio_ours_over_reference']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
