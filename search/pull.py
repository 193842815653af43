#!/usr/bin/env python
"""Fetch a registered champion and score images with it.

    python search/pull.py darl-cifar10-lt-ir100 images.npy          # uint8 array (N, 32, 32, 3)
    python search/pull.py darl-cifar10-lt-ir100 some/folder/        # every image file in a folder
    python search/pull.py darl-cifar10-lt-ir100 images.npy --alias champion --tracking-uri http://host:5000
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_images(source: str) -> tuple[np.ndarray, list[str]]:
    """Returns (uint8 [N, 32, 32, 3], names) from an .npy file or a folder of images."""
    if os.path.isdir(source):
        from PIL import Image, ImageOps
        names = sorted(f for f in os.listdir(source) if f.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        images = [np.asarray(ImageOps.fit(Image.open(os.path.join(source, n)).convert("RGB"), (32, 32)))
                  for n in names]
        return np.stack(images).astype(np.uint8), names
    if source.endswith(".npy") and os.path.isfile(source):
        array = np.load(source)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (32, 32, 3):
            raise ValueError(f"{source}: expected uint8 (N, 32, 32, 3), got {array.dtype} {array.shape}")
        return array, [str(i) for i in range(len(array))]
    raise ValueError(f"{source}: expected an .npy file or a folder of images")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="registered model name, e.g. darl-cifar10-lt-ir100")
    p.add_argument("images", help=".npy uint8 (N, 32, 32, 3) or a folder of images")
    p.add_argument("--alias", default="champion")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow server or store (default: ./mlruns/mlflow.db) [env MLFLOW_TRACKING_URI]")
    args = p.parse_args(argv)
    try:
        images, names = load_images(args.images)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    import pandas as pd
    uri = args.tracking_uri or f"sqlite:///{os.path.abspath('mlruns/mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{args.model}@{args.alias}")
    except mlflow.exceptions.MlflowException as e:
        print(f"error: cannot load models:/{args.model}@{args.alias} from {uri}: "
              f"{str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    table = model.predict(images)
    table.insert(0, "image", names)
    with pd.option_context("display.max_rows", None, "display.width", 120):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
