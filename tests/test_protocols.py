"""Evaluation protocols: their data, SC-OOD relabelling, averages, missing sets, the CLI, a real fit."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from search import compare, run
from trainables import data, engine, large_lt, metrics, ood_sets, protocols, registry

DATA_DIR = os.environ.get("TAILTUNE_DATA_DIR")
needs_data = pytest.mark.skipif(
    DATA_DIR is None or not os.path.isfile(os.path.join(DATA_DIR, "cifar10.tar.gz")),
    reason="real data not found: set TAILTUNE_DATA_DIR to a folder with cifar10.tar.gz")


def test_every_protocol_is_complete_data():
    keys = metrics.ood_metrics(np.array([1.0, 2.0]), np.array([0.0, 1.5]))
    for name in protocols.names():
        p = protocols.get(name)
        assert p.headline_fpr in keys and p.resize in ood_sets.RESIZE_RULES and p.source and p.checkpoint
        for dataset in ("cifar10", "cifar100"):
            if p.large_sets and not p.sets:   # a protocol of the large benchmarks only (oltr)
                with pytest.raises(ValueError, match=f"protocol '{p.name}' has OOD sets only for"):
                    p.sets_for(dataset)
                continue
            for s in p.sets_for(dataset):
                assert ood_sets.is_release_set(s) or s in data.synthetic_names(), (name, s)
            assert not set(p.sets_for(dataset)) & {f"{dataset}_test", f"scood_{dataset}"}
        for dataset, sets in p.large_sets:
            assert large_lt.is_large(dataset) and set(sets) <= set(large_lt.ood_names()), (name, dataset)


def test_paper_protocols_follow_the_specs():
    darl, ricasso = protocols.get("darl"), protocols.get("ricasso")
    # RICASSO tests on DARL's sets on CIFAR and on iNaturalist 2018 val alone on ImageNet-LT (Table 2).
    assert (ricasso.sets, ricasso.headline_fpr, ricasso.resize) == (darl.sets, darl.headline_fpr, darl.resize)
    assert ricasso.sets_for("imagenet-lt") == ("inaturalist2018",)
    assert darl.sets_for("imagenet-lt") == ("imagenet_1k_ood",) and protocols.for_method("ricasso") == "ricasso"
    assert darl.sets == ("svhn", "dtd", "places365", "tin_val", "inaturalist", "lsun_c", "lsun_r")
    assert (darl.headline_fpr, darl.resize, darl.sc_relabel, darl.max_images) == ("fpr95_idpos", "crop", False, None)
    for name in ("rna", "pascl"):
        p = protocols.get(name)
        assert (p.headline_fpr, p.resize, p.sc_relabel) == ("fpr95_oodpos_oe", "square", True)
        assert p.sets_for("cifar100")[2] == "scood_cifar10" and len(p.sets) == 6
    os_ = protocols.get("open_sampling")
    assert len(os_.sets) == 10 and os_.max_images == 2000 and os_.sets[:3] == ("gaussian", "rademacher", "blobs")
    openood = protocols.get("openood-v1.5")
    assert dict(openood.groups_for("cifar100")) == {"near": ("cifar10_test", "tin_val"),
                                                    "far": ("mnist", "svhn", "dtd", "places365")}
    assert not protocols.get("offline").paper and not protocols.get("cala").paper
    assert protocols.for_method("darl") == "darl" and protocols.for_method("cala_meta") == "cala"
    with pytest.raises(ValueError, match="unknown protocol 'scood'; accepted: offline, darl"):
        protocols.get("scood")


def test_sc_label_relabelling_hand_value():
    conf_id = np.array([0.9, 0.8])
    conf_ood = np.array([0.1, 0.85, 0.2])
    labels = np.array([-1, 3, -1])          # the 0.85 image belongs to ID class 3
    # Relabelled: ID {0.9, 0.8, 0.85} vs OOD {0.1, 0.2}: every pair ordered, AUROC 1.
    assert protocols.set_metrics(protocols.get("rna"), conf_id, conf_ood, labels)["auroc"] == 1.0
    # Not relabelled: 0.8 < 0.85 is the one wrong pair of 6: AUROC 5/6.
    assert protocols.set_metrics(protocols.get("darl"), conf_id, conf_ood, labels)["auroc"] == pytest.approx(5 / 6)


def test_averages_overall_groups_and_headline():
    p = protocols.get("openood-v1.5")
    per_set = {"cifar100_test": {"auroc": 0.6, "fpr95_idpos": 0.9, "fpr95_oodpos": 0.8},
               "tin_val": {"auroc": 0.7, "fpr95_idpos": 0.7, "fpr95_oodpos": 0.6},
               "svhn": {"auroc": 0.95, "fpr95_idpos": 0.2, "fpr95_oodpos": 0.1}}
    out = protocols.averages(p, "cifar10", per_set)
    assert out["auroc"] == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    assert out["near_auroc"] == pytest.approx(0.65) and out["far_auroc"] == pytest.approx(0.95)
    assert out["fpr95"] == pytest.approx((0.8 + 0.6 + 0.1) / 3)   # OOD-positive headline


def _tar(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as t:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))


def _real_jpgs(n: int) -> list[bytes]:
    """n real photographs: the first files of the offline Textures archive."""
    out = []
    with tarfile.open(os.path.join(DATA_DIR, "textures_ood.tar.gz")) as t:
        for member in t:
            if member.isfile() and member.name.endswith(".jpg"):
                out.append(t.extractfile(member).read())
                if len(out) == n:
                    return out
    raise AssertionError("too few images in textures_ood.tar.gz")


@needs_data
def test_missing_set_is_an_error_unless_allowed(tmp_path):
    _tar(str(tmp_path / "LSUN.tar.gz"), {f"LSUN/test/{i}.jpg": b for i, b in enumerate(_real_jpgs(4))})
    darl = protocols.get("darl")
    with pytest.raises(data.MissingDataError, match=r"protocol 'darl': OOD set 'svhn' .*looked in: .*"
                                                    + str(tmp_path) + r".*--allow-missing-ood"):
        protocols.load_sets(darl, "cifar10", str(tmp_path), str(tmp_path / "c"), False, 0, False)
    found, missing = protocols.load_sets(darl, "cifar10", str(tmp_path), str(tmp_path / "c"), False, 0, True)
    assert [s.name for s in found] == ["lsun_c"] and len(found[0]) == 4
    assert missing == ["svhn", "dtd", "places365", "tin_val", "inaturalist", "lsun_r"]
    rec = protocols.record(darl, ["lsun_c"], missing)
    assert rec["ood_sets_covered"] == "lsun_c" and rec["ood_average"].startswith("partial: unweighted mean over 1")
    with pytest.raises(data.MissingDataError, match="none of its OOD sets"):
        protocols.load_sets(protocols.get("rna"), "cifar10", str(tmp_path), str(tmp_path / "c"), False, 0, True)


def _args(*argv):
    return run.build_plan(run.parse_args(["ce", *argv]))


def test_cli_protocol_defaults_and_errors():
    assert _args()["config"]["protocol"] == "offline"                       # smoke: offline archives
    small = _args("--preset", "small")["config"]
    assert small["protocol"] == "openood-v1.5" and small["test_ood"] == protocols.get("openood-v1.5").sets
    plan = run.build_plan(run.parse_args(["open_sampling", "--preset", "small", "--allow-missing-ood"]))
    assert plan["config"]["val_ood"] == (ood_sets.VAL_HOLDOUT,) and plan["config"]["allow_missing_ood"] is True
    assert _args("--protocol", "rna", "--dataset", "cifar100")["config"]["test_ood"][2] == "scood_cifar10"
    with pytest.raises(run.UsageError, match="--test-ood with --protocol darl: a protocol fixes its test sets"):
        _args("--protocol", "darl", "--test-ood", "cifar100")
    with pytest.raises(run.UsageError, match="--protocol nope: unknown protocol 'nope'; accepted:"):
        _args("--protocol", "nope")
    with pytest.raises(run.UsageError, match="--set protocol: use --protocol"):
        _args("--set", "protocol=darl")


def test_compare_refuses_averages_over_different_sets():
    rows = [{"method": "ce", "ood_sets": "cifar100,tin"}, {"method": "la", "ood_sets": "cifar100,tin"}]
    compare.check_same_sets(rows)
    rows.append({"method": "rna", "ood_sets": "cifar100"})
    with pytest.raises(ValueError, match="different sets cannot share a column: .*rna: cifar100"):
        compare.check_same_sets(rows)


@needs_data
def test_tin_aux_holdout_is_disjoint_from_training_outliers_and_tin(cache_dir):
    held, held_wnids = ood_sets.tin_aux_part("holdout", DATA_DIR, cache_dir)
    train, train_wnids = ood_sets.tin_aux_part("train", DATA_DIR, cache_dir)
    assert len(held_wnids) == 17 and len(train_wnids) == 66 and len(held) + len(train) == 24_900
    assert max(train_wnids) < min(held_wnids)       # the last fifth of the sorted wnids
    with tarfile.open(os.path.join(DATA_DIR, "tin_ood.tar.gz")) as t:
        tin_wnids = {m.name.split("/")[1] for m in t if m.isfile()}
    assert not tin_wnids & set(held_wnids)


@needs_data
def test_val_ood_cannot_be_a_test_set_of_the_protocol(cache_dir):
    cfg = registry.get("ce").config_cls(protocol="open_sampling", data_dir=DATA_DIR, cache_dir=cache_dir,
                                        download=False)
    with pytest.raises(ValueError, match=r"val_ood \['blobs', 'gaussian', 'rademacher'\] is also a test set"):
        engine.prepare(cfg)


@needs_data
def test_fit_under_rna_protocol_relabels_and_reports_its_headline(tmp_path, cache_dir):
    # A tiny SC-OOD list of real photographs: 6 OOD images, one marked as ID class 2. The folder
    # sits in the cache, at a fixed place, so the decoded CIFAR-10 cache (keyed by path) is reused.
    base = Path(cache_dir) / "protocol-test-data"
    shutil.rmtree(base, ignore_errors=True)
    root = base / "SCOOD" / "data"
    lines = []
    for i, blob in enumerate(_real_jpgs(6)):
        path = root / "images" / "texture" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        lines.append(f"texture/{i}.jpg {{'sc_label': {2 if i == 0 else -1}}}")
    (root / "imglist" / "benchmark_cifar10").mkdir(parents=True)
    (root / "imglist" / "benchmark_cifar10" / "test_texture.txt").write_text("\n".join(lines))
    os.symlink(os.path.join(DATA_DIR, "cifar10.tar.gz"), base / "cifar10.tar.gz")
    os.symlink(os.path.join(DATA_DIR, "tin_aux.tar.gz"), base / "tin_aux.tar.gz")
    method = registry.get("ce")
    cfg = method.config_cls(protocol="rna", allow_missing_ood=True, data_dir=str(base), cache_dir=cache_dir,
                            download=False, epochs=1, n_max=20, val_per_class=4, test_per_class=5,
                            val_ood=(ood_sets.VAL_HOLDOUT,), val_ood_size=20, batch_size=16, warmup_epochs=0,
                            eval_batch_size=50)
    prepared = engine.prepare(cfg)
    assert prepared.record["ood_sets_covered"] == "scood_texture"
    assert prepared.record["ood_set_sizes"] == "scood_texture:6"
    assert prepared.record["protocol_fpr95_headline"] == "fpr95_oodpos_oe"
    assert prepared.record["val_ood_sets"] == ood_sets.VAL_HOLDOUT and len(prepared.val_ood[0]) == 20
    last = engine.fit(method, cfg, engine.LocalReporter(str(tmp_path / "out")), prepared)
    assert last["test_fpr95"] == last["test_fpr95_oodpos_oe"] == last["test_scood_texture_fpr95_oodpos_oe"]
    scores = np.load(tmp_path / "out" / engine.SCORES_FILE)
    conf_id, conf_ood = scores["id_confidence"], scores["ood_scood_texture_confidence"]
    assert list(scores["ood_scood_texture_label"]) == [2, -1, -1, -1, -1, -1]
    # Recomputed by hand from the stored scores: the sc_label 2 image joins the ID side.
    expected = metrics.auroc(np.r_[conf_id, conf_ood[:1]], conf_ood[1:])
    assert last["test_scood_texture_auroc"] == pytest.approx(expected)


def test_the_search_protocol_tag_names_the_protocols_own_fpr95_convention():
    from search import tracking
    params = {**protocols.record(protocols.get("rna"), ["scood_svhn"], []),
              "val_ood_sets": "tin_aux_holdout", "test_ood_sets": "scood_svhn"}
    text = tracking.protocol(params)
    assert text.startswith("rna; select: val_score on val OOD tin_aux_holdout;")
    assert text.endswith("fpr95: OOD positive (ID flagged at 95% OOD caught), reference tie rule "
                         "[fpr95_oodpos_oe]")
    offline = tracking.protocol({**protocols.record(protocols.get("offline"), ["mnist"], []),
                                 "val_ood_sets": "gaussian", "test_ood_sets": "mnist"})
    assert offline.endswith("fpr95: ID positive (OOD accepted at 95% ID kept) [fpr95_idpos]")
