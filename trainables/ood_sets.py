"""Test-OOD sets in their public release formats, for the evaluation protocols.

Each set is read from the format its release ships, found in the data folder as an extracted
folder or as the release archive (read in place), else from the download folder, else downloaded
where torchvision offers it:

| set | release and format | images |
|---|---|---:|
| `lsun_c`, `lsun_r`, `isun` | ODIN release: `LSUN/` (or `LSUN_C/`), `LSUN_resize/`, `iSUN/`, any image below (`.tar.gz`) | 10,000, 10,000, 8,925 |
| `inaturalist` | MOS OOD subset: `iNaturalist/images/*.jpg` (`iNaturalist.tar.gz`) | 10,000 |
| `dtd` | full DTD: `dtd/images/<class>/*.jpg` (`dtd-r1.0.1.tar.gz`; torchvision download) | 5,640 |
| `tin_val` | TinyImageNet-200 val: `tiny-imagenet-200/val/images/*.JPEG` (`tiny-imagenet-200.zip`) | 10,000 |
| `places365` | official val, small images: `val_256/*.jpg` (`val_256.tar`; torchvision download) | 36,500 |
| `cifar100_test`, `cifar10_test` | official test split, torchvision's `cifar-100-python/`, `cifar-10-batches-py/` | 10,000 |
| `svhn` | test split, torchvision's `test_32x32.mat` | 26,032 |
| `mnist` | official test split, torchvision's `MNIST/raw/` | 10,000 |
| `scood_<set>` | SC-OOD benchmark lists: `SCOOD/data/imglist/benchmark_<id>/test_<set>.txt` + `SCOOD/data/images/` | per list |

Every image becomes uint8 [32, 32, 3] RGB under one of two resize rules (`RESIZE_RULES`): the
rule is part of the protocol, because non-square sources (DTD, LSUN-C, Places365, iNaturalist)
give other pixels under each. SC-OOD sets keep each image's `sc_label` as its label: -1 for a true
OOD image, the ID class for an image that belongs to one (counted as ID where a protocol says so).
"""
from __future__ import annotations

import ast
import hashlib
import os
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from trainables import data

