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
    """Returns (uint8 [N, 32, 32, 3], names) from an .npy file or a folder of images; ValueError
    (one line, naming the file) for anything else."""
    if os.path.isdir(source):
        from PIL import Image, ImageOps
        names = sorted(f for f in os.listdir(source) if f.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        images = []
        for n in names:
            try:
                with Image.open(os.path.join(source, n)) as image:
                    images.append(np.asarray(ImageOps.fit(image.convert("RGB"), (32, 32))))
            except OSError as e:   # PIL's UnidentifiedImageError, truncated files, unreadable files
                raise ValueError(f"{os.path.join(source, n)}: not a readable image ({e}); "
                                 f"expected {', '.join(IMAGE_SUFFIXES)} files") from None
        return np.stack(images).astype(np.uint8), names
    if source.endswith(".npy") and os.path.isfile(source):
        try:
            array = np.load(source, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{source}: not a NumPy array file ({' '.join(str(e).split())}); "
                             f"expected uint8 (N, 32, 32, 3) saved with numpy.save") from None
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 \
                or array.shape[1:] != (32, 32, 3):
            hint = " (scale to 0-255 and convert: (x * 255).astype(numpy.uint8))" \
                if isinstance(array, np.ndarray) and array.dtype.kind == "f" else ""
            raise ValueError(f"{source}: expected uint8 (N, 32, 32, 3), got "
                             f"{getattr(array, 'dtype', type(array).__name__)} "
                             f"{getattr(array, 'shape', '')}{hint}")
        if len(array) == 0:
            raise ValueError(f"{source}: holds no images; expected uint8 (N, 32, 32, 3) with N >= 1")
        return array, [str(i) for i in range(len(array))]
    raise ValueError(f"{source}: expected an .npy file or a folder of images")


def check_store(uri: str) -> None:
    """Raises ValueError (one line) if `uri` names a local store that does not exist: pulling
    reads a store, it never creates one."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
    elif uri.startswith("file://"):
        path = uri[len("file://"):]
    elif "://" not in uri:
        path = uri
    else:
        return
    if not os.path.exists(path):
        raise ValueError(f"no tracking store at {path} (from {uri}); pass --tracking-uri (or set "
                         f"MLFLOW_TRACKING_URI) to the store or server the search used")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="registered model name, e.g. darl-cifar10-lt-ir100")
    p.add_argument("images", help=".npy uint8 (N, 32, 32, 3) or a folder of images")
    p.add_argument("--alias", default="champion", help="registered model alias to load (default champion)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow server or store (default: ./mlruns/mlflow.db) [env MLFLOW_TRACKING_URI]")
    args = p.parse_args(argv)
    uri = args.tracking_uri or f"sqlite:///{os.path.abspath('mlruns/mlflow.db')}"
    try:
        images, names = load_images(args.images)
        check_store(uri)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    import pandas as pd
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
