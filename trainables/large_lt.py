"""ImageNet-LT and Places-LT: the standard split lists over an image folder, decoded once.

Layout (no download: ImageNet and Places365 are not downloadable by script):

    <data-dir>/ImageNet_LT/ImageNet_LT_{train,val,test}.txt   lines `<relative path> <label>`
    <data-dir>/ImageNet_LT/<the paths the lists name>          e.g. train/n01440764/n01440764_10026.JPEG
    <data-dir>/Places_LT/Places_LT_{train,val,test}.txt        the same for Places-LT

Each list is decoded once into a uint8 cache at a fixed stored size: shorter side `store_side`,
then the centred square (`STORE_RULE`), so every image is one row of an [N, S, S, 3] array, kept
resident on the training device like CIFAR. Training views are random-resized crops of that
square plus flips, made on the device for a whole batch at once (`random_resized_crop_flip`);
evaluation views are resize + centre crop (`resize_center_crop`), as torchvision's
Resize(256) + CenterCrop(224) when S = 256 and the view is 224. Where the arrays exceed a device
budget, `Placement` keeps the rest in pinned host memory and copies each batch over in chunks
(`StreamedImages`), the next batch gathered while the current step runs.

The benchmarks' training outliers (ImageNet-Extra, Places-Extra69; `load_outliers`) are decoded
the same way, in chunks straight into a `.npy` file, and read back memory-mapped: a set larger
than the host's memory streams from disk.

The searches validate on the lists' own validation split (`*_val.txt`); the test list is only
read for the final test.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image

from trainables import augment, data, meta_set, ood_sets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STORE_RULE = ("shorter side resized to {side} (PIL bilinear, antialiased), centred {side}x{side} "
              "square kept; uint8 RGB")
TRAIN_VIEW_RULE = ("RandomResizedCrop({size}, scale=({scale:g}, 1), ratio=(3/4, 4/3)) of the stored "
                   "square (10 tries, else the whole square; bilinear, no antialias) + horizontal flip "
                   "p=0.5, on the device per batch; ImageNet mean/std")
EVAL_VIEW_RULE = "resize to {resize} (bilinear, antialiased) + centre crop {size}; ImageNet mean/std"
EVAL_CROP_FRACTION = 224 / 256            # Resize(256) + CenterCrop(224), the ImageNet convention
SPLITS = ("train", "val", "test")
_CACHE_VERSION = "1"


@dataclass(frozen=True)
class LargeSet:
    name: str
    folder: str          # under the data folder
    prefix: str          # of the list files: <prefix>_{train,val,test}.txt
    title: str
    backbone: str        # the papers' backbone (models.create name)
    default_test_ood: tuple[str, ...]


SETS: dict[str, LargeSet] = {s.name: s for s in (
    LargeSet("imagenet-lt", "ImageNet_LT", "ImageNet_LT",
             "ImageNet-LT (Liu et al. 2019): 1000 classes, 115,846 train, 20,000 val, 50,000 test",
             "resnet50", ("imagenet_1k_ood",)),
    LargeSet("places-lt", "Places_LT", "Places_LT",
             "Places-LT (Liu et al. 2019): 365 classes, 62,500 train, 7,300 val, 36,500 test",
             "resnet152", ("places_lt_open",)),
)}


def names() -> list[str]:
    """Returns the large-scale ID data set names."""
    return list(SETS)


def is_large(dataset: str) -> bool:
    """Returns whether `dataset` is one of this module's sets (not 32x32 CIFAR)."""
    return dataset in SETS


def store_rule(side: int) -> str:
    return STORE_RULE.format(side=side)


def eval_resize(size: int) -> int:
    """Returns the evaluation resize for a view of `size` px: 256 for 224."""
    return int(round(size / EVAL_CROP_FRACTION))


# ----------------------------------------------------------------------------- split lists


