"""Bad input gets one clear line and a non-zero exit before any trial starts."""
from __future__ import annotations

import time

import pytest

from search import run


def fails(capsys, argv: list[str], code: int = 2) -> str:
    assert run.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_method_lists_valid_ones(capsys):
    err = fails(capsys, ["nosuch"])
    assert "unknown method 'nosuch'" in err and "darl" in err


@pytest.mark.parametrize("argv, expected", [
    (["darl", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["darl", "--imbalance-ratio", "7"], "--imbalance-ratio 7: expected 10, 50 or 100"),
    (["darl", "--sampler", "grid"], "unknown sampler 'grid'"),
    (["darl", "--preset", "huge"], "unknown preset 'huge'"),
    (["darl", "--trials", "0"], "--trials 0: expected an integer >= 1"),
    (["darl", "--epochs", "3", "--grace-period", "5"], "--grace-period 5: must not exceed --epochs 3"),
    (["darl", "--reduction-factor", "1"], "--reduction-factor 1: expected >= 2"),
    (["darl", "--cpus-per-trial", "0"], "--cpus-per-trial 0: expected > 0"),
    (["darl", "--gpus-per-trial", "-1"], "--gpus-per-trial -1: expected a number in [0, 8]"),
    (["darl", "--test-ood", "cifar100,imagenet_o"], "imagenet_o"),
    (["darl", "--val-ood", "cifar100"], "validation OOD must be synthetic"),
    (["darl", "--space", "tau_energy=200:300"], "--space tau_energy=200:300: out of range; allowed log-uniform [0.1, 100]"),
    (["darl", "--space", "num_experts=4,5"], "not in the allowed one of [3]"),
    (["darl", "--space", "gamma=1"], "--space gamma: not a searched parameter"),
    (["darl", "--set", "tau_energy=3"], "use --space tau_energy=VALUE"),
    (["darl", "--set", "no_such_field=3"], "unknown config keys ['no_such_field']"),
    (["darl", "--resume", "nothing-here", "--storage", "/nonexistent"], "no search state"),
    (["darl", "--set", "val_per_class=0"], "val_per_class=0: a search needs a validation split"),
])
def test_bad_options(capsys, argv, expected):
    assert expected in fails(capsys, argv)


def test_missing_data_names_where_it_looked(capsys, tmp_path):
    err = fails(capsys, ["darl", "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c"),
                         "--no-download"])
    assert "cifar10" in err and str(tmp_path) in err


def test_cifar100_as_its_own_ood_set_is_refused(capsys):
    err = fails(capsys, ["darl", "--dataset", "cifar100", "--test-ood", "cifar100,mnist"])
    assert "OOD set 'cifar100' is the in-distribution set" in err


def test_cifar100_lt_missing_offline_says_how_to_provide_it(capsys, data_dir, cache_dir):
    err = fails(capsys, ["darl", "--dataset", "cifar100", "--data-dir", data_dir, "--cache-dir", cache_dir,
                         "--no-download"])
    assert "'cifar100' not found" in err and data_dir in err and "--data-dir" in err


def test_tracking_server_down_is_reported_quickly(capsys, data_dir, cache_dir):
    started = time.time()
    err = fails(capsys, ["darl", "--data-dir", data_dir, "--cache-dir", cache_dir, "--no-download",
                         "--tracking-uri", "http://127.0.0.1:9"])
    assert "http://127.0.0.1:9" in err and "not reachable" in err
    assert time.time() - started < 60


def test_list_shows_every_space(capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "darl:" in out and "tau_energy" in out and "log-uniform [0.1, 100]" in out
    assert "knn, mahalanobis, mahalanobis_pp, react" in out and "posthoc_sweep=true" in out
    assert "ood_react_percentile [80.0, 85.0, 90.0, 95.0, 99.0]" in out


@pytest.mark.parametrize("argv, expected", [
    (["oe", "--set", "outlier_set=textures"], "outlier set 'textures' is also a test OOD set"),
    (["rna", "--set", "outlier_set=gaussian", "--val-ood", "gaussian,blobs"],
     "outlier set 'gaussian' is also a validation OOD set"),
    (["open_sampling", "--set", "outlier_set=imagenet"], "unknown outlier set 'imagenet'"),
])
def test_outlier_set_overlapping_what_is_judged_is_refused(capsys, argv, expected):
    err = fails(capsys, [*argv, "--no-download"])
    assert expected in err and len(err.strip().splitlines()) == 1
