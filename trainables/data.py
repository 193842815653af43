"""Image data for long-tailed CIFAR training and OOD evaluation.

Every set is returned as uint8 RGB arrays of shape [N, 32, 32, 3]. Sources are, in order of
preference: a `<name>.tar.gz` ImageFolder archive in the data folder (read in place), the same
layout extracted to a folder, torchvision's own on-disk layout, and finally a torchvision
download. Each source is decoded once into an `.npz` cache keyed by the source's path, size and
mtime, so later runs (and parallel trials) only read the cache.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import socket
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from PIL import Image

if TYPE_CHECKING:   # trainables.meta_set imports this module
    from trainables.meta_set import MetaGrouping

IMAGE_SIZE = 32
OOD_RESIZE_RULE = "resize shorter side to 32 (bilinear, antialias) + center-crop 32"
LT_RULE = "ldam-drw: per-class seeded shuffle, first n_c; validation held out first"
# Where the balanced validation split comes from (DatasetSpec.val_source).
VAL_SOURCES = {
    # Searches: held out of the training images before the LT subsampling (n_max drops by it).
    "holdout": LT_RULE,
    # The papers' exact split (CIFAR-10 IR100: 12,406 images, n_max 5000): validation is drawn from
    # the training images the LT build leaves unused (ricasso.md §8.18, rna.md A21); a class the
    # build uses whole (the head at n_max 5000) has none.
    "unused": "ldam-drw: per-class seeded shuffle, first n_c, nothing held out (the papers' split); "
              "validation from the training images it leaves unused",
}
CLASS_ORDER = "official index order; class 0 = head"
ID_NAMES = ("cifar10", "cifar100")
# Read from split lists by trainables.large_lt, at a stored size of their own (not 32x32).
LARGE_NAMES = ("imagenet-lt", "places-lt")
DOWNLOAD_TIMEOUT_S = 15
# Part of every cache key: bump it whenever decoding changes, so stale caches are never read.
_CACHE_VERSION = "1"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_HOW_TO_PROVIDE = "pass --data-dir pointing at a folder with {name}.tar.gz, or allow download"


class MissingDataError(RuntimeError):
    """Raised when no source of a required data set could be found or downloaded."""


class DamagedDataError(MissingDataError):
    """Raised when a data archive exists but cannot be read to its end (truncated, corrupt)."""


@dataclass(frozen=True)
class ImageSet:
    """A set of images: x is uint8 [N, 32, 32, 3] RGB, y is int64 [N] (-1 for OOD sets)."""

    x: np.ndarray
    y: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4 or self.x.shape[-1] != 3:
            raise ValueError(
                f"ImageSet '{self.name}': x has dtype {self.x.dtype} and shape {self.x.shape}; "
                "accepted: uint8 [N, H, W, 3]"
            )
        y = np.asarray(self.y, dtype=np.int64)
        if y.shape != (len(self.x),):
            raise ValueError(
                f"ImageSet '{self.name}': y has shape {y.shape}; accepted: ({len(self.x)},)"
            )
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return len(self.x)


def lt_counts(num_classes: int, n_max: int, imbalance_ratio: float) -> list[int]:
    """Return the long-tailed per-class counts n_c = floor(n_max * IR ** (-c / (C - 1))).

    Class 0 is the head (n_max images), class C-1 the tail (n_max / IR, floored).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}; accepted: an integer >= 1")
    if n_max < 1:
        raise ValueError(f"n_max={n_max}; accepted: an integer >= 1")
    if not imbalance_ratio >= 1:
        raise ValueError(f"imbalance_ratio={imbalance_ratio}; accepted: a number >= 1")
    if num_classes == 1:
        return [int(n_max)]
    return [
        int(n_max * (1 / imbalance_ratio) ** (c / (num_classes - 1))) for c in range(num_classes)
    ]