def read_split_list(path: str) -> list[tuple[str, int]]:
    """Returns the (relative path, label) rows of a split list: one `<path> <int label>` per
    line, blank lines skipped. ValueError naming the file, line and what is accepted."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            rel, _, label = text.rpartition(" ")
            try:
                value = int(label)
            except ValueError:
                value = None
            if not rel or value is None:
                raise ValueError(f"{path}:{number}: '{text[:80]}'; accepted: '<relative path> <integer label>'")
            rows.append((rel.strip().lstrip("/"), value))
    return rows


def list_path(spec: LargeSet, root: str, split: str) -> str:
    return os.path.join(root, f"{spec.prefix}_{split}.txt")


def dataset_root(name: str, data_dir: str | None) -> str:
    """Returns `<data_dir>/<folder>` where the lists of `name` must be; MissingDataError naming
    the folder and the missing list otherwise."""
    spec = SETS[name]
    if data_dir is None:
        raise data.MissingDataError(f"data set '{name}' needs --data-dir (TAILTUNE_DATA_DIR) with "
                                    f"{spec.folder}/{spec.prefix}_{{train,val,test}}.txt; no download exists")
    root = os.path.join(data_dir, spec.folder)
    for split in SPLITS:
        if not os.path.isfile(list_path(spec, root, split)):
            raise data.MissingDataError(
                f"data set '{name}': split list {list_path(spec, root, split)} not found (looked in "
                f"{root}); expected {spec.prefix}_{{train,val,test}}.txt there with the images at "
                f"the paths they name, relative to {root}")
    return root


# ----------------------------------------------------------------------------- decoding and cache


def fit_square(image: Image.Image, side: int) -> np.ndarray:
    """Returns the image as uint8 [side, side, 3] RGB under STORE_RULE."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    scale = side / min(width, height)
    new_w, new_h = max(side, round(width * scale)), max(side, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)   # antialiased when shrinking
    left, top = (new_w - side) // 2, (new_h - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.uint8)


def decode_image(path: str, side: int) -> np.ndarray:
    """Returns the image file at `path` as uint8 [side, side, 3] (STORE_RULE)."""
    with Image.open(path) as image:
        return fit_square(image, side)


def decode_paths(paths: list[str], side: int, workers: int | None = None) -> np.ndarray:
    """Returns uint8 [N, side, side, 3] for image files, decoded by a thread pool (Pillow
    releases the GIL while decoding and resizing)."""
    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    _decode_into(out, paths, side, max(len(paths), 1), workers)
    return out


def decode_to_npy(paths: list[str], side: int, path: str, chunk: int = 1024,
                  workers: int | None = None) -> None:
    """Writes the image files as uint8 [N, side, side, 3] (STORE_RULE) to the `.npy` file `path`.

    Rows are decoded `chunk` at a time by a thread pool straight into a memory-mapped temporary
    file, which is renamed to `path` at the end: the array is never held in memory whole
    (ImageNet-Extra at 256 is ~95 GiB), and parallel trials never read a half-written file."""
    with data.atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), side, side, 3))
        _decode_into(out, paths, side, chunk, workers)
        del out   # unmapped before the rename


def _decode_into(out: np.ndarray, paths: list[str], side: int, chunk: int, workers: int | None) -> None:
    def one(i: int) -> None:
        out[i] = decode_image(paths[i], side)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), chunk):
            list(pool.map(one, range(start, min(start + chunk, len(paths)))))
            if isinstance(out, np.memmap):
                out.flush()   # written back chunk by chunk: dirty pages stay bounded


def is_memory_mapped(x: np.ndarray) -> bool:
    """Returns whether an array (or the array it views) is backed by a memory-mapped file."""
    while x is not None:
        if isinstance(x, (np.memmap, mmap.mmap)):
            return True
        x = getattr(x, "base", None)
    return False


