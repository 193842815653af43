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
         "--workers", "1", "--threads", "1", "--data-dir", data_dir, "--cache-dir", cache_dir],
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
