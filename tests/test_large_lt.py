"""ImageNet-LT / Places-LT: split lists, the decode-once cache, device views, streaming and its
prefetch, the torchvision backbones, the large benchmarks' OOD and training-outlier release
formats, and a search end to end, all on tiny ImageFolder trees generated here (64x64 and 80x64
JPEGs, a few classes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import REPO
from trainables import data, engine, large_lt, models, protocols, registry

TRAIN_COUNTS = [8, 5, 3, 2]          # long-tailed, class 0 the head
VAL_PER_CLASS, TEST_PER_CLASS = 2, 3
SIDE, VIEW = 40, 32                  # stored side and view size: small, so a CPU trains in seconds


def _jpeg(path: str, rng: np.random.RandomState, size=(64, 64), tint=0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = rng.randint(0, 256, size=(size[1], size[0], 3)).astype(np.uint8)
    pixels[..., tint % 3] = 255 - 40 * tint   # a class-dependent colour cast
    Image.fromarray(pixels).save(path, quality=90)


def make_lt_tree(data_dir: str, folder: str = "ImageNet_LT", prefix: str = "ImageNet_LT") -> str:
    """Writes `<data_dir>/<folder>/` with {train,val,test}/<wnid>/*.JPEG and the three split
    lists (`<path> <label>`); every third training image is 80x64, so the stored square is a
    centre crop. Returns the folder."""
    root = os.path.join(data_dir, folder)
    rng = np.random.RandomState(0)
    per_split = {"train": TRAIN_COUNTS, "val": [VAL_PER_CLASS] * 4, "test": [TEST_PER_CLASS] * 4}
    for split, counts in per_split.items():
        lines = []
        for label, n in enumerate(counts):
            for i in range(n):
                rel = f"{split}/n0{label}000/{split}_{label}_{i}.JPEG"
                _jpeg(os.path.join(root, rel), rng, (80, 64) if i % 3 == 2 else (64, 64), label)
                lines.append(f"{rel} {label}")
        with open(os.path.join(root, f"{prefix}_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def make_ood_releases(data_dir: str) -> None:
    """Writes tiny copies of the release formats: ImageNet-1k-OOD's ImageFolder tree, an OpenOOD
    v1.5 ImageNet image list, and OLTR's Places-LT open-set list."""
    rng = np.random.RandomState(1)
    for wnid in ("n10000001", "n10000002"):
        for i in range(3):
            _jpeg(os.path.join(data_dir, "imagenet10k_ood_test", wnid, f"{wnid}_{i}.JPEG"), rng)
    lines = []
    for i in range(4):
        rel = f"ninco/ninco_{i}.jpg"
        _jpeg(os.path.join(data_dir, "images_largescale", rel), rng, (70, 64))
        lines.append(f"{rel} -1")
    os.makedirs(os.path.join(data_dir, "benchmark_imglist", "imagenet"))
    with open(os.path.join(data_dir, "benchmark_imglist", "imagenet", "test_ninco.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.makedirs(os.path.join(data_dir, "Places_LT"), exist_ok=True)
    for i in range(3):
        _jpeg(os.path.join(data_dir, "Places_LT", "open", f"{i}.jpg"), rng)
    with open(os.path.join(data_dir, "Places_LT", "Places_LT_open.txt"), "w") as f:
        f.write("".join(f"/open/{i}.jpg -1\n" for i in range(3)))


EXTRA_WNIDS = ("n20000001", "n20000002")     # the tiny ImageNet-Extra's classes, 3 images each
INAT_FILES = ("train_val2018/Plantae/7477/3b60c9.jpg", "train_val2018/Aves/2101/0a1b2c.jpg",
              "train_val2018/Plantae/5300/ff00ee.jpg")   # val2018.json's order, not sorted


def make_outlier_releases(data_dir: str) -> None:
    """Writes tiny copies of the training-outlier releases (ImageNet-Extra's and Places-Extra69's
    ImageFolder trees) and of iNaturalist 2018 val (val2018.json + train_val2018/)."""
    rng = np.random.RandomState(2)
    for wnid in EXTRA_WNIDS:
        for i in range(3):
            _jpeg(os.path.join(data_dir, "imagenet_extra", wnid, f"{wnid}_{i}.JPEG"), rng, (72, 64))
    for cls in ("arena-rodeo", "bazaar-indoor"):
        for i in range(2):
            _jpeg(os.path.join(data_dir, "places_extra69", cls, f"{i:08d}.jpg"), rng)
    for rel in INAT_FILES:
        _jpeg(os.path.join(data_dir, "inaturalist2018", rel), rng, (64, 80))
    doc = {"info": {"year": 2018}, "images": [{"id": i, "file_name": rel, "width": 64, "height": 80}
                                              for i, rel in enumerate(INAT_FILES)],
           "annotations": [{"id": i, "image_id": i, "category_id": i} for i in range(3)],
           "categories": [{"id": i, "name": str(i)} for i in range(3)]}
    with open(os.path.join(data_dir, "inaturalist2018", "val2018.json"), "w") as f:
        json.dump(doc, f)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("large"))
    make_lt_tree(data_dir)
    make_ood_releases(data_dir)
    make_outlier_releases(data_dir)
    return data_dir


def spec(**kw) -> data.DatasetSpec:
    return data.DatasetSpec(name="imagenet-lt", store_side=SIDE, val_per_class=0, **kw)


# ----------------------------------------------------------------------------- lists and cache


def test_build_rule_counts_and_record(tree, tmp_path):
    ident = data.load_id_data(spec(), tree, str(tmp_path), download=False)
    assert ident.counts == TRAIN_COUNTS
    assert (len(ident.train), len(ident.val), len(ident.test)) == (18, 8, 12)
    assert ident.train.x.shape == (18, SIDE, SIDE, 3) and ident.train.x.dtype == np.uint8
    assert ident.class_names == ["n00000", "n01000", "n02000", "n03000"]
    assert np.array_equal(np.bincount(ident.test.y), [TEST_PER_CLASS] * 4)
    # Row 2 is an 80x64 image: shorter side 64 -> 40 gives 50x40, the centre 40 columns kept.
    with Image.open(os.path.join(tree, "ImageNet_LT", "train/n00000/train_0_2.JPEG")) as im:
        assert im.size == (80, 64)
        by_hand = np.asarray(im.convert("RGB").resize((50, 40), Image.Resampling.BILINEAR))[:, 5:45]
    assert np.array_equal(ident.train.x[2], by_hand)
    assert ident.record["data_rule"] == large_lt.store_rule(SIDE)
    assert ident.record["counts"] == "8,5,3,2" and ident.record["imbalance_ratio"] == "fixed by the split list"
    capped = data.load_id_data(spec(n_max=3, test_per_class=1), tree, str(tmp_path), download=False)
    assert capped.counts == [3, 3, 3, 2] and len(capped.test) == 4


def test_cache_is_reused_and_follows_the_list(tree, tmp_path, monkeypatch):
    data.load_id_data(spec(), tree, str(tmp_path), download=False)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3    # one array per split list

    def no_decoding(*_):
        raise AssertionError("decoded again although the cache holds the list")
    monkeypatch.setattr(large_lt, "decode_image", no_decoding)
    again = data.load_id_data(spec(), tree, str(tmp_path), download=False)
    assert again.counts == TRAIN_COUNTS and sorted(os.listdir(tmp_path)) == files
    # A changed list (here: a new mtime) is a new cache key, so it is decoded again.
    listed = os.path.join(tree, "ImageNet_LT", "ImageNet_LT_val.txt")
    os.utime(listed, ns=(os.stat(listed).st_atime_ns, os.stat(listed).st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_id_data(spec(), tree, str(tmp_path), download=False)


def test_missing_list_and_bad_line_are_one_line_errors(tree, tmp_path):
    with pytest.raises(data.MissingDataError) as e:
        data.load_id_data(data.DatasetSpec(name="places-lt", store_side=SIDE), tree, str(tmp_path), False)
    assert "Places_LT_train.txt not found" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.txt"
    bad.write_text("train/a.JPEG 0\ntrain/b.JPEG zero\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: 'train/b.JPEG zero'; accepted: '<relative path> <integer label>'"):
        large_lt.read_split_list(str(bad))


# ----------------------------------------------------------------------------- device views


def test_random_resized_crop_flip_shapes_range_determinism():
    x = torch.randint(0, 256, (6, 3, SIDE, SIDE), dtype=torch.uint8)
    a = large_lt.random_resized_crop_flip(x, torch.Generator().manual_seed(0), VIEW)
    b = large_lt.random_resized_crop_flip(x, torch.Generator().manual_seed(0), VIEW)
    c = large_lt.random_resized_crop_flip(x, torch.Generator().manual_seed(1), VIEW)
    assert a.shape == (6, 3, VIEW, VIEW) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # scale = ratio = 1 leaves one box, the whole image: each row is the plain resize or its mirror.
    whole = large_lt.random_resized_crop_flip(x, torch.Generator().manual_seed(0), VIEW, (1.0, 1.0), (1.0, 1.0))
    plain = F.interpolate(x.float() / 255, size=(VIEW, VIEW), mode="bilinear", align_corners=False)
    for row, want in zip(whole, plain):
        assert min((row - want).abs().max(), (row - want.flip(-1)).abs().max()) < 1e-5
    flipped = [bool((row - want).abs().max() > 1e-5) for row, want in zip(whole, plain)]
    assert any(flipped) and not all(flipped)


@pytest.mark.parametrize("shape", [(40, 40), (48, 64)])
def test_eval_view_matches_torchvision(shape):
    from torchvision.transforms.v2 import functional as TF
    x = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8)
    ours = large_lt.resize_center_crop(x, 36, VIEW)
    theirs = TF.center_crop(TF.resize(x.float() / 255, [36], antialias=True), [VIEW])
    assert ours.shape == theirs.shape == (2, 3, VIEW, VIEW)
    assert (ours - theirs).abs().max() < 1e-5
    assert large_lt.eval_resize(224) == 256


# ----------------------------------------------------------------------------- placement


def test_streamed_images_equal_resident():
    x = np.random.RandomState(0).randint(0, 256, (10, 8, 8, 3)).astype(np.uint8)
    placement = large_lt.Placement(torch.device("cpu"), budget_gb=x.nbytes / 2**30)
    resident = placement.place(data.ImageSet(x, np.zeros(10), "a"))
    streamed = placement.place(data.ImageSet(x, np.zeros(10), "b"))   # over the budget now
    assert isinstance(streamed, large_lt.StreamedImages) and placement.streamed == ["b"]
    streamed.chunk = 3                                                  # several chunks per batch
    idx = torch.tensor([9, 0, 4, 4, 7])
    assert torch.equal(streamed[idx], resident[idx])
    assert torch.equal(streamed[2:9], resident[2:9]) and len(streamed) == 10
    assert streamed.shape == resident.shape


def test_training_with_streamed_sets_equals_resident(tree, tmp_path):
    """One epoch with every set streamed from host memory gives the same numbers as resident."""
    method = registry.get("ce")
    base = dict(dataset="imagenet-lt", image_store_side=SIDE, image_size=VIEW, backbone="resnet18",
                data_dir=tree, cache_dir=str(tmp_path), download=False, val_per_class=1, epochs=1,
                batch_size=8, eval_batch_size=8, val_ood=("gaussian",), val_ood_size=8, warmup_epochs=0,
                lr=0.001)   # 3 steps from scratch at the default 0.1 overflow the BN running stats
    results = []
    for budget in (None, 0.0):
        cfg = method.config_cls.from_dict({**base, "device_image_budget_gb": budget})
        out = engine.fit(method, cfg, engine.LocalReporter(str(tmp_path / f"run-{budget}")))
        results.append(out)
    assert results[0]["resolved.streamed_sets"] == "none"
    assert results[1]["resolved.streamed_sets"].startswith("imagenet-lt-train,imagenet-lt-val,imagenet-lt-test")
    for key in ("train_loss", "val_acc", "val_auroc", "test_acc", "test_auroc"):
        assert results[0][key] == pytest.approx(results[1][key], abs=1e-6), key


# ----------------------------------------------------------------------------- backbones


def test_pretrained_state_dict_is_loaded(tmp_path):
    import torchvision
    source = torchvision.models.resnet18(weights=None)
    path = str(tmp_path / "r18.pt")
    torch.save(source.state_dict(), path)
    model = models.create("resnet18", 5, pretrained=path)
    assert torch.equal(model.trunk.conv1.weight, source.conv1.weight)
    assert torch.equal(model.trunk.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    logits, feats = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (1, 2, 5) and feats.shape == (1, 2, 512)
    with pytest.raises(ValueError, match=r"pretrained='.*nope.pt': no such file; accepted"):
        models.create("resnet18", 5, pretrained=str(tmp_path / "nope.pt"))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(ValueError, match="does not fit torchvision resnet18"):
        models.create("resnet18", 5, pretrained=str(tmp_path / "r50.pt"))


def test_lgla_resnet50_experts_share_only_the_trunk():
    model = models.create("lgla_resnet50", 7, num_experts=3, arch="resnet18")
    logits, feats = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (3, 2, 7) and feats.shape == (3, 2, 512)
    logits[0].sum().backward()
    assert model.shared[0].weight.grad.abs().sum() > 0
    assert model.experts[0][0][0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.experts[1].parameters())


# ----------------------------------------------------------------------------- OOD release formats


def test_ood_release_formats(tree, tmp_path):
    ood = large_lt.load_ood("imagenet_1k_ood", tree, str(tmp_path), SIDE)
    assert ood.x.shape == (6, SIDE, SIDE, 3) and (ood.y == -1).all()
    ninco = large_lt.load_ood("openood_ninco", tree, str(tmp_path), SIDE, max_images=3)
    assert len(ninco) == 3
    assert len(large_lt.load_ood("places_lt_open", tree, str(tmp_path), SIDE)) == 3
    with pytest.raises(data.MissingDataError, match=r"OOD set 'openood_textures' .* not found; looked in: .*test_textures.txt"):
        large_lt.load_ood("openood_textures", tree, str(tmp_path), SIDE)
    assert protocols.get("rna").sets_for("imagenet-lt") == ("imagenet_1k_ood",)
    assert protocols.get("openood-v1.5").groups_for("imagenet-lt")[0] == (
        "near", ("openood_ssb_hard", "openood_ninco"))
    with pytest.raises(ValueError, match="protocol 'rna' has no OOD sets for dataset places-lt"):
        protocols.get("rna").sets_for("places-lt")


@pytest.mark.parametrize("method", ["darl", "ricasso", "oe", "rna", "pascl", "cocl"])
def test_large_scale_methods_train_an_epoch(tree, tmp_path, method):
    """LGLA's ResNet experts (darl, ricasso: 512-d features here), outliers (oe) and the LT-OOD
    methods' ImageNet networks (rna, pascl, cocl; eat at the end of this file) on the large views."""
    cls = registry.get(method)
    # 16-px views and MSP (no ODIN input gradients): a CPU shared with other jobs stays quick.
    cfg = cls.config_cls.from_dict(dict(
        dataset="imagenet-lt", image_store_side=SIDE, image_size=16, ood_score="msp", backbone="resnet18", data_dir=tree,
        cache_dir=str(tmp_path), download=False, val_per_class=1, epochs=1, batch_size=6, eval_batch_size=8,
        val_ood=("rademacher",), val_ood_size=8, warmup_epochs=0, lr=0.001, outlier_set="gaussian",
        outlier_max_images=12))
    out = engine.fit(cls, cfg, engine.LocalReporter(str(tmp_path / "run")))
    assert np.isfinite(out["train_loss"]) and 0 <= out["test_acc"] <= 1 and 0 <= out["test_auroc"] <= 1


def test_method_without_large_setup_is_refused(monkeypatch):
    cifar_only = registry.get("ce")
    monkeypatch.setattr(cifar_only, "large_scale", False)   # as a method whose network is CIFAR's
    cfg = cifar_only.config_cls.from_dict({"dataset": "imagenet-lt"})
    with pytest.raises(ValueError, match="method ce has no large-scale setup"):
        cifar_only(cfg, [3, 2], "cpu")
    from search import run
    with pytest.raises(run.UsageError, match="--dataset places-lt: method ce has no large-scale setup"):
        run.build_plan(run.parse_args(["ce", "--dataset", "places-lt"]))
    monkeypatch.undo()
    with pytest.raises(run.UsageError, match="protocol 'rna' has no OOD sets for dataset places-lt; accepted "
                                             "for places-lt: open_sampling, cala, oltr, offline"):
        run.build_plan(run.parse_args(["ce", "--dataset", "places-lt", "--protocol", "rna"]))


# ----------------------------------------------------------------------------- iNaturalist 2018 val


def test_inaturalist2018_val_release_and_ricasso_protocol(tree, tmp_path):
    inat = large_lt.load_ood("inaturalist2018", tree, str(tmp_path), SIDE)
    assert inat.x.shape == (3, SIDE, SIDE, 3) and (inat.y == -1).all()
    # Rows follow the annotation file's order; file_name is relative to the extraction root.
    assert np.array_equal(inat.x[1], large_lt.decode_image(os.path.join(tree, "inaturalist2018", INAT_FILES[1]), SIDE))
    ricasso = protocols.get("ricasso")
    found, missing = protocols.load_sets(ricasso, "imagenet-lt", tree, str(tmp_path), False, 0, False, store_side=SIDE)
    assert [s.name for s in found] == ["inaturalist2018"] and missing == []
    assert protocols.get("darl").sets_for("imagenet-lt") == ("imagenet_1k_ood",)
    bad = tmp_path / "val2018.json"
    bad.write_text(json.dumps({"images": [{"id": 0}]}))
    with pytest.raises(ValueError, match=r"val2018.json: no 'images' list of .*; accepted: a COCO-style"):
        large_lt.read_coco_images(str(bad))
    with pytest.raises(data.MissingDataError, match=r"OOD set 'inaturalist2018' .* not found; looked in: .*"
                                                    r"val2018.json; get the iNaturalist 2018"):
        large_lt.load_ood("inaturalist2018", str(tmp_path), str(tmp_path), SIDE)


# ----------------------------------------------------------------------------- training outliers


def test_outlier_releases_decode_once_into_a_memmap(tree, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    extra, record = large_lt.load_outliers("imagenet_extra", "imagenet-lt", tree, cache, SIDE)
    assert extra.name == "imagenet_extra" and extra.x.shape == (6, SIDE, SIDE, 3) and (extra.y == -1).all()
    assert isinstance(extra.x, np.memmap) and large_lt.is_memory_mapped(extra.x)
    (cached,) = [f for f in os.listdir(cache) if f.startswith(f"aux-imagenet_extra-{SIDE}-")]
    assert cached.endswith(".npy") and not [f for f in os.listdir(cache) if f.startswith(".tmp-")]
    assert np.array_equal(np.load(os.path.join(cache, cached)), extra.x)
    first = os.path.join(tree, "imagenet_extra", EXTRA_WNIDS[0], f"{EXTRA_WNIDS[0]}_0.JPEG")
    assert np.array_equal(extra.x[0], large_lt.decode_image(first, SIDE))
    assert record == {"outlier_source": f"folder:{os.path.join(tree, 'imagenet_extra')}",
                      "outlier_rule": large_lt.store_rule(SIDE), "outlier_subset": "all", "outlier_classes": "2"}
    # Chunks smaller than the set give the same file.
    large_lt.decode_to_npy([first] * 3, SIDE, str(tmp_path / "three.npy"), chunk=2)
    assert np.array_equal(np.load(tmp_path / "three.npy"), np.stack([extra.x[0]] * 3))

    def no_decoding(*_):
        raise AssertionError("decoded again although the cache holds the set")
    monkeypatch.setattr(large_lt, "decode_image", no_decoding)
    subset, record = large_lt.load_outliers("imagenet_extra", "imagenet-lt", tree, cache, SIDE, max_images=4, seed=3)
    keep = np.sort(np.random.RandomState(3).choice(6, 4, replace=False))
    assert not large_lt.is_memory_mapped(subset.x) and np.array_equal(subset.x, extra.x[keep])
    assert record["outlier_subset"] == "seeded random 4 of 6 (split_seed 3)"
    monkeypatch.undo()
    places, _ = large_lt.load_outliers("places_extra69", "places-lt", tree, cache, SIDE)
    assert len(places) == 4


def test_imagenet_extra_from_an_imagenet10k_root_and_its_wnid_list(tmp_path):
    rng = np.random.RandomState(4)
    for wnid in ("n01440764", "n20000001", "n20000002"):   # the first is an ImageNet-1k class
        _jpeg(os.path.join(tmp_path, "imagenet10k", wnid, "a.JPEG"), rng)
    (tmp_path / "imagenet_extra_1k_wnid_list.txt").write_text("n20000002\nn20000001\n")
    extra, record = large_lt.load_outliers("imagenet_extra", "imagenet-lt", str(tmp_path), str(tmp_path / "c"), SIDE)
    listed = str(tmp_path / "imagenet_extra_1k_wnid_list.txt")
    assert len(extra) == 2 and record["outlier_source"].endswith(f"filtered by {listed}")
    (tmp_path / "imagenet_extra_1k_wnid_list.txt").write_text("n20000001\nn29999999\n")
    with pytest.raises(data.MissingDataError,
                       match=r"1 of the 2 classes .* are not folders of .*imagenet10k \(first: n29999999\)"):
        large_lt.load_outliers("imagenet_extra", "imagenet-lt", str(tmp_path), str(tmp_path / "c"), SIDE)
    with pytest.raises(data.MissingDataError) as e:
        large_lt.load_outliers("places_extra69", "places-lt", str(tmp_path), str(tmp_path / "c"), SIDE)
    assert "outlier set 'places_extra69'" in str(e.value) and "looked in: " in str(e.value)
    assert "places_extra69/<class>/" in str(e.value) and "\n" not in str(e.value)


def test_outlier_auto_resolution_and_refusals(tree, tmp_path, monkeypatch):
    cache = str(tmp_path)
    assert large_lt.load_outliers("auto", "imagenet-lt", tree, cache, SIDE)[0].name == "imagenet_extra"
    assert large_lt.load_outliers("auto", "places-lt", tree, cache, SIDE)[0].name == "places_extra69"
    # No copy of the benchmark's set: Gaussian noise at the stored side, data.synthetic_ood's values.
    noise, record = large_lt.load_outliers("auto", "imagenet-lt", str(tmp_path / "empty"), cache, SIDE,
                                           max_images=5, seed=7)
    assert noise.name == "gaussian" and np.array_equal(noise.x, data.synthetic_ood("gaussian", 5, 7, size=SIDE).x)
    assert record["outlier_rule"] == large_lt.GAUSSIAN_RULE.format(side=SIDE)
    monkeypatch.setattr(data, "SYNTHETIC_CHUNK", 2)   # drawn 2 rows at a time: the one-call stream's values
    one_call = np.rint(np.clip(np.random.RandomState(3).normal(0.5, 0.5, size=(5, 8, 8, 3)), 0, 1) * 255)
    assert np.array_equal(data.synthetic_ood("gaussian", 5, 3, size=8).x, one_call.astype(np.uint8))
    for small in ("300k", "tin_aux", "svhn"):
        with pytest.raises(ValueError, match=rf"^outlier_set='{small}' is a 32x32 set and does not apply to dataset "
                                             r"imagenet-lt; accepted: auto, imagenet_extra, places_extra69, gaussian"):
            large_lt.check_outlier_set(small, "imagenet-lt", [], [])
    with pytest.raises(ValueError, match="outlier set 'inaturalist2018' is also a test OOD set"):
        large_lt.check_outlier_set("inaturalist2018", "imagenet-lt", ["inaturalist2018"], [])
    # A wnid of the outliers that is also an ImageNet-1k-OOD test class, or an ID class, is refused.
    rng = np.random.RandomState(5)
    for folder in ("imagenet_extra", "imagenet10k_ood_test"):
        _jpeg(os.path.join(tmp_path, "overlap", folder, "n10000001", "a.JPEG"), rng)
    with pytest.raises(ValueError, match=r"^outlier set 'imagenet_extra' shares 1 class folder\(s\) with test OOD "
                                         r"set 'imagenet_1k_ood' \(n10000001\); accepted: disjoint classes"):
        large_lt.check_outlier_set("auto", "imagenet-lt", ["imagenet_1k_ood"], [], str(tmp_path / "overlap"))
    with pytest.raises(ValueError,
                       match=r"shares 1 class folder\(s\) with the ID classes of imagenet-lt \(n20000002\)"):
        large_lt.load_outliers("imagenet_extra", "imagenet-lt", tree, cache, SIDE, id_classes=["n20000002"])
    cfg = registry.get("oe").config_cls.from_dict(dict(
        dataset="imagenet-lt", image_store_side=SIDE, image_size=16, data_dir=tree, cache_dir=cache,
        download=False, val_per_class=1, val_ood=("rademacher",), outlier_set="tin_aux"))
    with pytest.raises(ValueError, match="outlier_set='tin_aux' is a 32x32 set"):
        engine.prepare(cfg, uses_outliers=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the side-stream copy needs a CUDA device"))])
def test_streamed_memmap_and_prefetch_equal_resident(tmp_path, monkeypatch, device):
    x = np.random.RandomState(0).randint(0, 256, (10, 8, 8, 3)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    resident = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)
    streamed = large_lt.StreamedImages(mapped, torch.device(device), chunk=3)
    assert streamed.mapped and streamed.host is mapped    # read from the file, never copied whole
    ahead, other = torch.tensor([9, 0, 4, 4, 7]), torch.tensor([1, 2])
    streamed.prefetch(ahead)
    assert torch.equal(streamed[other], resident[other]) and len(streamed._pending) == 1   # not the one ahead
    assert torch.equal(streamed[ahead], resident[ahead]) and not streamed._pending
    # A memory-mapped set streams when the device lacks room for it, even without a budget.
    monkeypatch.setattr(large_lt, "free_bytes", lambda device: 0)
    placement = large_lt.Placement(torch.device(device), None)
    assert isinstance(placement.place(data.ImageSet(mapped, np.full(10, -1), "aux")), large_lt.StreamedImages)
    assert isinstance(placement.place(data.ImageSet(x, np.full(10, -1), "ram")), torch.Tensor)
    assert placement.streamed == ["aux"]
    monkeypatch.setattr(large_lt, "free_bytes", lambda device: x.nbytes)
    on_device = large_lt.Placement(torch.device(device), None).place(data.ImageSet(mapped, np.full(10, -1), "aux"))
    assert torch.equal(on_device, resident)   # copied over in chunks


def test_oe_with_imagenet_extra_streamed_from_its_memmap_equals_resident(tree, tmp_path):
    """One epoch of oe with ImageNet-Extra outliers (outlier_set=auto) streamed from the memmap, and
    the next batches prefetched, leaves the same weights as with every set resident."""
    cls = registry.get("oe")
    base = dict(dataset="imagenet-lt", image_store_side=SIDE, image_size=16, ood_score="msp", backbone="resnet18",
                data_dir=tree, cache_dir=str(tmp_path), download=False, val_per_class=1, epochs=1, batch_size=6,
                eval_batch_size=8, val_ood=("rademacher",), val_ood_size=8, warmup_epochs=0, lr=0.001)
    prepared = engine.prepare(cls.config_cls.from_dict(base), uses_outliers=True)
    record = prepared.record
    assert (record["outlier_set"], record["outlier_size"], record["outlier_classes"]) == ("imagenet_extra", "6", "2")
    assert record["outlier_rule"] == large_lt.store_rule(SIDE) and large_lt.is_memory_mapped(prepared.outliers.x)
    trials = []
    for budget in (None, 0.0):
        cfg = cls.config_cls.from_dict({**base, "device_image_budget_gb": budget, "prefetch_streamed": True})
        trial = engine.Trial(cls, cfg, prepared)
        trials.append((trial, trial.train_epoch()))
    (resident, out_r), (streamed, out_s) = trials
    assert isinstance(streamed.outlier_x, large_lt.StreamedImages) and streamed.outlier_x.mapped
    assert streamed.outlier_x._worker is not None and not streamed.outlier_x._pending   # prefetched, all used
    assert "imagenet_extra" in streamed.resolved["resolved.streamed_sets"]
    assert out_r["train_loss"] == out_s["train_loss"]
    for (name, a), b in zip(resident.model.state_dict().items(), streamed.model.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- search end to end


@pytest.mark.integration
def test_two_trial_search_end_to_end(tree, tmp_path, tracking_uri):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, os.path.join(REPO, "search", "run.py"), "ce", "--dataset", "imagenet-lt",
            "--trials", "2", "--epochs", "1", "--grace-period", "1", "--data-dir", tree,
            "--cache-dir", str(tmp_path / "cache"), "--no-download", "--tracking-uri", tracking_uri,
            "--name", "large-e2e", "--storage", str(tmp_path / "ray_results"), "--val-ood", "gaussian",
            "--set", f"image_store_side={SIDE}", "--set", f"image_size={VIEW}", "--set", "backbone=resnet18",
            "--set", "val_per_class=2", "--set", "batch_size=6", "--set", "val_ood_size=16",
            # The lowest rate the space allows: a few steps at 0.1 on 18 images can overflow the
            # BatchNorm running statistics (batch 6: no 2-image last batch either).
            "--space", "lr=0.02"]
    ran = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-5000:]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("tailtune/ce/imagenet-lt")
    parent = client.search_runs([exp.experiment_id], "tags.`tailtune.search` = 'large-e2e'")[0]
    assert parent.data.tags["tailtune.data_rule"] == large_lt.store_rule(SIDE)
    assert parent.data.params["dataset"] == "imagenet-lt" and parent.data.params["store_side"] == str(SIDE)
    assert parent.data.params["augment"].startswith(f"RandomResizedCrop({VIEW}")
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 2
    for run in trials:
        assert 0 <= run.data.metrics["test_acc"] <= 1 and "test_imagenet_1k_ood_auroc" in run.data.metrics
        assert run.data.params["backbone"] == "resnet18"
    # The registered champion takes the stored squares.
    import mlflow
    mlflow.set_tracking_uri(tracking_uri)
    champion = mlflow.pyfunc.load_model("models:/ce-imagenet-lt@champion")
    images = data.load_id_data(spec(), tree, str(tmp_path / "cache"), download=False).test.x[:3]
    rows = champion.predict(images)
    assert len(rows) == 3 and set(rows["label"]) <= {"n00000", "n01000", "n02000", "n03000"}
    with pytest.raises(Exception, match=rf"\(-1, {SIDE}, {SIDE}, 3\)"):   # the logged signature's shape
        champion.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- benchmark


def test_bench_writes_both_pipelines_and_their_ratio(tmp_path, capsys):
    import importlib.util
    import json
    loaded = importlib.util.spec_from_file_location("bench_large_lt", os.path.join(REPO, "bench", "large_lt.py"))
    bench = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--images", "8", "--width", "60", "--height", "48", "--size", "32",
                       "--store-side", "40", "--batch", "4", "--workers", "0", "--repeats", "1",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ratio_ours_over_conventional"] == pytest.approx(
        result["ours_images_per_s"] / result["conventional_images_per_s"])
    assert "ratio ours/conventional" in capsys.readouterr().out


# ----------------------------------------------------------------------------- LT-OOD methods, ImageNet nets


def large_method(name: str, counts: list[int], **values):
    """Returns the method `name` built for imagenet-lt with `counts` (nothing is trained)."""
    cls = registry.get(name)
    return cls(cls.config_cls.from_dict({"dataset": "imagenet-lt", **values}), counts, "cpu")


def bn_layers(model: torch.nn.Module) -> dict[str, torch.nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


def test_rna_imagenet_network_is_the_specs(tmp_path):
    """RNA spec §2.1 (ImageNet): torchvision's ResNet-50, every BN affine off, f = GAP of layer4
    (2048-d, after the last ReLU), W and h_φ = 2048-2048-128 (not normalised) on f, RN = ||f||_2."""
    from trainables import rna
    assert rna.RnaConfig().bn_affine_shortcut and not rna.RnaConfig(dataset="imagenet-lt").bn_affine_shortcut
    torch.manual_seed(0)
    method = large_method("rna", [8, 5, 3, 2])
    assert method.backbone_name() == "resnet50"
    model = method.build_model()
    bns = bn_layers(model)
    assert len(bns) == 53 and all(m.weight is None and m.bias is None for m in bns.values())
    assert "trunk.bn1" in bns and "trunk.layer4.0.downsample.1" in bns
    assert all(m.running_var is not None for m in bns.values())
    head = model.projection
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (2048, 2048, 128)
    assert (model.classifier.in_features, model.classifier.out_features) == (2048, 4)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    logits, feats = model(x)
    t = model.trunk
    by_hand = t.layer4(t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x))))))))
    by_hand = by_hand.mean(dim=(2, 3))
    assert feats.shape == (1, 3, 2048) and torch.allclose(feats[0], by_hand, atol=1e-5)
    assert bool((feats >= 0).all())
    assert torch.allclose(logits[0], feats[0] @ model.classifier.weight.T + model.classifier.bias, atol=1e-4)
    h = model.project(feats[0])
    assert h.shape == (3, 128) and not torch.allclose(h.norm(dim=1), torch.ones(3))
    assert torch.allclose(method.confidence(model, x), by_hand.norm(dim=1), rtol=1e-5)
    # The shortcut flag keeps γ, β on the downsample BNs only (4 of them in a ResNet-18).
    kept = models.create("rna_resnet50", 4, arch="resnet18", shortcut_bn_affine=True)
    affine = sorted(n for n, m in bn_layers(kept).items() if m.weight is not None)
    assert affine == [f"trunk.layer{i}.0.downsample.1" for i in (2, 3, 4)]
    # A torchvision state dict loads its convolutions and running statistics; γ, β are dropped.
    import torchvision
    source = torchvision.models.resnet18(weights=None)
    source.layer1[0].bn1.running_mean.fill_(0.25)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    loaded = models.create("rna_resnet50", 4, arch="resnet18", pretrained=str(tmp_path / "r18.pt"))
    assert torch.equal(loaded.trunk.conv1.weight, source.conv1.weight)
    assert torch.equal(loaded.trunk.layer1[0].bn1.running_mean, source.layer1[0].bn1.running_mean)
    assert loaded.trunk.layer1[0].bn1.weight is None


def test_rna_large_loss_is_la_plus_rna_on_the_id_rows():
    """One joint forward of ID + outliers through the ImageNet network; L = L_LA + λ L_RNA on the
    ID rows (Eqs. 2, 5, 8), checked against the formulas on the same features."""
    from trainables import losses
    from trainables.method import Batch
    torch.manual_seed(0)
    method = large_method("rna", [8, 5, 3, 2], backbone="resnet18", image_size=16, image_store_side=20)
    model = method.build_model().train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 20, 20), dtype=torch.uint8, generator=gen)
    batch = Batch(method.train_transform(images[:6], gen), torch.tensor([0, 1, 2, 3, 0, 1]),
                  x_out=method.train_transform(images[6:], gen))
    assert batch.x.shape == (6, 3, 16, 16)   # the dataset's view, not RNA's 32-px CIFAR crop
    loss, stats = method.loss(model, batch, np.random.RandomState(0))
    with torch.no_grad():
        logits, feats = model(torch.cat([batch.x, batch.x_out]))
        la = losses.logit_adjusted_cross_entropy(logits[0][:6], batch.y, method.prior_log, 1.0)
        l_rna = -torch.log1p(model.project(feats[0][:6]).norm(dim=1)).mean()
    assert float(stats["loss_rna"]) == pytest.approx(float(l_rna), rel=1e-5)
    assert loss.item() == pytest.approx(float(la + 0.5 * l_rna), rel=1e-5)
    assert float(stats["feat_norm_id"]) == pytest.approx(float(feats[0][:6].norm(dim=1).mean()), rel=1e-5)


def test_pascl_large_network_and_defaults():
    """PASCL's ImageNet head on the trunk's feature (d-d-128, L2-normalised), the code's λ2 and T,
    all of the outlier set, and a second view at the dataset's view size."""
    from trainables import pascl
    from trainables.method import TrainData
    method = large_method("pascl", [8, 5, 3, 2], backbone="resnet18", image_size=16, image_store_side=20)
    assert (method.lambda_pascl, method.temperature, method.cfg.outlier_max_images) == (0.1, 0.07, None)
    assert pascl.PasclConfig().outlier_max_images == 30_000
    assert pascl.PasclConfig(dataset="cifar100", outlier_max_images=300_000).outlier_max_images == 300_000
    model = method.build_model()
    head = model.projection
    assert [(m.in_features, m.out_features) for m in head[::2]] == [(512, 512), (512, 128)]
    _, feats = model(torch.randn(2, 3, 16, 16))
    assert model.project(feats[0]).norm(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    method.begin_training(TrainData(images, torch.arange(4), images[:0], torch.arange(0)))
    view = method.second_view(torch.tensor([0, 2]), np.random.RandomState(0))
    # The dataset's view (crops at PASCL's ImageNet scale 0.2), on the step's generator.
    gen = torch.Generator().manual_seed(int(np.random.RandomState(0).randint(2**31 - 1)))
    assert view.shape == (2, 3, 16, 16)
    assert torch.equal(view, large_lt.View(16, 0.2).train(images[[0, 2]], gen))


def test_cocl_large_heads_and_weights():
    """COCL's ImageNet model: C + 1 outputs, round(0.4 C) tail prototypes of the feature's width
    (400 x d on 1000 classes), the ImageNet loss weights; OLC and the score at the view size."""
    from trainables import cocl
    assert (cocl.CoclConfig().lambda_ocl, cocl.CoclConfig().lambda_head) == (0.05, 0.1)
    counts = list(range(1000, 0, -1))
    method = large_method("cocl", counts, backbone="resnet18")
    assert (method.cfg.lambda_ocl, method.cfg.lambda_tail, method.cfg.lambda_head) == (0.02, 0.01, 0.01)
    model = method.build_model()
    assert model.backbone.classifier.out_features == 1001 and model.prototypes.shape == (400, 512)
    assert int(method.is_head.sum()) == 401   # counts fall with the label here: tail = labels 600..999
    assert bool(method.is_tail[600:].all()) and not method.is_tail[:600].any()
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert method.logits(model, x).shape == (2, 1000)
    z = model(x)[0][0]
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    shift = torch.cat([prior.log(), torch.zeros(1, dtype=torch.float64)]).float()   # outlier class: no shift
    conf = method.confidence(model, x)
    assert conf.shape == (2,) and torch.allclose(conf, -(z - shift).softmax(-1)[:, -1], atol=1e-6)


def test_eat_large_abstention_classes_and_split(tree, tmp_path):
    """EAT's ImageNet setting: A = 30 abstention classes (--odc 30), three heads of C + A outputs
    on the trunk's feature, head and tail the frequent and rare halves; an epoch on the views."""
    from trainables import eat
    assert (eat.EatConfig().abstention_ratio, eat.EatConfig().head_fraction) == (0.3, 0.4)
    counts = list(range(1000, 0, -1))
    method = large_method("eat", counts, backbone="resnet18")
    assert method.num_abstention == 30
    assert int(method.is_head.sum()) == int(method.is_tail.sum()) == 500
    places = registry.get("eat")(eat.EatConfig(dataset="places-lt"), list(range(365, 0, -1)), "cpu")
    assert places.num_abstention == 30
    model = method.build_model()
    assert len(model.heads) == 3 and all((h.in_features, h.out_features) == (512, 1030) for h in model.heads)
    logits, feats = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (3, 2, 1030) and feats.shape == (3, 2, 512)
    # An epoch on the tiny tree (4 classes: a ratio that gives 2 abstention classes); the tail
    # boxes are pasted at the 16-px view size.
    cls = registry.get("eat")
    cfg = cls.config_cls.from_dict(dict(
        dataset="imagenet-lt", image_store_side=SIDE, image_size=16, ood_score="abstention",
        backbone="resnet18", data_dir=tree, cache_dir=str(tmp_path), download=False, val_per_class=1,
        epochs=1, batch_size=6, eval_batch_size=8, val_ood=("rademacher",), val_ood_size=8, warmup_epochs=0, lr=0.001,
        outlier_set="gaussian", outlier_max_images=12, abstention_ratio=0.5))
    out = engine.fit(cls, cfg, engine.LocalReporter(str(tmp_path / "run")))
    assert np.isfinite(out["train_loss"]) and 0 <= out["test_acc"] <= 1 and 0 <= out["test_auroc"] <= 1
    assert out["pasted_rows"] > 0   # the 5 tail images (classes 2, 3) fall in some batch


# ----------------------------------------------------------------------------- Meta-CALA's meta set


def test_meta_cell_rule_by_hand():
    """Pitfall row 18 on a crafted case: a cell's meta image leaves training only when the cell
    keeps >= 2 images; a class with fewer images than k gets one group per image."""
    from trainables import meta_set
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2])
    groups = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0])
    # Cells (0,0): 3 images -> 1 meta, removed; (0,1): 2 -> kept; (1,0): 1, (1,1): 2, (2,0): 1 -> kept.
    meta, train, kept = meta_set.draw(y, groups, 1, seed=0)
    assert len(meta) == 5 and kept == 4 and len({(y[i], groups[i]) for i in meta}) == 5
    assert sorted(set(range(9)) - set(train)) == [i for i in meta if (y[i], groups[i]) == (0, 0)]
    assert [i for i in meta if (y[i], groups[i]) == (0, 0)][0] in (0, 1, 2)
    again = meta_set.draw(y, groups, 1, seed=0)
    assert np.array_equal(again[0], meta) and np.array_equal(again[1], train)
    # Two per cell: (0,0) gives 2 and keeps 1 < 2, so nothing leaves training.
    meta2, train2, kept2 = meta_set.draw(y, groups, 2, seed=0)
    assert len(meta2) == 2 + 2 + 1 + 2 + 1 and len(train2) == 9 and kept2 == len(meta2)
    # KMeans per class: two well-separated blobs in class 0 are its two groups; class 1 (one image) is group 0.
    feats = np.array([[0, 0], [0.1, 0], [10, 10], [10.1, 10], [5, 5]], dtype=np.float32)
    found = meta_set.kmeans_groups(feats, np.array([0, 0, 0, 0, 1]), 2, seed=0)
    assert found[0] == found[1] != found[2] == found[3] and found[4] == 0
    assert set(meta_set.kmeans_groups(feats, np.array([0, 0, 0, 0, 1]), 6, seed=0)[:4]) == {0, 1, 2, 3}


def meta_config(tree, tmp_path, **values):
    import torchvision
    weights = tmp_path / "r18.pt"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cls = registry.get("cala_meta")
    return cls, cls.config_cls.from_dict({**dict(
        dataset="imagenet-lt", image_store_side=SIDE, image_size=16, ood_score="msp", backbone="resnet18",
        pretrained=str(weights), data_dir=tree, cache_dir=str(tmp_path / "cache"), download=False,
        val_per_class=1, epochs=1, batch_size=6, eval_batch_size=8, val_ood=("rademacher",), val_ood_size=8,
        warmup_epochs=0, lr=0.001, knn_k=4, meta_groups=2, meta_batch_size=4), **values})


def test_cala_meta_large_meta_set_and_an_epoch(tree, tmp_path):
    """cala_meta on the tiny ImageNet-LT tree ([8, 5, 3, 2]), k = 2 groups of the run's own
    ResNet-18 ('pretrained' random weights): <= 1 meta image per (class, group), the <2-per-cell
    rule, seeded and cached, recorded; the virtual step moves only layer4's last block + fc; an
    epoch trains."""
    from trainables import cala, meta_set
    cls, cfg = meta_config(tree, tmp_path)
    assert cfg.meta_virtual_params == "last_block_fc" and "meta_virtual_params=last_block_fc" in cfg.dataset_defaults
    ident = engine.prepare(cfg).id
    grouping = cfg.meta_grouping()
    train_list, _ = large_lt.cached_list(os.path.join(tree, "ImageNet_LT", "ImageNet_LT_train.txt"),
                                         os.path.join(tree, "ImageNet_LT"), SIDE, str(tmp_path / "cache"), "x")
    y_all = np.repeat(np.arange(4), TRAIN_COUNTS)
    rows = np.arange(len(y_all))
    groups = meta_set.kmeans_groups(meta_set.features(train_list, rows, grouping), y_all, 2, cfg.split_seed)
    meta = ident.meta_index
    cells = [(int(y_all[i]), int(groups[i])) for i in meta]
    assert len(cells) == len(set(cells)) == len(set(zip(y_all.tolist(), groups.tolist())))   # one per cell
    assert np.array_equal(ident.meta.y, y_all[meta])
    for i, cell in zip(meta, cells):
        size = int(((y_all == cell[0]) & (groups == cell[1])).sum())
        assert (i in ident.train_index) == (size - 1 < 2), (i, cell, size)
    assert sorted(set(ident.train_index) | set(meta)) == list(range(18))
    assert 0 < len(set(meta) & set(ident.train_index)) < len(meta)   # both sides of the rule occur here
    record = ident.record
    assert record["meta_size"] == str(len(meta)) and record["meta_groups"] == "2"
    assert record["meta_per_group"] == "1" and "resnet18" in record["meta_group_features"]
    assert int(record["meta_kept_in_train"]) == len(set(meta) & set(ident.train_index))
    # Seeded and cached: a second build (from the cached features and groups) and a fresh one agree.
    cached = sorted(f.split("-")[1] for f in os.listdir(tmp_path / "cache") if f.startswith("meta-"))
    assert cached == ["features", "groups"]
    again = large_lt.load_id_data(engine.dataset_spec(cfg), tree, str(tmp_path / "cache"))
    fresh = large_lt.load_id_data(engine.dataset_spec(cfg), tree, str(tmp_path / "fresh"))
    for other in (again, fresh):
        assert np.array_equal(other.meta_index, meta) and np.array_equal(other.train_index, ident.train_index)
    # The virtual step's parameters on torchvision's ResNet-18.
    method = cls(cfg, ident.counts, "cpu")
    model = method.build_model()
    names = [n for n, _ in model.named_parameters()]
    virtual = cala.virtual_step_names(names, "last_block_fc")
    assert virtual[0] == "trunk.layer4.1.conv1.weight" and virtual[-2:] == ["classifier.weight", "classifier.bias"]
    assert all(n.startswith(("trunk.layer4.1.", "classifier.")) for n in virtual)
    assert cala.virtual_step_names(names, "all") == names
    # A restricted meta step still reaches Ω: it moves.
    meta_x = torch.from_numpy(ident.meta.x).permute(0, 3, 1, 2)
    method.begin_training(engine.TrainData(torch.zeros(0), torch.zeros(0), meta_x, torch.from_numpy(ident.meta.y)))
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 3])
    logits, feats = model(x)
    zeta, _ = cala.characteristics(feats[0], logits[0], y, None, 4)
    before = [p.detach().clone() for p in method.meta_net.parameters()]
    method.meta_step(model, x, logits[0], zeta, y, np.random.RandomState(0))
    assert any(not torch.equal(a, b) for a, b in zip(before, method.meta_net.parameters()))
    out = engine.fit(cls, cfg, engine.LocalReporter(str(tmp_path / "run")))
    assert np.isfinite(out["train_loss"]) and np.isfinite(out["meta_loss"]) and 0 <= out["test_acc"] <= 1


def test_cala_meta_large_needs_grouping_weights(tree, tmp_path):
    """No pretrained network and no meta_group_weights: one line naming what is accepted;
    meta_group_weights=pixels (the released code's rule) only when asked for."""
    with pytest.raises(ValueError) as info:
        meta_config(tree, tmp_path, pretrained=None)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith("meta_group_weights=None with pretrained=None")
    assert "accepted: pretrained=FILE" in message and "meta_group_weights=pixels" in message
    from search import run
    with pytest.raises(run.UsageError, match="bad config: meta_group_weights=None with pretrained=None"):
        run.build_plan(run.parse_args(["cala_meta", "--dataset", "places-lt"]))
    _, pixels = meta_config(tree, tmp_path, pretrained=None, meta_group_weights="pixels")
    ident = large_lt.load_id_data(engine.dataset_spec(pixels), tree, str(tmp_path / "cache"))
    assert "raw pixels" in ident.record["meta_group_features"] and 0 < len(ident.meta_index) <= 2 * 4