def _cache_key(list_file: str, images_root: str, side: int, extra: str = "") -> str:
    stat = os.stat(list_file)
    key = "|".join([_CACHE_VERSION, os.path.abspath(list_file), str(stat.st_size), str(stat.st_mtime_ns),
                    os.path.abspath(images_root), store_rule(side), extra])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def cached_list(list_file: str, images_root: str, side: int, cache_dir: str, prefix: str,
                rows: list[tuple[str, int]] | None = None) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Returns (uint8 [N, side, side, 3] memory-mapped from the cache, the list's rows): the
    images a split list names, decoded on first use only. The cache is keyed by the list file's
    path, size and mtime, the images' root and the stored size. `rows` replaces the list's rows
    (a subset chosen by the caller, e.g. 50 per class; it must be deterministic)."""
    extra = "" if rows is None else hashlib.sha1(repr(rows).encode()).hexdigest()
    rows = read_split_list(list_file) if rows is None else rows
    path = os.path.join(cache_dir, f"{prefix}-{side}-{_cache_key(list_file, images_root, side, extra)}.npy")
    if os.path.isfile(path):
        try:
            x = np.load(path, mmap_mode="r")
            if x.shape == (len(rows), side, side, 3):
                return x, rows
        except (OSError, ValueError):
            pass   # an unreadable cache is rebuilt below
    files = [os.path.join(images_root, rel) for rel, _ in rows]
    missing = next((f for f in files if not os.path.isfile(f)), None)
    if missing is not None:
        raise data.MissingDataError(f"{list_file} lists {os.path.relpath(missing, images_root)}, which "
                                    f"is not in {images_root}")
    decode_to_npy(files, side, path)
    return np.load(path, mmap_mode="r"), rows


# ----------------------------------------------------------------------------- ID data


def _per_class_subset(y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Returns sorted indices keeping at most `cap` rows of each class (a seeded permutation's
    first `cap`); all rows when cap is None."""
    if cap is None:
        return np.arange(len(y), dtype=np.int64)
    rng = np.random.RandomState(seed)
    keep = [np.sort(rng.permutation(np.flatnonzero(y == c))[:cap]) for c in np.unique(y)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def load_id_data(spec: data.DatasetSpec, data_dir: str | None, cache_dir: str) -> data.LongTailData:
    """Returns ImageNet-LT / Places-LT as a LongTailData: train, val and test from the lists.

    The lists fix the long tail, so imbalance_ratio is not applied. n_max caps each training
    class, val_per_class each validation class and test_per_class each test class (seeded
    subsets, for short searches). Raises MissingDataError naming the folder and the missing list
    or image; ValueError when a training class is empty."""
    info = SETS[spec.name]
    side = spec.store_side
    if spec.meta_per_class:
        raise ValueError(f"meta_per_class={spec.meta_per_class} with dataset={spec.name}: a meta set is drawn "
                         f"per (class, KMeans group) here, not per class; accepted: 0 (cala_meta's "
                         f"meta_per_group sets its size)")
    root = dataset_root(spec.name, data_dir)
    arrays, rows = {}, {}
    for split in SPLITS:
        x, r = cached_list(list_path(info, root, split), root, side, cache_dir, f"{spec.name}-{split}")
        arrays[split], rows[split] = x, r
    labels = {s: np.array([label for _, label in rows[s]], dtype=np.int64) for s in SPLITS}
    num_classes = int(max(labels[s].max() for s in SPLITS if len(labels[s]))) + 1
    for split in SPLITS:
        bad = labels[split][(labels[split] < 0)]
        if len(bad):
            raise ValueError(f"{list_path(info, root, split)}: label {int(bad[0])}; accepted: 0..{num_classes - 1}")
    caps = {"train": spec.n_max, "val": spec.val_per_class or None, "test": spec.test_per_class}
    index = {s: _per_class_subset(labels[s], caps[s], spec.seed + i) for i, s in enumerate(SPLITS)}
    meta_index, meta_record = None, {"meta_per_class": "0"}
    if spec.meta_grouping is not None:
        # Drawn from the (capped) training list only: validation and test stay whole.
        grouping, train_rows = spec.meta_grouping, index["train"]
        y_rows = labels["train"][train_rows]
        groups = meta_set.cached_groups(arrays["train"], train_rows, y_rows, grouping, spec.seed, cache_dir,
                                        _cache_key(list_path(info, root, "train"), root, side))
        meta_rows, keep_rows, kept = meta_set.draw(y_rows, groups, grouping.per_group, spec.seed)
        meta_index, index["train"] = train_rows[meta_rows], train_rows[keep_rows]
        cells = len({(int(c), int(g)) for c, g in zip(y_rows, groups)})
        meta_record = {"meta_per_class": "0", "meta_rule": grouping.rule(), "meta_size": str(len(meta_index)),
                       "meta_groups": str(grouping.groups), "meta_per_group": str(grouping.per_group),
                       "meta_group_features": grouping.describe(), "meta_cells": str(cells),
                       "meta_kept_in_train": str(kept)}
    counts = np.bincount(labels["train"][index["train"]], minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"{list_path(info, root, 'train')}: class {int(np.argmin(counts))} has no training "
                         f"image; accepted: every label 0..{num_classes - 1} in the training list")
    # Class names: the folder above each class's first training image (the wnid on ImageNet).
    class_names = [""] * num_classes
    for rel, label in rows["train"]:
        if not class_names[label]:
            class_names[label] = os.path.basename(os.path.dirname(rel)) or str(label)

    def subset(split: str, name: str) -> data.ImageSet:
        # Gathering from the memory map reads only the rows kept.
        return data.ImageSet(np.ascontiguousarray(arrays[split][index[split]]), labels[split][index[split]], name)

    record = {
        "dataset": spec.name,
        "imbalance_ratio": "fixed by the split list",
        "n_max": "all" if spec.n_max is None else str(spec.n_max),
        "val_per_class": "all" if not spec.val_per_class else str(spec.val_per_class),
        "test_per_class": "all" if spec.test_per_class is None else str(spec.test_per_class),
        "split_seed": str(spec.seed),
        "lt_rule": f"the split lists {info.prefix}_{{train,val,test}}.txt; caps are seeded per-class subsets",
        "counts": ",".join(str(int(n)) for n in counts),
        "train_size": str(len(index["train"])),
        "val_size": str(len(index["val"])),
        "test_size": str(len(index["test"])),
        **meta_record,
        "id_source": f"lists:{root}",
        "class_order": "the lists' labels",
        "data_rule": store_rule(side),
        "store_side": str(side),
    }
    return data.LongTailData(
        train=subset("train", f"{spec.name}-train"), val=subset("val", f"{spec.name}-val"),
        test=subset("test", f"{spec.name}-test"), counts=[int(n) for n in counts],
        class_names=class_names, record=record, train_index=index["train"], val_index=index["val"],
        test_index=index["test"], meta_index=data._empty_index() if meta_index is None else meta_index,
        meta=None if meta_index is None else data.ImageSet(
            np.ascontiguousarray(arrays["train"][meta_index]), labels["train"][meta_index], f"{spec.name}-meta"))


# ----------------------------------------------------------------------------- OOD sets


@dataclass(frozen=True)
class OodRelease:
    """A test-OOD set of the large benchmarks in its release format.

    kind "folder": an ImageFolder tree `<data-dir>/<path>/<class>/<file>`, the first
    `per_class` files of each class in sorted order. kind "list": a `<path> <label>` list file
    `<data-dir>/<path>`, its image paths relative to `<data-dir>/<images>`. kind "coco": a
    COCO-style annotation file `<data-dir>/<path>` whose `images[].file_name` are relative to
    `<data-dir>/<images>`, in the file's order."""
    name: str
    title: str
    kind: str
    path: str
    images: str = ""
    per_class: int | None = None
    size: int | None = None
    how_to_get: str = ""


_OPENOOD_LIST = "benchmark_imglist/imagenet/test_{}.txt"
_OPENOOD_IMAGES = "images_largescale"
OOD_RELEASES: dict[str, OodRelease] = {r.name: r for r in (
    OodRelease("imagenet_1k_ood", "ImageNet-1k-OOD (PASCL/RNA: 1,000 ImageNet-10k classes outside "
               "ImageNet-1k and ImageNet-Extra, first 50 per class)", "folder", "imagenet10k_ood_test",
               per_class=50, size=50_000, how_to_get="the ImageNet-10k classes of "
               "imagenet_ood_test_1k_wnid_list.txt, one folder per wnid"),
    OodRelease("openood_ssb_hard", "SSB-hard (OpenOOD v1.5 ImageNet near-OOD)", "list",
               _OPENOOD_LIST.format("ssb_hard"), _OPENOOD_IMAGES, size=49_000),
    OodRelease("openood_ninco", "NINCO (OpenOOD v1.5 ImageNet near-OOD)", "list",
               _OPENOOD_LIST.format("ninco"), _OPENOOD_IMAGES, size=5_879),
    OodRelease("openood_inaturalist", "iNaturalist (OpenOOD v1.5 ImageNet far-OOD, MOS subset)", "list",
               _OPENOOD_LIST.format("inaturalist"), _OPENOOD_IMAGES, size=10_000),
    OodRelease("openood_textures", "Textures (OpenOOD v1.5 ImageNet far-OOD)", "list",
               _OPENOOD_LIST.format("textures"), _OPENOOD_IMAGES, size=5_160),
    OodRelease("openood_openimage_o", "OpenImage-O (OpenOOD v1.5 ImageNet far-OOD)", "list",
               _OPENOOD_LIST.format("openimage_o"), _OPENOOD_IMAGES, size=15_869),
    OodRelease("places_lt_open", "Places-LT open set (OLTR's Places_LT_open.txt)", "list",
               "Places_LT/Places_LT_open.txt", "Places_LT"),
    OodRelease("imagenet_lt_open", "ImageNet-LT open set (OLTR's ImageNet_LT_open.txt)", "list",
               "ImageNet_LT/ImageNet_LT_open.txt", "ImageNet_LT"),
    OodRelease("inaturalist2018", "iNaturalist 2018 val (RICASSO's ImageNet-LT OOD set: 24,426 images, "
               "8,142 classes)", "coco", "inaturalist2018/val2018.json", "inaturalist2018", size=24_426,
               how_to_get="the iNaturalist 2018 competition's val2018.json and train_val2018.tar.gz, "
               "both extracted into inaturalist2018/ (file_name paths start train_val2018/)"),
)}


def ood_names() -> list[str]:
    """Returns the test-OOD set names of the large benchmarks."""
    return list(OOD_RELEASES)


def class_folders(top: str) -> list[str]:
    """Returns the class folders of an ImageFolder tree, sorted."""
    return sorted(d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d)) and not d.startswith("."))


