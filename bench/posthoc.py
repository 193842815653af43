#!/usr/bin/env python
"""Time of the post-hoc sweep per OOD score, at the sizes a search's trial has.

    python bench/posthoc.py --device cuda --json posthoc-gpu.json      # DARL, the search build's sizes
    python bench/posthoc.py --device cpu --n-train 1000 --n-val 100 --n-val-ood 100   # the CPU check

For each score, a freshly initialised model of the method (`--method`, DARL's 3-expert ResNet-32 by
default) runs `trainables.posthoc.sweep` once: validation ID (`--n-val` images) against three
validation OOD sets (`--n-val-ood` each), with `--n-train` training images for the feature-based
scores' statistics. The sweep's cost does not depend on what the images show or on how trained the
weights are, so the images are seeded uniform noise and no data is needed. Defaults: CIFAR-10-LT
IR100's search build (12,406 training images before the 500 held out; 50 validation images per
class; 1,000 per synthetic validation set), evaluation batch 500.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainables import posthoc, registry  # noqa: E402

SCORES = ("odin", "energy", "knn", "mahalanobis", "mahalanobis_pp", "react")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", default="darl")
    p.add_argument("--scores", default=",".join(SCORES))
    p.add_argument("--n-train", type=int, default=12406)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-val-ood", type=int, default=1000, help="images per validation OOD set (3 sets)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    method_cls = registry.get(args.method)
    gen = torch.Generator().manual_seed(0)
    noise = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)  # noqa: E731
    train_x, val_x = noise(args.n_train), noise(args.n_val)
    val_ood_x = [noise(args.n_val_ood) for _ in range(3)]
    # Ten long-tailed classes (IR 100), as many labels as training images.
    counts = [max(1, round(args.n_train * 100 ** (-c / 9) / sum(100 ** (-k / 9) for k in range(10))))
              for c in range(10)]
    train_y = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))[:args.n_train]
    train_y = torch.cat([train_y, torch.zeros(args.n_train - len(train_y), dtype=torch.long)]).to(device)
    rows = []
    for score in args.scores.split(","):
        cfg = method_cls.config_cls(ood_score=score, device=args.device, eval_batch_size=args.batch_size)
        method = method_cls(cfg, counts, device)
        torch.manual_seed(0)
        model = method.build_model().to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        result = posthoc.sweep(method, model, train_x, train_y, val_x, val_ood_x, args.batch_size)
        sync()
        seconds = time.perf_counter() - started
        rows.append({"score": score, "grid_points": len(result.table), "seconds": round(seconds, 2),
                     "chosen": result.chosen})
        print(f"{score:<15} {len(result.table):>3} points  {seconds:8.2f} s  chosen {result.chosen}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                       "method": args.method, "n_train": args.n_train, "n_val": args.n_val,
                       "n_val_ood": args.n_val_ood, "batch_size": args.batch_size, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