@dataclass(frozen=True)
class DatasetSpec:
    """Which in-distribution data set to load and how to make it long-tailed."""

    name: str = "cifar10"
    imbalance_ratio: float = 100.0
    val_per_class: int = 50
    n_max: int | None = None
    test_per_class: int | None = None
    seed: int = 0
    meta_per_class: int = 0  # a balanced meta set held out after validation (Meta-CALA)
    store_side: int = 256    # large sets only: the cached images' side (trainables.large_lt)
    val_source: str = "holdout"  # a key of VAL_SOURCES
    # Large sets only: Meta-CALA's meta set per (class, KMeans group) (trainables.meta_set)
    meta_grouping: MetaGrouping | None = None

    @property
    def held_out(self) -> int:
        """Returns the images per class taken out of the training images before subsampling."""
        return self.meta_per_class + (self.val_per_class if self.val_source == "holdout" else 0)

    def __post_init__(self) -> None:
        if self.name not in ID_NAMES + LARGE_NAMES:
            raise ValueError(f"dataset name '{self.name}'; accepted: {', '.join(ID_NAMES + LARGE_NAMES)}")
        if self.store_side < 8:
            raise ValueError(f"store_side={self.store_side}; accepted: an integer >= 8")
        if not self.imbalance_ratio >= 1 or not np.isfinite(self.imbalance_ratio):
            raise ValueError(
                f"imbalance_ratio={self.imbalance_ratio}; accepted: a finite number >= 1"
            )
        if self.val_per_class < 0:
            raise ValueError(f"val_per_class={self.val_per_class}; accepted: an integer >= 0")
        if self.meta_per_class < 0:
            raise ValueError(f"meta_per_class={self.meta_per_class}; accepted: an integer >= 0")
        if self.val_source not in VAL_SOURCES:
            raise ValueError(f"val_source={self.val_source!r}; accepted: {', '.join(VAL_SOURCES)}")
        if self.n_max is not None and self.n_max < 1:
            raise ValueError(f"n_max={self.n_max}; accepted: None or an integer >= 1")
        if self.test_per_class is not None and self.test_per_class < 1:
            raise ValueError(
                f"test_per_class={self.test_per_class}; accepted: None or an integer >= 1"
            )
        # The test subset uses seed + 1, and RandomState takes seeds below 2**32.
        if not 0 <= self.seed < 2**32 - 1:
            raise ValueError(f"seed={self.seed}; accepted: an integer in [0, 2**32 - 2]")


