"""bench/epoch.py runs end to end on real data and writes what it prints (not a timing test)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


# Quick (not `integration`): a 36-image LT set, batch 8, one warm-up and one timed epoch per side.
def test_epoch_bench_writes_both_sides_and_their_ratio(data_dir, cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "epoch.py"), "--device", "cpu", "--json", str(out),
         "--n-max", "10", "--set", "imbalance_ratio=10", "--batch-size", "8", "--repeats", "1",
         "--workers", "1", "--threads", "1", "--data-dir", data_dir, "--cache-dir", cache_dir,
         "--trial-epochs", "4", "--eval-every", "3", "--set", "val_ood_size=40", "--set", "ood_max_images=30",
         "--set", "val_per_class=5", "--set", "test_per_class=3"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    sides = result["sides"]
    assert set(sides) == {"reference", "ours"}
    for side in sides.values():
        for key in ("images_per_second", "epoch_seconds_measured", "epoch_seconds_full_lt", "peak_host_mib"):
            assert side[key] > 0, (key, side)
        assert side["peak_device_mib"] is None   # cpu
    assert result["images_per_epoch"] == 36 and result["steps_per_epoch"] == 5
    quotient = sides["ours"]["images_per_second"] / sides["reference"]["images_per_second"]
    assert result["ratio_ours_over_reference"] == pytest.approx(quotient)
    assert f"ratio ours/reference: {quotient:.2f}x" in run.stdout
    projection = result["trial_projection"]   # 4 epochs, validated at 3 and 4, then tested
    # validation: 5 per class + 3 synthetic sets of 40; test: 3 per class + 5 offline OOD sets of 30
    assert projection["validation_images"] == 5 * 10 + 3 * 40 and projection["test_images"] == 3 * 10 + 5 * 30
    assert projection["trial_seconds"] == pytest.approx(
        4 * sides["ours"]["epoch_seconds_measured"] + 2 * projection["validate_seconds"] + projection["test_seconds"])
    assert result["ours_aten_ops_per_step"] > 100   # a ResNet-32 forward alone dispatches more
    assert result["ours_speed_settings"] == {"precision": "fp32", "channels_last": False,
                                             "fused_optimizer": False, "compile": "none"}