def _folder_rows(top: str, per_class: int | None, classes: list[str] | None = None) -> list[tuple[str, int]]:
    rows = []
    for cls in class_folders(top) if classes is None else classes:
        files = sorted(f for f in os.listdir(os.path.join(top, cls))
                       if f.lower().endswith(data._IMAGE_SUFFIXES) and not f.startswith("."))
        rows += [(f"{cls}/{f}", -1) for f in files[:per_class]]
    return rows


def read_coco_images(path: str) -> list[tuple[str, int]]:
    """Returns (file_name, -1) for each entry of a COCO-style annotation file's `images` list,
    in the file's order. ValueError naming the file and what is accepted."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno}); accepted: a COCO-style "
                             f"annotation file with images[].file_name") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("file_name"), str)
                                               for i in images):
        raise ValueError(f"{path}: no 'images' list of {{\"file_name\": ...}} entries; accepted: a COCO-style "
                         f"annotation file with images[].file_name (as iNaturalist 2018's val2018.json)")
    return [(i["file_name"].lstrip("/"), -1) for i in images]


def load_ood(name: str, data_dir: str | None, cache_dir: str, side: int, max_images: int | None = None,
             seed: int = 0) -> data.ImageSet:
    """Returns the large-benchmark OOD set `name` (uint8 [N, side, side, 3], labels -1) under
    STORE_RULE; with max_images a seeded subset in original order. MissingDataError naming the
    set and where it was looked for."""
    if name not in OOD_RELEASES:
        raise ValueError(f"unknown OOD set '{name}' for the large benchmarks; accepted: {', '.join(ood_names())}")
    release = OOD_RELEASES[name]
    where = os.path.join(data_dir, release.path) if data_dir else f"<no --data-dir>/{release.path}"
    found = os.path.isdir(where) if release.kind == "folder" else os.path.isfile(where)
    if not found:
        how = release.how_to_get or (f"the release's {os.path.basename(release.path)} under "
                                     f"{os.path.dirname(release.path)}/ and its images under {release.images}/")
        raise data.MissingDataError(f"OOD set '{name}' ({release.title}) not found; looked in: {where}; get {how}")
    if release.kind == "folder":
        rows = _folder_rows(where, release.per_class)
        if not rows:
            raise data.MissingDataError(f"OOD set '{name}': no images in {where}/<class>/")
        # The rows are the key's extra, so a changed folder (not a list file) is re-decoded.
        x, _ = cached_list(where, where, side, cache_dir, f"ood-{name}", rows)
    elif release.kind == "coco":
        x, _ = cached_list(where, os.path.join(data_dir, release.images), side, cache_dir, f"ood-{name}",
                           read_coco_images(where))
    else:
        x, _ = cached_list(where, os.path.join(data_dir, release.images), side, cache_dir, f"ood-{name}")
    x = np.array(x[data.seeded_rows(len(x), max_images, seed)])   # a copy in memory, not the cache's map
    return data.ImageSet(x, np.full(len(x), -1, dtype=np.int64), name)


# ----------------------------------------------------------------------------- training outliers


@dataclass(frozen=True)
class OutlierRelease:
    """An auxiliary outlier set of the large benchmarks, as its release ships it.

    The first of `folders` under the data folder that exists is read as an ImageFolder tree
    (every file of every class folder). Else, with `full_root`, that tree's class folders named
    by `class_list` (a file in the data folder, one class per line) are read."""
    name: str
    title: str
    benchmark: str                 # the ID set whose outlier_set=auto resolves to it
    folders: tuple[str, ...]
    size: int | None = None
    full_root: str = ""
    class_list: str = ""
    how_to_get: str = ""


OUTLIER_RELEASES: dict[str, OutlierRelease] = {r.name: r for r in (
    OutlierRelease("imagenet_extra", "ImageNet-Extra (PASCL/RNA: 517,711 images of 500 ImageNet-10k classes "
                   "outside ImageNet-1k and ImageNet-1k-OOD)", "imagenet-lt", ("imagenet_extra", "imagenet_extra_1k"),
                   size=517_711, full_root="imagenet10k", class_list="imagenet_extra_1k_wnid_list.txt",
                   how_to_get="PASCL's imagenet_extra_1k_wnid_list.txt next to an extracted ImageNet-10k "
                   "(imagenet10k/<wnid>/), or those wnids' folders as imagenet_extra/<wnid>/"),
    OutlierRelease("places_extra69", "Places-Extra69 (Open-sampling: the 69 Places categories outside "
                   "Places-365)", "places-lt", ("places_extra69",),
                   how_to_get="the Places2 extra-69 training images as places_extra69/<class>/"),
)}
# Gaussian noise at the stored side: what outlier_set=auto falls back to, as on CIFAR.
GAUSSIAN_RULE = "N(0.5, 0.5^2) per pixel, clipped to [0, 1], uint8, {side}x{side} (data.synthetic_ood)"


def outlier_names() -> list[str]:
    """Returns what outlier_set accepts on the large benchmarks."""
    return ["auto", *OUTLIER_RELEASES, "gaussian", *ood_names()]


def check_outlier_set(name: str, dataset: str, test_ood: list[str], val_ood: list[str],
                      data_dir: str | None = None) -> None:
    """Raises ValueError (one line) if `name` is not an outlier set of the large benchmarks (the
    32x32 sets are refused by name), is also a test or validation OOD set, or (with data_dir)
    is a release whose class folders meet a test-OOD folder set's. Decodes nothing."""
    accepted = ", ".join(outlier_names())
    if name not in outlier_names():
        if name in {*data.OUTLIER_NAMES, *data.ood_set_names(), *ood_sets.names()}:
            raise ValueError(f"outlier_set='{name}' is a 32x32 set and does not apply to dataset {dataset}; "
                             f"accepted: {accepted}")
        raise ValueError(f"unknown outlier set '{name}' for dataset {dataset}; accepted: {accepted}")
    for kind, names in (("test", test_ood), ("validation", val_ood)):
        if name in names:
            raise ValueError(f"outlier set '{name}' is also a {kind} OOD set; train on another outlier set "
                             f"({accepted}) or drop it from the {kind} sets")
    release = OUTLIER_RELEASES.get(name) or next(
        (r for r in OUTLIER_RELEASES.values() if name == "auto" and r.benchmark == dataset), None)
    source = _outlier_source(release, data_dir) if release is not None else None
    if source is not None:
        check_disjoint(release.name, source[2], test_ood, data_dir)