def _empty_index() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class LongTailData:
    """A long-tailed training set with its balanced validation split and ID test set.

    train_index / val_index index the official training split and test_index the official test
    split, so splits can be compared across runs without looking at pixels.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    counts: list[int]
    class_names: list[str]
    record: dict[str, str]
    train_index: np.ndarray = field(default_factory=_empty_index)
    val_index: np.ndarray = field(default_factory=_empty_index)
    test_index: np.ndarray = field(default_factory=_empty_index)
    meta: ImageSet | None = None  # balanced meta set (meta_per_class > 0, or a large set's meta_grouping)
    meta_index: np.ndarray = field(default_factory=_empty_index)  # into the official training split

    @property
    def num_classes(self) -> int:
        """Return the number of ID classes."""
        return len(self.class_names)


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """One place a data set may live. `path` is what keys the cache; `root` is the folder handed
    to torchvision (torchvision sources only)."""

    kind: str  # "archive" | "folder" | "torchvision"
    path: str
    root: str = ""
    need: str = ""  # a sub-folder of a folder source that must exist, so a stray folder is skipped

    def exists(self) -> bool:
        if self.kind == "archive":
            return os.path.isfile(self.path)
        if self.kind == "folder":
            return os.path.isdir(self.where())
        return os.path.exists(self.path)  # torchvision markers may be files (SVHN's .mat)

    def where(self) -> str:
        return os.path.join(self.path, self.need) if self.need else self.path

    def describe(self) -> str:
        return f"{self.kind}:{self.path}"


def _downloads_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, "downloads")


def _local_sources(
    stem: str | None,
    tv_marker: str | None,
    data_dir: str | None,
    cache_dir: str,
    folder_need: str = "",
) -> list[_Source]:
    """Return the candidate sources in the order they are tried (archive, folder, torchvision)."""
    sources = []
    if data_dir is not None and stem is not None:
        sources.append(_Source("archive", os.path.join(data_dir, f"{stem}.tar.gz")))
        sources.append(_Source("folder", os.path.join(data_dir, stem), need=folder_need))
    if tv_marker is not None:
        roots = ([data_dir] if data_dir is not None else []) + [_downloads_dir(cache_dir)]
        for root in roots:
            sources.append(_Source("torchvision", os.path.join(root, tv_marker), root))
    return sources


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _resolve(
    sources: list[_Source], download: Callable[[], _Source] | None, allow_download: bool
) -> tuple[_Source | None, list[str]]:
    """Return the first existing source (downloading as a last resort) and every place looked."""
    looked = []
    for source in sources:
        if source.exists():
            return source, looked
        looked.append(source.where())
    if download is None:
        looked.append("no download source for this set")
    elif not allow_download:
        looked.append("download disabled")
    else:
        previous = socket.getdefaulttimeout()
        # Offline machines should fail in seconds rather than hang on a dead connection.
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            source = download()
            if source.exists():
                return source, looked
            looked.append(f"download left nothing at {source.path}")
        except Exception as error:  # any failure only means "not available"
            looked.append(f"download failed ({_one_line(error)})")
        finally:
            socket.setdefaulttimeout(previous)
    return None, looked


# ----------------------------------------------------------------------------- caching


def _cache_path(cache_dir: str, prefix: str, source: _Source, extra: str = "") -> str:
    """Return the cache file for a source; it changes whenever the source's size or mtime does."""
    stat = os.stat(source.path)
    key = "|".join(
        [
            _CACHE_VERSION,
            source.kind,
            os.path.abspath(source.path),
            str(stat.st_size),
            str(stat.st_mtime_ns),
            extra,
        ]
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{prefix}-{digest}.npz")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary file's path beside `path` (same suffix) to write; when the block ends
    it becomes `path` (readable by all), or is removed when the block raises. Several trials may
    write the same cache at once: os.replace makes the last writer win without any reader ever
    seeing a half-written file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users sharing the cache may read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _cached(path: str, decode: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the arrays stored at `path`, decoding and storing them first if needed."""
    if os.path.isfile(path):
        try:
            with np.load(path) as stored:
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # an unreadable cache is rebuilt below
    arrays = decode()
    _save_npz_atomic(path, arrays)
    return arrays


# ----------------------------------------------------------------------------- decoding


def _fit_32(image: Image.Image) -> np.ndarray:
    """Return the image as uint8 [32, 32, 3] RGB, applying OOD_RESIZE_RULE if not 32x32."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        scale = IMAGE_SIZE / min(width, height)
        new_w = max(IMAGE_SIZE, round(width * scale))
        new_h = max(IMAGE_SIZE, round(height * scale))
        # Pillow's bilinear filter widens its support when shrinking, i.e. it antialiases.
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - IMAGE_SIZE) // 2, (new_h - IMAGE_SIZE) // 2
        image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    return np.asarray(image, dtype=np.uint8)


def _decode_image(data: bytes) -> np.ndarray:
    """Return encoded image bytes as uint8 [32, 32, 3] RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return _fit_32(image)


def _decode_all(blobs: list[bytes]) -> np.ndarray:
    """Return all encoded images decoded into one uint8 [N, 32, 32, 3] array."""
    out = np.empty((len(blobs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        out[i] = _decode_image(blob)
    return out


def _is_image(parts: tuple[str, ...]) -> bool:
    return (
        bool(parts)
        and not any(p.startswith(".") for p in parts)
        and parts[-1].lower().endswith(_IMAGE_SUFFIXES)
    )


def _archive_entries(path: str) -> Iterator[tuple[tuple[str, ...], bytes]]:
    """Yield (path parts below the archive's top-level folder, file bytes) for each image;
    DamagedDataError naming the archive if it is truncated or not a gzipped tar."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in (".", "/"))[1:]
                if _is_image(parts):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield parts, handle.read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DamagedDataError(f"archive {path} is damaged ({_one_line(e)}); replace it with a "
                               f"complete copy, or remove it to use another source") from None


def _folder_entries(path: str) -> Iterator[tuple[tuple[str, ...], bytes]]:
    """Yield (path parts below `path`, file bytes) for each image under a folder."""
    for current, subdirs, files in os.walk(path):
        subdirs.sort()
        relative = os.path.relpath(current, path)
        prefix = () if relative == "." else tuple(relative.split(os.sep))
        for name in sorted(files):
            parts = prefix + (name,)
            if _is_image(parts):
                with open(os.path.join(current, name), "rb") as f:
                    yield parts, f.read()


def _entries(source: _Source) -> Iterator[tuple[tuple[str, ...], bytes]]:
    if source.kind == "archive":
        return _archive_entries(source.path)
    return _folder_entries(source.path)


def _labelled(
    entries: list[tuple[str, bytes]], class_names: list[str], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return (decoded images, int64 labels) for (class name, bytes) entries."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({cls for cls, _ in entries} - set(index))
    if unknown:
        raise ValueError(
            f"{where}: test classes {unknown} have no training folder; accepted: {class_names}"
        )
    x = _decode_all([blob for _, blob in entries])
    y = np.array([index[cls] for cls, _ in entries], dtype=np.int64)
    return x, y


def _decode_id_imagefolder(source: _Source) -> dict[str, np.ndarray]:
    """Return x/y for train and test plus class_names from a `{train,test}/<class>/` layout."""
    splits: dict[str, list[tuple[tuple[str, ...], bytes]]] = {"train": [], "test": []}
    for parts, blob in _entries(source):
        if len(parts) == 3 and parts[0] in splits:
            splits[parts[0]].append((parts[1:], blob))
    for split, items in splits.items():
        if not items:
            raise MissingDataError(
                f"{source.describe()} has no images under {split}/<class>/; "
                "accepted layout: <root>/{train,test}/<class>/<file>"
            )
        items.sort(key=lambda item: item[0])
    class_names = sorted({parts[0] for parts, _ in splits["train"]})
    where = source.describe()
    x_train, y_train = _labelled([(p[0], b) for p, b in splits["train"]], class_names, where)
    x_test, y_test = _labelled([(p[0], b) for p, b in splits["test"]], class_names, where)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "class_names": np.array(class_names),
    }


# ID name -> (torchvision class, folder that exists under its root once downloaded)
_TV_ID = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
}


def _tv_id_class(name: str):
    import torchvision  # imported lazily: it is slow to import and only needed here

    return getattr(torchvision.datasets, _TV_ID[name][0])


def _decode_id_torchvision(name: str, root: str) -> dict[str, np.ndarray]:
    """Return x/y for train and test plus class_names from torchvision's CIFAR layout."""
    dataset_class = _tv_id_class(name)
    train = dataset_class(root=root, train=True, download=False)
    test = dataset_class(root=root, train=False, download=False)
    return {
        "x_train": np.ascontiguousarray(train.data, dtype=np.uint8),
        "y_train": np.asarray(train.targets, dtype=np.int64),
        "x_test": np.ascontiguousarray(test.data, dtype=np.uint8),
        "y_test": np.asarray(test.targets, dtype=np.int64),
        "class_names": np.array(list(train.classes)),
    }


def _download_id(name: str, cache_dir: str) -> _Source:
    root = _downloads_dir(cache_dir)
    dataset_class = _tv_id_class(name)
    dataset_class(root=root, train=True, download=True)
    dataset_class(root=root, train=False, download=True)
    return _Source("torchvision", os.path.join(root, _TV_ID[name][1]), root)


def _load_id_arrays(
    name: str, data_dir: str | None, cache_dir: str, download: bool
) -> tuple[dict[str, np.ndarray] | None, str, list[str]]:
    """Return (arrays or None if not found, source description, places looked)."""
    sources = _local_sources(name, _TV_ID[name][1], data_dir, cache_dir, folder_need="train")
    source, looked = _resolve(sources, lambda: _download_id(name, cache_dir), download)
    if source is None:
        return None, "", looked

    def decode() -> dict[str, np.ndarray]:
        if source.kind == "torchvision":
            return _decode_id_torchvision(name, source.root)
        return _decode_id_imagefolder(source)

    arrays = _cached(_cache_path(cache_dir, name, source), decode)
    return arrays, source.describe(), looked


def _missing_id_message(name: str, data_dir: str | None, looked: list[str]) -> str:
    places = list(looked) if data_dir is not None else ["no --data-dir given", *looked]
    return (
        f"data set '{name}' not found (looked in: {'; '.join(places)}); "
        + _HOW_TO_PROVIDE.format(name=name)
    )


# ----------------------------------------------------------------------------- ID splits


def _holdout_and_subsample(
    y_train: np.ndarray, counts: list[int], val_per_class: int, seed: int, meta_per_class: int = 0,
    val_source: str = "holdout",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (train, validation, meta) indices into the official training split.

    One RandomState walks the classes twice: first a permutation per class whose first
    val_per_class indices become validation and the next meta_per_class the meta set, then a
    permutation per class of what remains whose first counts[c] indices become training.
    Validation is therefore identical for every IR and every meta-set size.

    With val_source "unused" nothing but the meta set is held out first, so the training
    selection is LDAM-DRW's own; validation is then the first val_per_class of a seeded
    permutation (its own RandomState, seed + 2) of each class's images training left unused.
    """
    if val_source == "unused":
        train, _, meta = _holdout_and_subsample(y_train, counts, 0, seed, meta_per_class)
        rng = np.random.RandomState(seed + 2)
        taken = np.zeros(len(y_train), dtype=bool)
        taken[train] = taken[meta] = True
        val = [np.sort(rng.permutation(np.flatnonzero((y_train == c) & ~taken))[:val_per_class])
               for c in range(len(counts))]
        return train, np.concatenate(val).astype(np.int64), meta
    rng = np.random.RandomState(seed)
    held = val_per_class + meta_per_class
    remaining, val, meta = [], [], []
    for c in range(len(counts)):
        members = np.flatnonzero(y_train == c)
        # With no hold-out, draw nothing here: the selection is then exactly LDAM-DRW's
        # (np.random.seed(seed), then per class shuffle and keep the first n_c).
        order = rng.permutation(members) if held else members
        val.append(np.sort(order[:val_per_class]))
        meta.append(np.sort(order[val_per_class:held]))
        remaining.append(np.sort(order[held:]))
    train = [np.sort(rng.permutation(rest)[:n]) for rest, n in zip(remaining, counts)]
    as_index = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
    return as_index(train), as_index(val), as_index(meta)


def _balanced_subset(y: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Return sorted indices of the first per_class of a seeded permutation of each class."""
    rng = np.random.RandomState(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        if per_class > len(members):
            raise ValueError(
                f"test_per_class={per_class} but class {c} has {len(members)} test images; "
                f"accepted: None or 1..{len(members)}"
            )
        chosen.append(np.sort(rng.permutation(members)[:per_class]))
    return np.concatenate(chosen).astype(np.int64)


def _check_counts(
    spec: DatasetSpec, counts: list[int], per_class: np.ndarray, class_names: list[str]
) -> None:
    """Raise ValueError if some class has fewer images than what is held out plus its LT count."""
    held = spec.held_out
    for c, (wanted, have) in enumerate(zip(counts, per_class)):
        available = int(have) - held
        if available < wanted or available < 0:
            if spec.val_source == "unused":
                raise ValueError(
                    f"class {c} ('{class_names[c]}') needs {spec.meta_per_class} meta + {wanted} "
                    f"training images but has {int(have)}; accepted: meta_per_class + n_max <= "
                    f"{int(per_class.min())}")
            raise ValueError(
                f"class {c} ('{class_names[c]}') needs {spec.val_per_class} validation + "
                f"{spec.meta_per_class} meta + {wanted} training images but has {int(have)}; "
                f"accepted: val_per_class + meta_per_class + n_max <= {int(per_class.min())}"
            )


def load_id_data(
    spec: DatasetSpec, data_dir: str | None, cache_dir: str, download: bool
) -> LongTailData:
    """Return the long-tailed train set, balanced validation split and ID test set for `spec`.

    Raises MissingDataError if no source of the data set is found, ValueError if the spec asks
    for more images per class than exist. ImageNet-LT and Places-LT come from their split lists
    (trainables.large_lt.load_id_data).
    """
    if spec.name in LARGE_NAMES:
        from trainables import large_lt   # it builds on this module
        return large_lt.load_id_data(spec, data_dir, cache_dir)
    arrays, source, looked = _load_id_arrays(spec.name, data_dir, cache_dir, download)
    if arrays is None:
        raise MissingDataError(_missing_id_message(spec.name, data_dir, looked))
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    class_names = [str(n) for n in arrays["class_names"]]
    num_classes = len(class_names)
    per_class = np.bincount(y_train, minlength=num_classes)
    held = spec.held_out
    n_max = spec.n_max if spec.n_max is not None else int(per_class.min()) - held
    if n_max < 1:
        raise ValueError(
            f"val_per_class={spec.val_per_class} + meta_per_class={spec.meta_per_class} leaves no "
            f"training images; accepted: a sum < {int(per_class.min())}"
        )
    counts = lt_counts(num_classes, n_max, spec.imbalance_ratio)
    _check_counts(spec, counts, per_class, class_names)
    train_index, val_index, meta_index = _holdout_and_subsample(
        y_train, counts, spec.val_per_class, spec.seed, spec.meta_per_class, spec.val_source
    )
    if spec.val_per_class and not len(val_index):
        raise ValueError(f"val_source='unused' with imbalance_ratio={spec.imbalance_ratio:g}: the build "
                         f"uses every training image, none is left for validation; accepted: "
                         f"val_source='holdout'")
    if spec.test_per_class is None:
        test_index = np.arange(len(y_test), dtype=np.int64)
    else:
        test_index = _balanced_subset(y_test, num_classes, spec.test_per_class, spec.seed + 1)

    def subset(split: str, index: np.ndarray, name: str) -> ImageSet:
        return ImageSet(arrays[f"x_{split}"][index], arrays[f"y_{split}"][index], name)

    train = subset("train", train_index, f"{spec.name}-lt-train")
    val = subset("train", val_index, f"{spec.name}-val")
    test = subset("test", test_index, f"{spec.name}-test")
    record = {
        "dataset": spec.name,
        "imbalance_ratio": f"{spec.imbalance_ratio:g}",
        "n_max": str(n_max),
        "val_per_class": str(spec.val_per_class),
        "test_per_class": "all" if spec.test_per_class is None else str(spec.test_per_class),
        "split_seed": str(spec.seed),
        "test_subset_seed": "none" if spec.test_per_class is None else str(spec.seed + 1),
        "lt_rule": VAL_SOURCES[spec.val_source],
        "val_source": spec.val_source,
        "val_counts": ",".join(str(n) for n in np.bincount(y_train[val_index], minlength=num_classes)),
        "counts": ",".join(str(n) for n in counts),
        "train_size": str(len(train)),
        "val_size": str(len(val)),
        "meta_per_class": str(spec.meta_per_class),
        "test_size": str(len(test)),
        "id_source": source,
        "class_order": CLASS_ORDER,
    }
    return LongTailData(
        train=train,
        val=val,
        test=test,
        counts=counts,
        class_names=class_names,
        record=record,
        train_index=train_index,
        val_index=val_index,
        test_index=test_index,
        meta=subset("train", meta_index, f"{spec.name}-meta") if spec.meta_per_class else None,
        meta_index=meta_index if spec.meta_per_class else _empty_index(),
    )


# ----------------------------------------------------------------------------- OOD sets


def _tv_dataset(class_name: str, **kwargs) -> Callable[[str, bool], object]:
    """Return a function (root, download) -> the torchvision dataset `class_name`(**kwargs)."""

    def make(root: str, download: bool):
        import torchvision

        return getattr(torchvision.datasets, class_name)(root=root, download=download, **kwargs)

    return make


@dataclass(frozen=True)
class _OodEntry:
    offline: str | None  # archive / folder stem under data_dir
    tv_marker: str | None  # path under a torchvision root that exists once the set is there
    tv_make: Callable[[str, bool], object] | None  # (root, download) -> torchvision dataset


_OOD_REGISTRY: dict[str, _OodEntry] = {
    "cifar100": _OodEntry(
        "cifar100_ood", "cifar-100-python", _tv_dataset("CIFAR100", train=False)
    ),
    "tin": _OodEntry("tin_ood", None, None),
    "textures": _OodEntry("textures_ood", "dtd", _tv_dataset("DTD", split="test", partition=1)),
    "mnist": _OodEntry("mnist_ood", "MNIST/raw", _tv_dataset("MNIST", train=False)),
    "fashion_mnist": _OodEntry(
        "fashion_mnist_ood", "FashionMNIST/raw", _tv_dataset("FashionMNIST", train=False)
    ),
    "svhn": _OodEntry(None, "test_32x32.mat", _tv_dataset("SVHN", split="test")),
    "places365": _OodEntry(
        None, "val_256", _tv_dataset("Places365", split="val", small=True)
    ),
    # Loaded through the ID loader (its official test split); only sensible when ID is CIFAR-100.
    "cifar10": _OodEntry(None, None, None),
}

_SYNTHETIC = ("gaussian", "uniform", "blobs", "rademacher")


def ood_set_names() -> list[str]:
    """Return the names of all registered real test-OOD sets."""
    return list(_OOD_REGISTRY)


def synthetic_names() -> list[str]:
    """Return the names of the synthetic OOD sets."""
    return list(_SYNTHETIC)


def check_ood_names(names: list[str], id_name: str) -> None:
    """Raise ValueError if a name is neither a real nor a synthetic OOD set, or is the ID set."""
    from trainables import large_lt, ood_sets  # the release-format sets; they build on this module

    valid = list(dict.fromkeys(ood_set_names() + ood_sets.names())) + synthetic_names()
    if id_name in LARGE_NAMES:   # the 32x32 sets do not apply to the large benchmarks
        valid = large_lt.ood_names() + synthetic_names()
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown OOD set '{name}'; accepted: {', '.join(valid)}")
        if name in (id_name, f"{id_name}_test", f"scood_{id_name}"):
            raise ValueError(
                f"OOD set '{name}' is the in-distribution set; accepted: any of "
                f"{', '.join(n for n in valid if n != id_name)}"
            )


def _decode_ood_imagefolder(source: _Source) -> dict[str, np.ndarray]:
    """Return {"x": images} from an ImageFolder layout, in sorted path order."""
    entries = sorted(_entries(source), key=lambda item: item[0])
    if not entries:
        raise MissingDataError(f"{source.describe()} holds no images")
    return {"x": _decode_all([blob for _, blob in entries])}


def _decode_ood_torchvision(entry: _OodEntry, root: str) -> dict[str, np.ndarray]:
    """Return {"x": images} from a torchvision data set already on disk."""
    dataset = entry.tv_make(root, False)
    x = np.empty((len(dataset), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(len(dataset)):
        x[i] = _fit_32(dataset[i][0])
    return {"x": x}


def _ood_pixels(
    name: str, data_dir: str | None, cache_dir: str, download: bool
) -> tuple[np.ndarray | None, list[str]]:
    """Return (uint8 images or None if not found, places looked)."""
    if name == "cifar10":
        arrays, _, looked = _load_id_arrays("cifar10", data_dir, cache_dir, download)
        return (None if arrays is None else arrays["x_test"]), looked
    entry = _OOD_REGISTRY[name]
    sources = _local_sources(entry.offline, entry.tv_marker, data_dir, cache_dir)

    def fetch() -> _Source:
        root = _downloads_dir(cache_dir)
        entry.tv_make(root, True)
        return _Source("torchvision", os.path.join(root, entry.tv_marker), root)

    source, looked = _resolve(sources, fetch if entry.tv_make else None, download)
    if source is None:
        return None, looked

    def decode() -> dict[str, np.ndarray]:
        if source.kind == "torchvision":
            return _decode_ood_torchvision(entry, source.root)
        return _decode_ood_imagefolder(source)

    path = _cache_path(cache_dir, f"ood-{name}", source, OOD_RESIZE_RULE)
    return _cached(path, decode)["x"], looked


def load_ood(
    name: str,
    data_dir: str | None,
    cache_dir: str,
    download: bool,
    max_images: int | None = None,
    seed: int = 0,
) -> ImageSet | None:
    """Return the real OOD set `name` (labels -1), or None with a notice on stderr if missing.

    With max_images, return a seeded random subset of that many images in original order.
    """
    if name not in _OOD_REGISTRY:
        from trainables import ood_sets

        if not ood_sets.is_release_set(name):
            raise ValueError(f"unknown OOD set '{name}'; accepted: "
                             f"{', '.join(dict.fromkeys(ood_set_names() + ood_sets.names()))}")
        try:
            return ood_sets.load(name, data_dir, cache_dir, download, max_images=max_images, seed=seed)
        except MissingDataError as e:
            print(f"notice: {e}; skipped", file=sys.stderr)
            return None
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images}; accepted: None or an integer >= 1")
    x, looked = _ood_pixels(name, data_dir, cache_dir, download)
    if x is None:
        if data_dir is None:
            looked = ["no --data-dir given", *looked]
        print(f"notice: OOD set '{name}' not found (looked in: {'; '.join(looked)}); skipped",
              file=sys.stderr)
        return None
    x = x[seeded_rows(len(x), max_images, seed)]
    return ImageSet(np.ascontiguousarray(x), np.full(len(x), -1, dtype=np.int64), name)


# ----------------------------------------------------------------------------- synthetic OOD


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Return x [N, H, W, C] blurred over H and W by a Gaussian (edges mirrored)."""
    radius = int(4 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    for axis in (1, 2):
        size = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.moveaxis(np.pad(x, pad, mode="symmetric"), axis, 0)
        blurred = sum(w * padded[k : k + size] for k, w in enumerate(weights))
        x = np.moveaxis(blurred, 0, axis)
    return x


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)


SYNTHETIC_CHUNK = 256   # rows of a gaussian set drawn at once


def seeded_rows(n: int, max_images: int | None, seed: int) -> np.ndarray | slice:
    """Returns the rows of an n-image set that a seeded subset of max_images keeps, in their
    original order; all of them (slice(None)) when max_images is None or not below n."""
    if max_images is None or max_images >= n:
        return slice(None)
    return np.sort(np.random.RandomState(seed).choice(n, max_images, replace=False))


def synthetic_ood(name: str, n: int, seed: int, size: int = IMAGE_SIZE) -> ImageSet:
    """Return n seeded synthetic OOD images (uint8 [n, size, size, 3], labels -1; 32 by default).

    gaussian: N(0.5, 0.5^2) clipped to [0, 1]; uniform: U[0, 1]; rademacher: each channel 0 or
    255; blobs: Bernoulli(0.7) noise blurred (sigma 1.5), values below 0.75 set to 0.
    """
    if name not in _SYNTHETIC:
        raise ValueError(f"unknown synthetic OOD set '{name}'; accepted: {', '.join(_SYNTHETIC)}")
    if n < 1:
        raise ValueError(f"n={n}; accepted: an integer >= 1")
    rng = np.random.RandomState(seed)
    shape = (n, size, size, 3)
    if name == "gaussian":
        # Drawn SYNTHETIC_CHUNK rows at a time: the same values (one stream) without a float64
        # array of the whole set (15 GiB for 10,000 images at a large set's 256 px).
        x = np.empty(shape, dtype=np.uint8)
        for start in range(0, n, SYNTHETIC_CHUNK):
            rows = min(SYNTHETIC_CHUNK, n - start)
            x[start:start + rows] = _to_uint8(rng.normal(0.5, 0.5, size=(rows, *shape[1:])))
    elif name == "uniform":
        x = _to_uint8(rng.uniform(0.0, 1.0, size=shape))
    elif name == "rademacher":
        x = (rng.randint(0, 2, size=shape) * 255).astype(np.uint8)
    else:
        noise = rng.binomial(1, 0.7, size=shape).astype(np.float32)
        blurred = _gaussian_blur(noise, sigma=1.5)
        blurred[blurred < 0.75] = 0.0
        x = _to_uint8(blurred)
    return ImageSet(x, np.full(n, -1, dtype=np.int64), name)


# ----------------------------------------------------------------------------- auxiliary outliers

# Training outliers (OE, Energy-OE, RNA, Open-sampling, PASCL). "300k" is the user's own
# 300K_random_images.npy (Hendrycks et al., uint8 [N, 32, 32, 3]); "tin_aux" the offline
# TinyImages-300K stand-in; "gaussian" the noise DARL's baselines used when no set was given.
OUTLIER_FILE = "300K_random_images.npy"
OUTLIER_NAMES = ("auto", "300k", "tin_aux", "gaussian")
OUTLIER_ORDER = ("300k", "tin_aux", "gaussian")   # what "auto" tries
GAUSSIAN_OUTLIERS = 10_000
# Sets that share a source with an outlier set but no class or image: allowed, and noted.
_SHARED_SOURCE = {("tin_aux", "tin"): "tin_aux and tin are both TinyImageNet but share no class "
                                      "and no image (see the data README)",
                  ("tin_aux", "tin_val"): "tin_aux (train images of 83 TinyImageNet classes) shares "
                                          "classes, not images, with tin_val (val images of all 200)",
                  ("tin_aux", "scood_tin"): "tin_aux and SC-OOD's tin list are both TinyImageNet: "
                                            "they may share classes"}


def _outlier_npy(data_dir: str | None, cache_dir: str) -> str | None:
    for folder in ([data_dir] if data_dir else []) + [cache_dir]:
        path = os.path.join(folder, OUTLIER_FILE)
        if os.path.isfile(path):
            return path
    return None


def check_outlier_set(name: str, test_ood: list[str], val_ood: list[str]) -> str:
    """Raise ValueError if `name` is unknown or is also a test or validation OOD set (training on
    the sets a detector is judged on would inflate its numbers). Returns a note ('' if none) for
    pairs that share a source but no image."""
    valid = OUTLIER_NAMES + tuple(ood_set_names())
    if name not in valid:
        raise ValueError(f"unknown outlier set '{name}'; accepted: {', '.join(valid)}")
    if name in test_ood:
        raise ValueError(f"outlier set '{name}' is also a test OOD set; drop it from test_ood or "
                         f"train on another outlier set ({', '.join(OUTLIER_ORDER)})")
    if name in val_ood:
        raise ValueError(f"outlier set '{name}' is also a validation OOD set; drop it from val_ood "
                         f"or train on another outlier set ({', '.join(OUTLIER_ORDER)})")
    return "; ".join(note for (aux, test), note in _SHARED_SOURCE.items()
                     if aux == name and test in test_ood)


def load_outliers(
    name: str,
    data_dir: str | None,
    cache_dir: str,
    max_images: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """Return the auxiliary outlier set `name` (labels -1), its .name the set actually used.

    "auto" takes the first of 300k, tin_aux, gaussian that exists. max_images keeps a seeded
    subset. Raises MissingDataError when a named set is not found.
    """
    if name == "auto":
        for candidate in OUTLIER_ORDER:
            if candidate == "gaussian" or (
                _outlier_npy(data_dir, cache_dir) if candidate == "300k"
                else _local_source_exists(candidate, data_dir)):
                return load_outliers(candidate, data_dir, cache_dir, max_images, seed)
    if name == "gaussian":
        x = synthetic_ood("gaussian", max_images or GAUSSIAN_OUTLIERS, seed).x
    elif name == "300k":
        path = _outlier_npy(data_dir, cache_dir)
        if path is None:
            raise MissingDataError(f"outlier set '300k': no {OUTLIER_FILE} in "
                                   f"{data_dir or '(no --data-dir)'} or {cache_dir}")
        images = np.load(path, mmap_mode="r")
        x = np.ascontiguousarray(images[seeded_rows(len(images), max_images, seed)])
    elif name == "tin_aux":
        source, looked = _resolve(_local_sources("tin_aux", None, data_dir, cache_dir), None, False)
        if source is None:
            raise MissingDataError(f"outlier set 'tin_aux' not found (looked in: {'; '.join(looked)})")
        x = _cached(_cache_path(cache_dir, "aux-tin_aux", source, OOD_RESIZE_RULE),
                    lambda: _decode_ood_imagefolder(source))["x"]
    else:
        found = load_ood(name, data_dir, cache_dir, download=False, seed=seed)
        if found is None:
            raise MissingDataError(f"outlier set '{name}' not found")
        x = found.x
    if name != "300k":
        x = x[seeded_rows(len(x), max_images, seed)]
    return ImageSet(np.ascontiguousarray(x), np.full(len(x), -1, dtype=np.int64), name)


def _local_source_exists(stem: str, data_dir: str | None) -> bool:
    return any(s.exists() for s in _local_sources(stem, None, data_dir, ""))
