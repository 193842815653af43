"""Meta-CALA's meta set on natural long-tailed data (ImageNet-LT, Places-LT).

cala.md §3.7.1: the meta set is balanced over classes and attributes. Each class's training
images are clustered into k = 6 groups by KMeans on the penultimate features of an
ImageNet-pretrained ResNet-50, and `per_group` images (1 on iNat / Places-LT) are drawn from
every (class, group) cell. Pitfall row 18: on natural LT data a meta image is removed from
training only when its cell keeps at least 2 training images; otherwise it stays in both.
A class with fewer than k images gets as many groups as it has images.

The released code clusters raw pixels instead; that is offered (`features="pixels"`) only when
asked for by name, on the stored square resized to 32x32 (CIFAR's size, where the code runs).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainables import data

MIN_LEFT_IN_CELL = 2   # pitfall row 18: never leave a (class, group) cell under 2 training images
PIXEL_SIDE = 32
KMEANS_INIT = 10       # sklearn KMeans n_init


@dataclass(frozen=True)
class MetaGrouping:
    """How the meta set of a large set is drawn (hashable: part of the data spec)."""
    groups: int = 6                 # k, KMeans clusters per class (spec: 6)
    per_group: int = 1              # images per (class, group) cell (spec: 1 on iNat / Places-LT)
    features: str = "resnet50"      # a torchvision ResNet whose GAP features are clustered, or "pixels"
    weights: str | None = None      # that ResNet's state-dict file, or "imagenet" (torchvision's)
    view_size: int = 224            # the evaluation view the network sees (Resize + CentreCrop)
    device: str = "cpu"             # where the features are computed (they are cached)

    def describe(self) -> str:
        """Returns the grouping features as logged with the run."""
        if self.features == "pixels":
            return (f"raw pixels (the released code's rule): stored square resized to {PIXEL_SIDE}x{PIXEL_SIDE} "
                    f"(bilinear, antialiased), flattened, in [0, 1]")
        return (f"torchvision {self.features} penultimate (GAP) features, weights {self.weights}, "
                f"eval view {self.view_size}")

    def rule(self) -> str:
        """Returns the meta set's rule as logged with the run."""
        return (f"{self.per_group} image(s) per (class, group); groups: sklearn KMeans, k = min({self.groups}, "
                f"class size), n_init={KMEANS_INIT}, random_state=split_seed, float32 features, per class of "
                f"the training list (after n_max); a cell's meta images stay in training when removing them "
                f"would leave it < {MIN_LEFT_IN_CELL} images; empty cells skipped")


def features(x_nhwc: np.ndarray, rows: np.ndarray, grouping: MetaGrouping, batch: int = 128) -> np.ndarray:
    """Returns float32 [len(rows), D]: the grouping features of the uint8 images x_nhwc[rows]
    ([N, S, S, 3]; read `batch` rows at a time, so a memory-mapped set is never read whole)."""
    from trainables import large_lt, models   # imported here: large_lt imports this module
    device = torch.device(grouping.device)
    net = None
    if grouping.features != "pixels":
        # Its classifier is fresh and unused: only the trunk's pretrained features are clustered.
        net = models.create(grouping.features, 1, pretrained=grouping.weights).to(device).eval()
        view = large_lt.View(grouping.view_size)
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            x = torch.from_numpy(np.ascontiguousarray(x_nhwc[rows[start:start + batch]]))
            x = x.to(device).permute(0, 3, 1, 2)
            if net is None:
                small = F.interpolate(x.float() / 255.0, size=(PIXEL_SIDE, PIXEL_SIDE), mode="bilinear",
                                      antialias=True, align_corners=False)
                out.append(small.flatten(1).cpu())
            else:
                out.append(net(view.eval(x))[1][0].float().cpu())   # feats [1, B, D] -> [B, D]
    return torch.cat(out).numpy() if out else np.zeros((0, 1), dtype=np.float32)


def _cached(path: str, build) -> np.ndarray:
    """Returns the array at `path`, or `build()` written there atomically first."""
    if os.path.isfile(path):
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass   # an unreadable cache is rebuilt below
    found = build()
    with data.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, found)
    return found


def cached_groups(x_nhwc: np.ndarray, rows: np.ndarray, y_rows: np.ndarray, grouping: MetaGrouping,
                  seed: int, cache_dir: str, key: str) -> np.ndarray:
    """Returns `kmeans_groups` of `features(x_nhwc, rows, grouping)` for labels y_rows, both read
    from `cache_dir` when this `key` (naming the images), these rows and this grouping were
    computed before (the features for any k and seed); written atomically otherwise."""
    weights = grouping.weights
    if weights and os.path.isfile(weights):
        stat = os.stat(weights)
        weights = f"{os.path.abspath(weights)}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha1("|".join([key, grouping.features, str(weights), str(grouping.view_size),
                                    hashlib.sha1(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()]).encode()
                           ).hexdigest()[:12]
    feats_path = os.path.join(cache_dir, f"meta-features-{digest}.npy")
    groups_path = os.path.join(cache_dir, f"meta-groups-{digest}-k{grouping.groups}-s{seed}.npy")
    return _cached(groups_path, lambda: kmeans_groups(
        _cached(feats_path, lambda: features(x_nhwc, rows, grouping)), y_rows, grouping.groups, seed))


def kmeans_groups(feats: np.ndarray, y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Returns int64 [N]: each row's group within its class, KMeans with min(k, class size)
    clusters on that class's rows (group 0 for a class of one image)."""
    from sklearn.cluster import KMeans
    groups = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        clusters = min(k, len(rows))
        if clusters > 1:
            groups[rows] = KMeans(clusters, n_init=KMEANS_INIT, random_state=seed).fit_predict(
                np.asarray(feats[rows], dtype=np.float32))
    return groups


def draw(y: np.ndarray, groups: np.ndarray, per_group: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (meta rows, training rows, meta rows also kept in training), sorted positions into y.

    Each non-empty (class, group) cell gives min(per_group, its size) seeded random rows to the
    meta set; they leave training only if the cell keeps >= MIN_LEFT_IN_CELL images."""
    rng = np.random.RandomState(seed)
    meta, removed, kept = [], [], 0
    for c in np.unique(y):
        for g in np.unique(groups[y == c]):
            cell = np.flatnonzero((y == c) & (groups == g))
            pick = rng.permutation(cell)[:per_group]
            meta.append(pick)
            if len(cell) - len(pick) >= MIN_LEFT_IN_CELL:
                removed.append(pick)
            else:
                kept += len(pick)
    meta_rows = np.sort(np.concatenate(meta)) if meta else np.zeros(0, dtype=np.int64)
    gone = np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(y)), gone)
    return meta_rows.astype(np.int64), train_rows.astype(np.int64), kept