def _outlier_source(release: OutlierRelease, data_dir: str | None) -> tuple[str, str, list[str], str] | None:
    """Returns (the file or folder keying the cache, the images' root, class folders, where
    they were read) of an outlier release, or None when no copy is found."""
    if data_dir is None:
        return None
    for folder in release.folders:
        top = os.path.join(data_dir, folder)
        if os.path.isdir(top):
            return top, top, class_folders(top), f"folder:{top}"
    listed = os.path.join(data_dir, release.class_list) if release.class_list else ""
    root = os.path.join(data_dir, release.full_root) if release.full_root else ""
    if root and os.path.isdir(root) and os.path.isfile(listed):
        with open(listed) as f:
            classes = sorted({line.strip() for line in f if line.strip()})
        absent = [c for c in classes if not os.path.isdir(os.path.join(root, c))]
        if absent:
            raise data.MissingDataError(f"outlier set '{release.name}': {len(absent)} of the {len(classes)} classes "
                                        f"{listed} names are not folders of {root} (first: {absent[0]})")
        return listed, root, classes, f"{release.full_root}:{root} filtered by {listed}"
    return None


def _looked(release: OutlierRelease, data_dir: str | None) -> str:
    if data_dir is None:
        return "no --data-dir given"
    places = [os.path.join(data_dir, f) for f in release.folders]
    if release.full_root:
        places.append(f"{os.path.join(data_dir, release.full_root)} with {os.path.join(data_dir, release.class_list)}")
    return "; ".join(places)