RESIZE_RULES = {
    "crop": "resize shorter side to 32 (bilinear, antialias) + center-crop 32",   # Resize(32)+CenterCrop(32)
    "square": "resize to 32x32 (bilinear, antialias), aspect ratio not kept",     # Resize((32, 32))
}
SCOOD_SETS = ("texture", "svhn", "cifar10", "cifar100", "tin", "lsun", "places365")
_CACHE_VERSION = "1"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def fit_32(image: Image.Image, rule: str) -> np.ndarray:
    """Returns the image as uint8 [32, 32, 3] RGB under a resize rule (see RESIZE_RULES)."""
    if rule not in RESIZE_RULES:
        raise ValueError(f"resize rule '{rule}'; accepted: {', '.join(RESIZE_RULES)}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if rule == "crop":
        return data._fit_32(image)
    if image.size != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        # Pillow's bilinear filter widens its support when shrinking, i.e. it antialiases.
        image = image.resize((data.IMAGE_SIZE, data.IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class Release:
    """Where a test-OOD set lives and how it is read.

    Image releases: image files below `<stem>/<inner>` of a folder or archive named by `stems` /
    `archives`. Array releases: the file `tv_marker` under a data or download root, in the layout
    torchvision downloads, read by `reader`. `tv_make` downloads (through torchvision).
    """

    name: str
    title: str
    size: int | None                       # images in the full release
    stems: tuple[str, ...] = ()
    archives: tuple[str, ...] = ()
    inner: str = ""
    tv_marker: str | None = None
    tv_make: Callable[[str, bool], object] | None = None
    reader: Callable[[str], np.ndarray] | None = None   # marker file -> uint8 [N, H, W(, 3)]
    tv_folder: str = ""                    # image releases torchvision downloads: the stem's path
    how_to_get: str = ""


def read_cifar_pickle(path: str) -> np.ndarray:
    """Returns uint8 [N, 32, 32, 3] from a CIFAR python-version batch (`data`: N x 3072, CHW)."""
    import pickle
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    flat = np.asarray(batch[b"data"], dtype=np.uint8)
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_svhn_mat(path: str) -> np.ndarray:
    """Returns uint8 [N, 32, 32, 3] from SVHN's cropped-digits .mat file (`X`: 32 x 32 x 3 x N)."""
    from scipy.io import loadmat
    return np.ascontiguousarray(np.asarray(loadmat(path)["X"], dtype=np.uint8).transpose(3, 0, 1, 2))


def read_idx_images(path: str) -> np.ndarray:
    """Returns uint8 [N, H, W] from an IDX image file (MNIST's `t10k-images-idx3-ubyte`)."""
    with open(path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2051:
        raise ValueError(f"{path}: magic {int.from_bytes(raw[:4], 'big')}; accepted: 2051 (IDX uint8 images)")
    n, h, w = (int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in (1, 2, 3))
    return np.frombuffer(raw, dtype=np.uint8, offset=16, count=n * h * w).reshape(n, h, w)


def _tv(class_name: str, **kwargs) -> Callable[[str, bool], object]:
    def make(root: str, download: bool):
        import torchvision
        return getattr(torchvision.datasets, class_name)(root=root, download=download, **kwargs)
    return make


RELEASES: dict[str, Release] = {r.name: r for r in (
    Release("lsun_c", "LSUN-Crop (ODIN release)", 10_000, ("LSUN_C", "LSUN"), ("LSUN.tar.gz", "LSUN_C.tar.gz"),
            how_to_get="the ODIN release's LSUN.tar.gz"),
    Release("lsun_r", "LSUN-Resize (ODIN release)", 10_000, ("LSUN_resize",), ("LSUN_resize.tar.gz",),
            how_to_get="the ODIN release's LSUN_resize.tar.gz"),
    Release("isun", "iSUN (ODIN release)", 8_925, ("iSUN",), ("iSUN.tar.gz",),
            how_to_get="the ODIN release's iSUN.tar.gz"),
    Release("inaturalist", "iNaturalist OOD subset (MOS release, 110 plant classes)", 10_000,
            ("iNaturalist",), ("iNaturalist.tar.gz",), inner="images",
            how_to_get="the MOS release's iNaturalist.tar.gz"),
    Release("dtd", "Describable Textures, all 47 classes", 5_640, ("dtd",), ("dtd-r1.0.1.tar.gz", "dtd.tar.gz"),
            inner="images", tv_make=_tv("DTD", split="test", partition=1), tv_folder="dtd/dtd",
            how_to_get="dtd-r1.0.1.tar.gz (torchvision downloads it)"),
    Release("tin_val", "TinyImageNet-200 val", 10_000, ("tiny-imagenet-200",),
            ("tiny-imagenet-200.zip", "tiny-imagenet-200.tar.gz"), inner="val/images",
            how_to_get="tiny-imagenet-200.zip"),
    Release("places365", "Places365 official val (256x256)", 36_500, ("val_256",), ("val_256.tar",),
            tv_make=_tv("Places365", split="val", small=True), tv_folder="val_256",
            how_to_get="val_256.tar (torchvision downloads it)"),
    Release("cifar100_test", "CIFAR-100 official test split", 10_000, tv_marker="cifar-100-python/test",
            tv_make=_tv("CIFAR100", train=False), reader=read_cifar_pickle,
            how_to_get="cifar-100-python (torchvision downloads it)"),
    Release("cifar10_test", "CIFAR-10 official test split", 10_000, tv_marker="cifar-10-batches-py/test_batch",
            tv_make=_tv("CIFAR10", train=False), reader=read_cifar_pickle,
            how_to_get="cifar-10-batches-py (torchvision downloads it)"),
    Release("svhn", "SVHN test split", 26_032, tv_marker="test_32x32.mat", tv_make=_tv("SVHN", split="test"),
            reader=read_svhn_mat, how_to_get="test_32x32.mat (torchvision downloads it)"),
    Release("mnist", "MNIST official test split", 10_000, tv_marker="MNIST/raw/t10k-images-idx3-ubyte",
            tv_make=_tv("MNIST", train=False), reader=read_idx_images,
            how_to_get="MNIST/raw (torchvision downloads it)"),
)}


def names() -> list[str]:
    """Returns the release-format test-OOD set names (SC-OOD sets are `scood_<set>`)."""
    return list(RELEASES) + [f"scood_{s}" for s in SCOOD_SETS]


def is_release_set(name: str) -> bool:
    """Returns whether `name` is read by this module (a release set or an SC-OOD list)."""
    return name in RELEASES or (name.startswith("scood_") and name.removeprefix("scood_") in SCOOD_SETS)


# ----------------------------------------------------------------------------- reading


def _members(path: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yields (posix path inside the archive, reader) for each file of a tar or zip archive."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: archive.read(info)
        return
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isfile():
                yield member.name, lambda member=member: archive.extractfile(member).read()


def _is_image(path: str) -> bool:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return (bool(parts) and not any(p.startswith(".") for p in parts)
            and parts[-1].lower().endswith(data._IMAGE_SUFFIXES))


def _image_blobs(kind: str, path: str, prefix: str) -> list[tuple[str, bytes]]:
    """Returns (relative path, bytes) of every image below `prefix` in a folder or archive, sorted."""
    out = []
    if kind == "folder":
        top = os.path.join(path, prefix) if prefix else path
        for current, subdirs, files in os.walk(top):
            subdirs.sort()
            for name in files:
                full = os.path.join(current, name)
                rel = os.path.relpath(full, top).replace(os.sep, "/")
                if _is_image(rel):
                    with open(full, "rb") as f:
                        out.append((rel, f.read()))
    else:
        want = prefix.strip("/") + "/"
        for member, read in _members(path):
            member = member.lstrip("./")
            if member.startswith(want) and _is_image(member[len(want):]):
                out.append((member[len(want):], read()))
    return sorted(out)


def _decode(blobs: list[bytes], rule: str) -> np.ndarray:
    import io
    x = np.empty((len(blobs), data.IMAGE_SIZE, data.IMAGE_SIZE, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as image:
            x[i] = fit_32(image, rule)
    return x


def _cache_file(cache_dir: str, name: str, path: str, rule: str, extra: str = "") -> str:
    stat = os.stat(path)
    key = "|".join([_CACHE_VERSION, name, os.path.abspath(path), str(stat.st_size),
                    str(stat.st_mtime_ns), RESIZE_RULES[rule], extra])
    return os.path.join(cache_dir, f"ood-{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz")


# ----------------------------------------------------------------------------- sources


def _image_sources(release: Release, data_dir: str | None, cache_dir: str) -> list[tuple[str, str, str]]:
    """Returns candidate (kind, path, prefix) sources of an image release, in the order tried."""
    out = []
    if data_dir:
        for stem in release.stems:
            out.append(("folder", os.path.join(data_dir, stem), release.inner))
        for archive in release.archives:
            for stem in release.stems:
                out.append(("archive", os.path.join(data_dir, archive), f"{stem}/{release.inner}".rstrip("/")))
    if release.tv_folder:
        for root in ([data_dir] if data_dir else []) + [data._downloads_dir(cache_dir)]:
            out.append(("folder", os.path.join(root, release.tv_folder), release.inner))
    return out


def _exists(kind: str, path: str, prefix: str) -> bool:
    if kind == "folder":
        return os.path.isdir(os.path.join(path, prefix) if prefix else path)
    if not os.path.isfile(path):
        return False
    want = prefix.strip("/") + "/"
    return any(m.lstrip("./").startswith(want) for m, _ in _members(path))


def _download(release: Release, cache_dir: str) -> str:
    root = data._downloads_dir(cache_dir)
    os.makedirs(root, exist_ok=True)
    import socket
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(data.DOWNLOAD_TIMEOUT_S)
    try:
        release.tv_make(root, True)
    finally:
        socket.setdefaulttimeout(previous)
    return root


def _release_pixels(release: Release, data_dir: str | None, cache_dir: str, download: bool,
                    rule: str) -> tuple[np.ndarray | None, str, list[str]]:
    """Returns (images or None, source used, places looked) for a release set."""
    looked: list[str] = []
    if release.tv_marker:
        roots = ([data_dir] if data_dir else []) + [data._downloads_dir(cache_dir)]
        for root in roots:
            marker = os.path.join(root, release.tv_marker)
            if os.path.exists(marker):
                def decode(marker=marker):
                    raw = release.reader(marker)
                    if raw.shape[1:3] == (data.IMAGE_SIZE, data.IMAGE_SIZE) and raw.ndim == 4:
                        return {"x": raw}
                    x = np.empty((len(raw), data.IMAGE_SIZE, data.IMAGE_SIZE, 3), dtype=np.uint8)
                    for i, image in enumerate(raw):
                        x[i] = fit_32(Image.fromarray(image), rule)
                    return {"x": x}
                return data._cached(_cache_file(cache_dir, release.name, marker, rule), decode)["x"], marker, looked
            looked.append(marker)
    else:
        for kind, path, prefix in _image_sources(release, data_dir, cache_dir):
            cache = _cache_file(cache_dir, release.name, path, rule, prefix) if os.path.exists(path) else ""
            # An archive is scanned for the prefix only when its decoded cache is not there yet.
            if cache and (os.path.isfile(cache) or _exists(kind, path, prefix)):
                def decode(kind=kind, path=path, prefix=prefix):
                    blobs = _image_blobs(kind, path, prefix)
                    if not blobs:
                        raise data.MissingDataError(f"OOD set '{release.name}': no images below "
                                                    f"{prefix or '.'} in {path}")
                    return {"x": _decode([b for _, b in blobs], rule)}
                return data._cached(cache, decode)["x"], f"{kind}:{path}", looked
            looked.append(f"{path}" + (f" ({prefix}/)" if kind == "archive" and prefix else ""))
    if release.tv_make is None:
        looked.append("no download for this set")
    elif not download:
        looked.append("download disabled")
    else:
        try:
            _download(release, cache_dir)
            return _release_pixels(release, data_dir, cache_dir, False, rule)
        except data.MissingDataError:
            raise
        except Exception as error:   # any failure only means "not available"
            looked.append(f"download failed ({data._one_line(error)})")
    return None, "", looked


def _scood_roots(data_dir: str | None) -> list[str]:
    # PASCL/RNA keep SCOOD/data/{imglist,images}; COCL drops the data/ level.
    if not data_dir:
        return []
    return [os.path.join(data_dir, "SCOOD", "data"), os.path.join(data_dir, "SCOOD")]


def read_image_list(list_file: str, images_root: str, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images, sc_label) from an SC-OOD image list: each line `<path> <dict literal>`,
    the dict holding `sc_label` (-1 = true OOD); paths are relative to `images_root`."""
    paths, labels = [], []
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            path, _, extras = line.partition(" ")
            try:
                extra = ast.literal_eval(extras.strip()) if extras.strip() else {}
                sc_label = int(extra.get("sc_label", -1)) if isinstance(extra, dict) else -1
            except (ValueError, SyntaxError, TypeError):
                raise ValueError(f"{list_file}:{number}: '{line[:80]}'; accepted: '<path> "
                                 "{\"sc_label\": <int>, ...}'") from None
            paths.append(path)
            labels.append(sc_label)
    blobs = []
    for path in paths:
        full = os.path.join(images_root, path)
        if not os.path.isfile(full):
            raise data.MissingDataError(f"{list_file} lists {path}, which is not in {images_root}")
        with open(full, "rb") as f:
            blobs.append(f.read())
    return _decode(blobs, rule), np.asarray(labels, dtype=np.int64)


def _scood_pixels(name: str, id_name: str, data_dir: str | None, cache_dir: str,
                  rule: str) -> tuple[tuple[np.ndarray, np.ndarray] | None, str, list[str]]:
    looked = []
    for root in _scood_roots(data_dir):
        list_file = os.path.join(root, "imglist", f"benchmark_{id_name}", f"test_{name}.txt")
        if os.path.isfile(list_file):
            images = os.path.join(root, "images")
            arrays = data._cached(_cache_file(cache_dir, f"scood_{name}", list_file, rule, id_name),
                                  lambda: dict(zip(("x", "y"), read_image_list(list_file, images, rule))))
            return (arrays["x"], arrays["y"]), list_file, looked
        looked.append(list_file)
    if not data_dir:
        looked.append("no --data-dir given")
    return None, "", looked


# ----------------------------------------------------------------------------- loading


def load(name: str, data_dir: str | None, cache_dir: str, download: bool, rule: str = "crop",
         max_images: int | None = None, seed: int = 0, id_name: str = "cifar10") -> data.ImageSet:
    """Returns the test-OOD set `name` under a resize rule; labels are -1, or the SC-OOD
    sc_label. With max_images, a seeded random subset in original order.

    Raises MissingDataError naming the set and every place looked when it is not found.
    """
    if not is_release_set(name):
        raise ValueError(f"unknown OOD set '{name}'; accepted: {', '.join(names())}")
    if rule not in RESIZE_RULES:
        raise ValueError(f"resize rule '{rule}'; accepted: {', '.join(RESIZE_RULES)}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images}; accepted: None or an integer >= 1")
    if name in RELEASES:
        release = RELEASES[name]
        x, _, looked = _release_pixels(release, data_dir, cache_dir, download, rule)
        y = None if x is None else np.full(len(x), -1, dtype=np.int64)
        what = f"{release.title}; get {release.how_to_get}"
    else:
        found, _, looked = _scood_pixels(name.removeprefix("scood_"), id_name, data_dir, cache_dir, rule)
        x, y = found if found is not None else (None, None)
        what = "SC-OOD benchmark list; unpack the SC-OOD release into <data-dir>/SCOOD"
    if x is None:
        raise data.MissingDataError(f"OOD set '{name}' ({what}) not found; looked in: {'; '.join(looked)}")
    keep = data.seeded_rows(len(x), max_images, seed)
    x, y = x[keep], y[keep]
    return data.ImageSet(np.ascontiguousarray(x), y, name)


# ----------------------------------------------------------------------------- real validation OOD

# A real-image validation OOD set: the last fifth of the auxiliary TinyImageNet set's classes
# (sorted wnids), held out of outlier training whenever it validates. tin_aux holds TinyImageNet
# *train* images, so it shares no image with any test set here; it shares classes only with the
# full TinyImageNet val set (`tin_val`, all 200 classes), never with `tin` (tin_ood).
VAL_HOLDOUT = "tin_aux_holdout"
HOLDOUT_FRACTION = 0.2


def _tin_aux_by_class(data_dir: str | None, cache_dir: str) -> dict[str, np.ndarray]:
    sources = data._local_sources("tin_aux", None, data_dir, cache_dir)
    source, looked = data._resolve(sources, None, False)
    if source is None:
        raise data.MissingDataError(f"validation OOD set '{VAL_HOLDOUT}' needs tin_aux, not found "
                                    f"(looked in: {'; '.join(looked)})")

    def decode() -> dict[str, np.ndarray]:
        entries = sorted((parts, blob) for parts, blob in data._entries(source) if len(parts) == 2)
        wnids = sorted({parts[0] for parts, _ in entries})
        index = {w: i for i, w in enumerate(wnids)}
        return {"x": data._decode_all([b for _, b in entries]),
                "y": np.array([index[p[0]] for p, _ in entries], dtype=np.int64), "wnids": np.array(wnids)}

    return data._cached(data._cache_path(cache_dir, "aux-tin_aux-classes", source, data.OOD_RESIZE_RULE), decode)


def tin_aux_part(part: str, data_dir: str | None, cache_dir: str, max_images: int | None = None,
                 seed: int = 0) -> tuple[data.ImageSet, list[str]]:
    """Returns (images of tin_aux's held-out classes ("holdout") or of the others ("train"),
    the wnids taken). With max_images, a seeded random subset in original order."""
    if part not in ("holdout", "train"):
        raise ValueError(f"tin_aux part '{part}'; accepted: holdout, train")
    arrays = _tin_aux_by_class(data_dir, cache_dir)
    wnids = [str(w) for w in arrays["wnids"]]
    first_held = len(wnids) - int(np.ceil(HOLDOUT_FRACTION * len(wnids)))
    held = arrays["y"] >= first_held
    keep = held if part == "holdout" else ~held
    x = arrays["x"][keep]
    x = x[data.seeded_rows(len(x), max_images, seed)]
    name = VAL_HOLDOUT if part == "holdout" else "tin_aux"
    taken = wnids[first_held:] if part == "holdout" else wnids[:first_held]
    return data.ImageSet(np.ascontiguousarray(x), np.full(len(x), -1, dtype=np.int64), name), taken
