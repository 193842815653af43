"""Tests for trainables.data on the real offline archives (skipped when they are absent)."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainables import data
from trainables.data import (
    DatasetSpec,
    MissingDataError,
    check_ood_names,
    load_id_data,
    load_ood,
    lt_counts,
    ood_set_names,
    synthetic_names,
    synthetic_ood,
)


DATA_DIR = os.environ.get("TAILTUNE_DATA_DIR")
needs_data = pytest.mark.skipif(
    DATA_DIR is None or not os.path.isfile(os.path.join(DATA_DIR, "cifar10.tar.gz")),
    reason="real data not found: set TAILTUNE_DATA_DIR to a folder with cifar10.tar.gz",
)

# From MANIFEST.json of the offline data.
OFFLINE_OOD_SIZES = {"cifar100": 10000, "tin": 4800, "textures": 1200, "mnist": 10000,
                     "fashion_mnist": 10000}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="module")
def default_data(cache_dir):
    """The default spec; the first load in this module, so it pays for decoding CIFAR-10."""
    start = time.perf_counter()
    loaded = load_id_data(DatasetSpec(), DATA_DIR, cache_dir, download=False)
    print(f"\nCIFAR-10 first decode + split: {time.perf_counter() - start:.1f} s")
    return loaded


def _load(cache_dir: str, **spec) -> data.LongTailData:
    return load_id_data(DatasetSpec(**spec), DATA_DIR, cache_dir, download=False)


# ----------------------------------------------------------------------------- lt_counts


def test_lt_counts_hand_values_and_totals():
    assert lt_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    totals = {(10, 5000, ir): t for ir, t in [(10, 20431), (50, 13996), (100, 12406)]}
    totals.update({(100, 500, ir): t for ir, t in [(10, 19573), (50, 12608), (100, 10847)]})
    for (classes, n_max, ir), total in totals.items():
        counts = lt_counts(classes, n_max, ir)
        assert len(counts) == classes and counts[0] == n_max
        assert sum(counts) == total, (classes, n_max, ir)
    assert lt_counts(10, 5000, 1) == [5000] * 10


@pytest.mark.parametrize("args", [(0, 10, 10), (10, 0, 10), (10, 100, 0.5)])
def test_lt_counts_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="accepted"):
        lt_counts(*args)


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"name": "imagenet"}, "imagenet"), ({"imbalance_ratio": 0.5}, "0.5"),
     ({"val_per_class": -1}, "-1"), ({"test_per_class": 0}, "test_per_class=0")],
)
def test_spec_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        DatasetSpec(**kwargs)


# ----------------------------------------------------------------------------- ID data


@needs_data
def test_ir100_without_validation_gives_12406(default_data, cache_dir):
    loaded = _load(cache_dir, imbalance_ratio=100, val_per_class=0)
    assert loaded.counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(loaded.train) == 12406 and loaded.record["train_size"] == "12406"
    assert np.bincount(loaded.train.y, minlength=10).tolist() == loaded.counts
    assert len(loaded.val) == 0 and loaded.record["n_max"] == "5000"
    assert loaded.train.x.shape == (12406, 32, 32, 3) and loaded.train.x.dtype == np.uint8
    assert loaded.train.y.dtype == np.int64


@needs_data
def test_default_spec_holds_out_balanced_validation(default_data):
    loaded = default_data
    assert loaded.num_classes == 10
    assert loaded.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                  "frog", "horse", "ship", "truck"]
    assert loaded.record["n_max"] == "4950" and loaded.counts[0] == 4950
    assert loaded.counts == lt_counts(10, 4950, 100)
    assert np.bincount(loaded.val.y, minlength=10).tolist() == [50] * 10
    assert np.bincount(loaded.train.y, minlength=10).tolist() == loaded.counts
    assert not set(loaded.train_index) & set(loaded.val_index)
    assert len(loaded.test) == 10000 and np.bincount(loaded.test.y).tolist() == [1000] * 10
    # Pixels too: the 50,000 decoded training images are pairwise distinct, so a validation
    # image whose bytes also occur in training would mean a leak.
    train_hashes = {hash(img.tobytes()) for img in loaded.train.x}
    assert not any(hash(img.tobytes()) in train_hashes for img in loaded.val.x)


@needs_data
def test_record_is_flat_strings_with_required_keys(default_data):
    required = {"dataset", "imbalance_ratio", "n_max", "val_per_class", "test_per_class",
                "split_seed", "lt_rule", "counts", "train_size", "val_size", "test_size",
                "id_source", "class_order"}
    record = default_data.record
    assert required <= set(record)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in record.items())
    assert record["test_per_class"] == "all" and record["val_size"] == "500"
    assert record["counts"] == ",".join(map(str, default_data.counts))
    assert record["id_source"].endswith("cifar10.tar.gz")


@needs_data
def test_validation_is_the_same_for_every_imbalance_ratio(default_data, cache_dir):
    ir10 = _load(cache_dir, imbalance_ratio=10)
    assert np.array_equal(ir10.val_index, default_data.val_index)
    assert len(ir10.train) == sum(lt_counts(10, 4950, 10))


@needs_data
def test_splits_are_deterministic_per_seed(default_data, cache_dir):
    again = _load(cache_dir)
    assert np.array_equal(again.train_index, default_data.train_index)
    assert np.array_equal(again.train.x, default_data.train.x)
    assert np.array_equal(again.val.x, default_data.val.x)
    other = _load(cache_dir, seed=1)
    assert not np.array_equal(other.train_index, default_data.train_index)
    assert not np.array_equal(other.val_index, default_data.val_index)
    assert other.counts == default_data.counts


@needs_data
def test_test_subset_is_balanced_and_seeded(default_data, cache_dir):
    small = _load(cache_dir, test_per_class=20)
    assert len(small.test) == 200 and np.bincount(small.test.y).tolist() == [20] * 10
    assert small.record["test_per_class"] == "20" and small.record["test_size"] == "200"
    assert np.array_equal(small.test.x, default_data.test.x[small.test_index])
    assert np.array_equal(_load(cache_dir, test_per_class=20).test_index, small.test_index)
    with pytest.raises(ValueError, match="test_per_class=1001"):
        _load(cache_dir, test_per_class=1001)


@needs_data
def test_n_max_larger_than_available_is_rejected(default_data, cache_dir):
    with pytest.raises(ValueError, match="4951"):
        _load(cache_dir, n_max=4951)


@needs_data
def test_cache_is_reused_without_decoding(default_data, cache_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(data, "_decode_image", fail)
    monkeypatch.setattr(data, "_archive_entries", fail)
    start = time.perf_counter()
    reloaded = _load(cache_dir)
    print(f"\nCIFAR-10 reload from cache + split: {time.perf_counter() - start:.2f} s")
    assert np.array_equal(reloaded.train.x, default_data.train.x)
    assert len(glob.glob(os.path.join(cache_dir, "cifar10-*.npz"))) == 1


def test_missing_id_data_names_every_place_looked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = str(tmp_path / "cache")
    with pytest.raises(MissingDataError) as caught:
        load_id_data(DatasetSpec(), str(empty), cache, download=False)
    message = str(caught.value)
    assert "\n" not in message
    for place in [empty / "cifar10.tar.gz", empty / "cifar10", empty / "cifar-10-batches-py",
                  Path(cache) / "downloads" / "cifar-10-batches-py"]:
        assert str(place) in message
    assert "download disabled" in message and "--data-dir" in message


def _write_tiny_imagefolder(root: Path, classes: list[str], per_split: dict[str, int]) -> None:
    rng = np.random.RandomState(0)
    for split, n in per_split.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.randint(0, 256, size=(32, 32, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i:04d}.png")


def test_extracted_folder_source_with_small_spec(tmp_path):
    _write_tiny_imagefolder(tmp_path / "data" / "cifar10", ["b_cls", "a_cls", "c_cls"],
                            {"train": 6, "test": 2})
    spec = DatasetSpec(imbalance_ratio=5, val_per_class=1)
    loaded = load_id_data(spec, str(tmp_path / "data"), str(tmp_path / "cache"), download=False)
    assert loaded.class_names == ["a_cls", "b_cls", "c_cls"]
    assert loaded.counts == [5, 2, 1] and len(loaded.train) == 8 and len(loaded.val) == 3
    assert loaded.record["id_source"] == f"folder:{tmp_path / 'data' / 'cifar10'}"
    assert len(loaded.test) == 6


def test_torchvision_layout_is_tried_after_archive_and_folder(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-batches-py").mkdir()
    fake = {"x_train": np.zeros((20, 32, 32, 3), np.uint8), "y_train": np.repeat(np.arange(2), 10),
            "x_test": np.zeros((4, 32, 32, 3), np.uint8), "y_test": np.array([0, 0, 1, 1]),
            "class_names": np.array(["a", "b"])}
    monkeypatch.setattr(data, "_decode_id_torchvision", lambda name, root: fake)
    loaded = load_id_data(DatasetSpec(imbalance_ratio=2, val_per_class=2), str(tmp_path),
                          str(tmp_path / "cache"), download=False)
    assert loaded.record["id_source"] == f"torchvision:{tmp_path / 'cifar-10-batches-py'}"
    assert loaded.counts == [8, 4]


# ----------------------------------------------------------------------------- OOD data


@needs_data
@pytest.mark.parametrize("name", sorted(OFFLINE_OOD_SIZES))
def test_offline_ood_set_loads(name, cache_dir):
    images = load_ood(name, DATA_DIR, cache_dir, download=False)
    assert images is not None and images.name == name
    assert images.x.shape == (OFFLINE_OOD_SIZES[name], 32, 32, 3) and images.x.dtype == np.uint8
    assert images.y.dtype == np.int64 and (images.y == -1).all()
    if name in ("mnist", "fashion_mnist"):
        assert np.array_equal(images.x[..., 0], images.x[..., 1])
        assert np.array_equal(images.x[..., 1], images.x[..., 2])


@needs_data
def test_ood_max_images_is_a_seeded_subset(cache_dir):
    full = load_ood("mnist", DATA_DIR, cache_dir, download=False)
    part = load_ood("mnist", DATA_DIR, cache_dir, download=False, max_images=100, seed=3)
    assert len(part) == 100
    again = load_ood("mnist", DATA_DIR, cache_dir, download=False, max_images=100, seed=3)
    assert np.array_equal(part.x, again.x)
    full_hashes = {img.tobytes() for img in full.x}
    assert all(img.tobytes() in full_hashes for img in part.x)
    with pytest.raises(ValueError, match="max_images=0"):
        load_ood("mnist", DATA_DIR, cache_dir, download=False, max_images=0)


@needs_data
def test_cifar10_as_ood_is_its_test_split(default_data, cache_dir):
    images = load_ood("cifar10", DATA_DIR, cache_dir, download=False)
    assert np.array_equal(images.x, default_data.test.x) and (images.y == -1).all()


def test_missing_ood_set_returns_none_with_one_notice(tmp_path, capsys):
    assert load_ood("svhn", str(tmp_path), str(tmp_path / "cache"), download=False) is None
    assert load_ood("tin", str(tmp_path), str(tmp_path / "cache"), download=False) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("notice: OOD set 'svhn' not found (looked in: ")
    assert lines[1].startswith("notice: OOD set 'tin' not found (looked in: ")
    assert str(tmp_path / "tin_ood.tar.gz") in lines[1]
    assert all(line.endswith("; skipped") for line in lines)


def test_unknown_ood_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'imagenet-o'.*accepted: .*cifar100"):
        load_ood("imagenet-o", None, str(tmp_path), download=False)


def test_check_ood_names():
    check_ood_names(["cifar100", "tin", "svhn", "gaussian"], "cifar10")
    check_ood_names(["cifar10"], "cifar100")
    with pytest.raises(ValueError, match="'lsun'"):
        check_ood_names(["tin", "lsun"], "cifar10")
    with pytest.raises(ValueError, match="'cifar10' is the in-distribution set"):
        check_ood_names(["cifar10"], "cifar10")
    assert {"cifar100", "tin", "textures", "mnist", "fashion_mnist", "svhn", "places365",
            "cifar10"} == set(ood_set_names())


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", synthetic_names())
def test_synthetic_sets_are_seeded_uint8(name):
    images = synthetic_ood(name, 64, seed=5)
    assert images.x.shape == (64, 32, 32, 3) and images.x.dtype == np.uint8
    assert images.name == name and (images.y == -1).all()
    assert np.array_equal(images.x, synthetic_ood(name, 64, seed=5).x)
    assert not np.array_equal(images.x, synthetic_ood(name, 64, seed=6).x)
    if name == "rademacher":
        assert set(np.unique(images.x).tolist()) == {0, 255}
    if name == "blobs":
        values = np.unique(images.x)
        assert values[0] == 0 and (values[1:] >= 191).all()


def test_synthetic_names_and_unknown_name():
    assert synthetic_names() == ["gaussian", "uniform", "blobs", "rademacher"]
    with pytest.raises(ValueError, match="'pink'"):
        synthetic_ood("pink", 4, 0)


# ----------------------------------------------------------------------------- meta set, outliers


def test_meta_holdout_is_balanced_disjoint_and_keeps_validation():
    y = np.repeat(np.arange(4), 40)
    counts = lt_counts(4, 20, 10)
    train0, val0, meta0 = data._holdout_and_subsample(y, counts, 5, seed=7)
    train, val, meta = data._holdout_and_subsample(y, counts, 5, seed=7, meta_per_class=6)
    assert len(meta0) == 0 and np.array_equal(val, val0)       # validation does not move
    assert np.bincount(y[meta], minlength=4).tolist() == [6, 6, 6, 6]
    assert np.bincount(y[train], minlength=4).tolist() == counts
    assert not (set(meta) & set(val)) and not (set(meta) & set(train)) and not (set(val) & set(train))


@needs_data
def test_meta_set_in_the_data_record(cache_dir):
    loaded = _load(cache_dir, n_max=100, val_per_class=5, meta_per_class=3, test_per_class=2)
    assert loaded.meta is not None and len(loaded.meta) == 30
    assert loaded.record["meta_per_class"] == "3"
    assert np.bincount(loaded.meta.y, minlength=10).tolist() == [3] * 10
    assert _load(cache_dir, n_max=100, val_per_class=5, test_per_class=2).meta is None


def test_check_outlier_set_rejects_sets_judged_on():
    assert data.check_outlier_set("tin_aux", ["cifar100", "mnist"], ["blobs"]) == ""
    assert "share no class" in data.check_outlier_set("tin_aux", ["tin"], ["blobs"])
    with pytest.raises(ValueError, match="outlier set 'gaussian' is also a validation OOD set"):
        data.check_outlier_set("gaussian", ["tin"], ["gaussian", "blobs"])
    with pytest.raises(ValueError, match="outlier set 'textures' is also a test OOD set"):
        data.check_outlier_set("textures", ["textures", "tin"], ["blobs"])
    with pytest.raises(ValueError, match="unknown outlier set 'imagenet'; accepted: auto, 300k"):
        data.check_outlier_set("imagenet", [], [])


def test_user_300k_file_is_preferred_and_subsampled(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (40, 32, 32, 3)).astype(np.uint8)
    np.save(tmp_path / data.OUTLIER_FILE, images)
    got = data.load_outliers("auto", str(tmp_path), str(tmp_path / "cache"), max_images=10, seed=1)
    assert got.name == "300k" and len(got) == 10 and (got.y == -1).all()
    rows = {img.tobytes() for img in images}
    assert all(img.tobytes() in rows for img in got.x)
    again = data.load_outliers("300k", str(tmp_path), str(tmp_path / "cache"), max_images=10, seed=1)
    assert np.array_equal(got.x, again.x)


def test_auto_outliers_fall_back_to_gaussian_noise(tmp_path):
    got = data.load_outliers("auto", str(tmp_path), str(tmp_path / "cache"), max_images=25)
    assert got.name == "gaussian" and got.x.shape == (25, 32, 32, 3)
    with pytest.raises(data.MissingDataError, match="tin_aux"):
        data.load_outliers("tin_aux", str(tmp_path), str(tmp_path / "cache"))


@needs_data
def test_offline_tin_aux_is_the_auto_outlier_set(cache_dir):
    got = data.load_outliers("auto", DATA_DIR, cache_dir, max_images=300, seed=0)
    assert got.name == "tin_aux" and got.x.shape == (300, 32, 32, 3)
    full = data.load_outliers("tin_aux", DATA_DIR, cache_dir)
    assert len(full) == 24900