def check_disjoint(name: str, classes: Sequence[str], test_ood: Sequence[str], data_dir: str | None,
                   id_classes: Sequence[str] = (), dataset: str = "") -> None:
    """Raises ValueError (one line) when an outlier set's class folders are also class folders of
    a test-OOD folder set (ImageNet-1k-OOD) or ID classes: training on them would inflate the
    detector's numbers."""
    others = [(f"test OOD set '{t}'", class_folders(os.path.join(data_dir, OOD_RELEASES[t].path)))
              for t in test_ood if t in OOD_RELEASES and OOD_RELEASES[t].kind == "folder" and data_dir
              and os.path.isdir(os.path.join(data_dir, OOD_RELEASES[t].path))]
    others.append((f"the ID classes of {dataset}", list(id_classes)))
    for what, theirs in others:
        shared = sorted(set(classes) & set(theirs))
        if shared:
            raise ValueError(f"outlier set '{name}' shares {len(shared)} class folder(s) with {what} "
                             f"({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}); accepted: disjoint "
                             f"classes: remove them from the outlier folder or pick another outlier_set")


def load_outliers(name: str, dataset: str, data_dir: str | None, cache_dir: str, side: int,
                  max_images: int | None = None, seed: int = 0, test_ood: Sequence[str] = (),
                  id_classes: Sequence[str] = ()) -> tuple[data.ImageSet, dict[str, str]]:
    """Returns (the training outliers `name` for a large ID set, uint8 [N, side, side, 3] with
    labels -1, its .name the set actually used; the params that record it).

    "auto" takes the ID set's benchmark set (imagenet-lt: imagenet_extra, places-lt:
    places_extra69) when a copy is found, else Gaussian noise at the stored side. A release is
    decoded once (STORE_RULE) and returned memory-mapped, unless max_images keeps a seeded
    subset (gathered into memory). Raises MissingDataError when a named set is not found,
    ValueError when its classes meet a test-OOD folder set's or the ID classes."""
    check_outlier_set(name, dataset, list(test_ood), [])   # names only: the classes are checked below
    if name == "auto":
        release = next(r for r in OUTLIER_RELEASES.values() if r.benchmark == dataset)
        if _outlier_source(release, data_dir) is not None:
            name = release.name
        else:
            print(f"notice: outlier_set=auto: {release.name} not found (looked in: {_looked(release, data_dir)}); "
                  f"training on Gaussian noise at {side}x{side}", flush=True)
            name = "gaussian"
    if name == "gaussian":
        x = data.synthetic_ood("gaussian", max_images or data.GAUSSIAN_OUTLIERS, seed, size=side).x
        return (data.ImageSet(x, np.full(len(x), -1, dtype=np.int64), name),
                {"outlier_source": "synthetic", "outlier_rule": GAUSSIAN_RULE.format(side=side),
                 "outlier_subset": f"{len(x)} drawn with seed {seed}"})
    if name in OOD_RELEASES:   # another benchmark's test set, as on CIFAR
        found = load_ood(name, data_dir, cache_dir, side, max_images, seed)
        return found, {"outlier_source": f"release:{OOD_RELEASES[name].path}", "outlier_rule": store_rule(side),
                       "outlier_subset": "all" if max_images is None else f"seeded random {len(found)} of the set"}
    release = OUTLIER_RELEASES[name]
    source = _outlier_source(release, data_dir)
    if source is None:
        raise data.MissingDataError(f"outlier set '{name}' ({release.title}) not found; looked in: "
                                    f"{_looked(release, data_dir)}; get {release.how_to_get}")
    key_file, root, classes, where = source
    check_disjoint(name, classes, list(test_ood), data_dir, id_classes, dataset)
    rows = _folder_rows(root, None, classes)
    if not rows:
        raise data.MissingDataError(f"outlier set '{name}': no images in {root}/<class>/")
    x, _ = cached_list(key_file, root, side, cache_dir, f"aux-{name}", rows)
    subset = "all"
    if max_images is not None and max_images < len(x):
        subset = f"seeded random {max_images} of {len(x)} (split_seed {seed})"
        x = np.ascontiguousarray(x[data.seeded_rows(len(x), max_images, seed)])
    record = {"outlier_source": where, "outlier_rule": store_rule(side), "outlier_subset": subset,
              "outlier_classes": str(len(classes))}
    return data.ImageSet(x, np.full(len(x), -1, dtype=np.int64), name), record


# ----------------------------------------------------------------------------- device views


def random_resized_crop_flip(x_uint8: torch.Tensor, gen: torch.Generator, size: int,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Returns float [B, 3, size, size] in [0, 1]: a random resized crop of each uint8 image
    [B, 3, H, W], flipped with probability 1/2, the whole batch in one `grid_sample`.

    Boxes follow torchvision's RandomResizedCrop: 10 tries of area ~ U(scale)·HW and
    log-aspect ~ U(log ratio), integer width/height, the first that fits wins, else the whole
    image (the stored images are square, inside `ratio`). Bilinear sampling, no antialias."""
    b, _, h, w = x_uint8.shape
    dev, tries = x_uint8.device, 10
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, tries, device=dev, generator=gen))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        b, tries, device=dev, generator=gen)
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1, device=dev))
    pick = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full((b,), float(w), device=dev))
    ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full((b,), float(h), device=dev))
    x0 = torch.floor(torch.rand(b, device=dev, generator=gen) * (w - cw + 1))
    y0 = torch.floor(torch.rand(b, device=dev, generator=gen) * (h - ch + 1))
    flip = torch.rand(b, device=dev, generator=gen) < 0.5
    # Affine map from output coords to input coords in [-1, 1] (align_corners=False: the box's
    # outer pixel edges map to the output's edges); a negative x-scale mirrors the crop.
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = torch.where(flip, -cw / w, cw / w)
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    # Sampling the 0..255 values and scaling the (smaller) output saves a pass over the input.
    out = F.grid_sample(x_uint8.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.mul_(1 / 255.0)


def resize_center_crop(x_uint8: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """Returns float [B, 3, size, size] in [0, 1]: the shorter side resized to `resize`
    (bilinear, antialiased), then the centre `size` square, as torchvision's
    Resize(resize) + CenterCrop(size) on float tensors."""
    x = x_uint8.float() / 255.0
    h, w = x.shape[-2:]
    if min(h, w) != resize:
        new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


@dataclass(frozen=True)
class View:
    """The input pipeline of a large-scale set: training and evaluation views, normalised."""
    size: int
    min_scale: float = 0.08

    def train(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Returns the normalised training view [B, 3, size, size] of uint8 images."""
        crops = random_resized_crop_flip(x_uint8, gen, self.size, (self.min_scale, 1.0))
        return augment.standardize_(crops, IMAGENET_MEAN, IMAGENET_STD)

    def eval(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Returns the normalised evaluation view [B, 3, size, size] of uint8 images."""
        view = resize_center_crop(x_uint8, eval_resize(self.size), self.size).contiguous()
        return augment.standardize_(view, IMAGENET_MEAN, IMAGENET_STD)

    def rules(self) -> tuple[str, str]:
        """Returns (augment_rule, input_rule) as logged with every trial."""
        return (TRAIN_VIEW_RULE.format(size=self.size, scale=self.min_scale),
                EVAL_VIEW_RULE.format(resize=eval_resize(self.size), size=self.size))


# ----------------------------------------------------------------------------- placement


class StreamedImages:
    """uint8 images [N, 3, H, W] kept off the device: in host memory (pinned when CUDA is there)
    or, for a memory-mapped cache, on disk (read through the page cache, neither pinned nor held
    whole). Indexing with a slice or an index tensor returns those rows on `device`, gathered and
    copied `chunk` rows at a time, so neither the host staging nor the copy ever holds more than
    one chunk.

    `prefetch(index)` starts that gather in a background thread (its copy on a side CUDA stream
    when the device is a GPU); the next request for the same rows returns it, the current stream
    made to wait for the copy. Any other request is gathered when asked."""

    MAX_PENDING = 4   # prefetched batches kept for a later request (the engine asks for <= 2 ahead)

    def __init__(self, x_nhwc: np.ndarray, device: torch.device, chunk: int = 1024):
        self.device, self.chunk = torch.device(device), chunk
        self.mapped = is_memory_mapped(x_nhwc)
        if self.mapped:
            self.host = x_nhwc
        else:
            host = torch.from_numpy(np.ascontiguousarray(x_nhwc))
            self.host = host.pin_memory() if torch.cuda.is_available() else host
        n, h, w, c = x_nhwc.shape
        self.shape = torch.Size((n, c, h, w))
        self.dtype = torch.uint8
        self._pending: list[tuple[torch.Tensor, Future]] = []
        self._worker: ThreadPoolExecutor | None = None
        self._stream = None

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, index) -> torch.Tensor:
        return (torch.arange(len(self))[index] if isinstance(index, slice)
                else torch.as_tensor(index).reshape(-1).cpu())

    def _host_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.mapped:   # fancy indexing reads just these rows from the file
            return torch.from_numpy(self.host[rows.numpy()])
        return self.host.index_select(0, rows)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8, device=self.device)
        for start in range(0, len(rows), self.chunk):
            part = self._host_rows(rows[start:start + self.chunk])                # [b, H, W, 3]
            if self.device.type == "cuda":
                part = part.pin_memory()
            out[start:start + len(part)] = part.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return out

    def _gather_ahead(self, rows: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self._stream is None:
            return self._gather(rows), None
        with torch.cuda.stream(self._stream):
            out = self._gather(rows)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return out, copied

    def prefetch(self, index) -> None:
        """Starts gathering the rows `index` names, for a later `self[index]`."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
            if self.device.type == "cuda":
                self._stream = torch.cuda.Stream(self.device)
        rows = self._rows(index)
        self._pending.append((rows, self._worker.submit(self._gather_ahead, rows)))
        del self._pending[:-self.MAX_PENDING]

    def __getitem__(self, index) -> torch.Tensor:
        rows = self._rows(index)
        for i, (ahead, future) in enumerate(self._pending):
            if ahead.shape == rows.shape and torch.equal(ahead, rows):
                del self._pending[i]
                out, copied = future.result()
                if copied is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(copied)
                    out.record_stream(stream)   # made on the side stream, used (and freed) on this one
                return out
        return self._gather(rows)


def free_bytes(device: torch.device) -> int:
    """Returns the memory free for new tensors on `device`: the GPU's free memory, or the host's
    available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


class Placement:
    """Puts image sets on the device while they fit `budget_gb` (None: all of them), in the
    order asked; the rest stream from host memory (`StreamedImages`). A memory-mapped set (a
    training-outlier cache) also streams, from disk, when it is larger than the device's free
    memory; put on the device, it is copied over in chunks, never staged whole in host memory."""

    def __init__(self, device: torch.device, budget_gb: float | None):
        self.device, self.budget = device, None if budget_gb is None else budget_gb * 2**30
        self.used, self.streamed = 0, []

    def place(self, images: data.ImageSet):
        """Returns the set's images as uint8 [N, 3, H, W]: a device tensor or StreamedImages."""
        size, mapped = images.x.nbytes, is_memory_mapped(images.x)
        fits = self.budget is None or self.used + size <= self.budget
        if fits and mapped:
            fits = size <= free_bytes(torch.device(self.device))
        if not fits:
            self.streamed.append(images.name)
            return StreamedImages(images.x, self.device)
        self.used += size
        if mapped:
            return StreamedImages(images.x, self.device)[:]
        return augment.to_device_images(images.x, self.device)
