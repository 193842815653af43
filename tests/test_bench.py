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


# -- bench/gpu_suite.py and bench/gpu_payload.py -----------------------------------------------------
def _load(name: str):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_gpu_suite_on_cuda_without_cuda_stops_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_suite.py"), "--device", "cuda",
                          "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "sees no CUDA device" in lines[0], run.stderr
    assert not (tmp_path / "out.json").exists()


# The whole suite at its CPU sizes (a few minutes; slower on a loaded machine): every stage's code
# really runs, including a real search through search/run.py under Ray with sqlite tracking.
@pytest.mark.integration
def test_gpu_suite_quick_on_cpu_records_every_stage(data_dir, cache_dir, tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_suite.py"), "--device", "cpu", "--quick",
                          "--json", str(out), "--data-dir", data_dir, "--cache-dir", cache_dir],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == ["epoch", "evaluation", "concurrency", "compiled", "smoke_search", "rna", "open_sampling",
                            "large_lt"]
    # CPU: compile is left out with its reason; every other stage delivered its numbers.
    assert stages["compiled"]["status"] == "skipped" and "CUDA" in stages["compiled"]["reason"]
    for name, stage in stages.items():
        if name != "compiled":
            assert stage["status"] == "ok", (name, stage)
            assert os.path.exists(tmp_path / stage["log"])

    epoch = stages["epoch"]["result"]
    assert epoch["images_per_epoch"] == 36 and epoch["steps_per_epoch"] == 5   # n_max 10, IR 10, batch 8
    s = report["summary"]
    ref, ours = epoch["reference"], epoch["ours"]
    assert s["darl_ratio_eager_over_reference"] == pytest.approx(ours["images_per_second"] / ref["images_per_second"])
    assert s["darl_epoch_s_eager"] == ours["epoch_seconds_measured"] > 0
    assert s["darl_ratio_compiled_over_reference"] is None and s["projected_trial_min_compiled"] is None
    ev = stages["evaluation"]["result"]   # 5 per class + 3 synthetic sets of 40; 3 per class + textures (30)
    assert ev["validation_images"] == 5 * 10 + 3 * 40 and ev["test_images"] == 3 * 10 + 30
    assert s["projected_trial_min_eager"] == pytest.approx(
        (400 * ours["epoch_seconds_measured"] + 80 * ev["validate_seconds"] + ev["test_seconds"]) / 60)

    rows = {row["concurrent"]: row for row in stages["concurrency"]["result"]["rows"]}
    assert set(rows) == {1, 2}
    for n, row in rows.items():
        assert row["images"] == n * 36 and row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
    assert s["concurrency_speedup_over_1"]["2"] == pytest.approx(rows[2]["images_per_s"] / rows[1]["images_per_s"])
    assert s["concurrency_4_over_1"] is None          # 4 trials are for the GPU run

    for name in ("rna", "open_sampling"):
        result = stages[name]["result"]
        assert result["method"] == name and result["images_per_epoch"] == 36
        assert s[f"{name}_epoch_s"] == result["epoch_seconds_measured"] > 0
        assert result["outliers"] == "tin_aux"         # the offline auxiliary set, not noise
    search = s["smoke_search"]
    assert search["returncode"] == 0 and search["devices"] == ["cpu"] and search["gpus_per_trial"] == 0
    assert search["trial_runs"] == 1 and search["states"] == {"completed": 1}

    assert s["large_lt_weights_check"] == "identical" and set(s["large_lt_train_images_per_s"]) == {
        "resident", "streamed", "streamed_prefetch"}
    assert all(t["met"].startswith("not applicable") for t in report["targets"])
    assert "targets:" in run.stdout and "written:" in run.stdout


# The large_lt stage alone at its CPU sizes (seconds): a generated ImageNet-LT-format tree, both
# input pipelines, and a ResNet-50 epoch per placement. The budget leaves open_sampling less than
# the 120 s kept for large_lt, so open_sampling is skipped without running and large_lt still runs.
def test_gpu_suite_large_lt_stage_and_its_kept_time(data_dir, tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_suite.py"), "--device", "cpu", "--quick",
                          "--only", "open_sampling,large_lt", "--budget-s", "135", "--json", str(out),
                          "--data-dir", data_dir],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    skipped = report["stages"]["open_sampling"]
    assert skipped["status"] == "skipped" and "120 s of it kept for large_lt" in skipped["reason"]
    stage = report["stages"]["large_lt"]
    assert stage["status"] == "ok", stage
    result, s = stage["result"], report["summary"]
    pipe = result["pipeline"]          # lt_counts(4, 8, 4) = [8, 5, 3, 2]: 18 training JPEGs, 64x48
    assert pipe["images"] == 18 and pipe["size"] == 32 and pipe["workers"] == 0
    assert pipe["conventional_images_per_s"] == pytest.approx(18 / pipe["conventional_pass_s"][0])
    assert s["large_lt_pipeline_ratio"] == pytest.approx(pipe["ours_images_per_s"] / pipe["conventional_images_per_s"])
    train = result["training"]
    rows = train["placements"]
    assert train["images"] == 18 and train["backbone"] == "resnet50" and list(rows) == [
        "resident", "streamed", "streamed_prefetch"]
    assert rows["resident"]["streamed_sets"] == "none"
    assert rows["streamed"]["streamed_sets"].startswith("imagenet-lt-train,")
    for name, row in rows.items():
        assert row["images_per_s"] == pytest.approx(18 / row["epoch_s"][0])
        assert s["large_lt_train_ratio_over_resident"][name] == pytest.approx(
            row["images_per_s"] / rows["resident"]["images_per_s"])
        # On a CPU the three placements give bit-identical weights after one epoch.
        assert row["identical_weights"] and row["max_abs_weight_diff"] == 0.0
        assert row["check_train_loss"] == rows["resident"]["check_train_loss"]
    assert s["large_lt_prefetch_over_no_prefetch"] == pytest.approx(
        rows["streamed_prefetch"]["images_per_s"] / rows["streamed"]["images_per_s"])
    assert s["large_lt_weights_check"] == "identical"
    assert "prefetch / none x" in run.stdout and "resident / streamed / prefetched: identical" in run.stdout


def test_gpu_payload_packs_into_carries_and_installs_once_all_arrived(tmp_path):
    payload = _load("gpu_payload")
    wheels, data = tmp_path / "wheels", tmp_path / "data"
    wheels.mkdir(), data.mkdir()
    import zipfile
    with zipfile.ZipFile(wheels / "demo-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("demo/__init__.py", "VALUE = 7\n")
        tool = zipfile.ZipInfo("demo/tool")
        tool.external_attr = 0o100755 << 16
        whl.writestr(tool, os.urandom(3000))          # incompressible: the tar needs several chunks
        whl.writestr("demo-1.0.data/purelib/demo_extra.py", "X = 1\n")
        whl.writestr("demo-1.0.data/scripts/demo-cli", "#!/bin/sh\n")
        whl.writestr("demo-1.0.dist-info/METADATA", "Name: demo\nVersion: 1.0\n")
    (data / "cifar10.tar.gz").write_bytes(os.urandom(1500))
    out = tmp_path / "payload"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = payload.pack(str(wheels), str(data), ["cifar10.tar.gz"], str(out), 4000, {"demo": "1.0"}, here)
    # The data (1,500 bytes) goes in carry-1 with the tar's first 2,500 bytes; 4,000 per carry after.
    sizes = [c["bytes"] for c in manifest["chunks"]]
    assert sum(sizes) == manifest["tar_bytes"] and len(sizes) >= 3
    assert sizes[0] == 2500 and sizes[1:-1] == [4000] * (len(sizes) - 2) and 0 < sizes[-1] <= 4000
    assert [c["carry"] for c in manifest["chunks"]] == manifest["carries"] == [
        f"carry-{i + 1}" for i in range(len(sizes))]
    assert (out / "carry-1" / "data" / "cifar10.tar.gz").exists()
    for carry in manifest["carries"]:
        total = sum(f.stat().st_size for f in (out / carry).rglob("*") if f.is_file() and f.name != "payload.json")
        assert total <= 4000

    # On the GPU machine the carries arrive one run at a time: nothing installs until all are there.
    import shutil
    first, later = manifest["carries"][0], manifest["carries"][1:]
    for carry in later:
        shutil.move(str(out / carry), str(tmp_path / carry))
    assert payload.install(str(out)) == f"wheels not installed yet: still missing {', '.join(later)}"
    assert payload.data_dir(str(out)) == str(out / first / "data")
    shutil.rmtree(out / first / "data")           # earlier carries' files need not stay: kept in received/
    for carry in later:
        shutil.move(str(tmp_path / carry), str(out / carry))
    shutil.rmtree(out / first)
    assert payload.install(str(out)).startswith("installed 1 wheels")
    site = out / "site"
    assert (site / "demo" / "__init__.py").read_text() == "VALUE = 7\n"
    assert (site / "demo_extra.py").exists() and not (site / "demo-cli").exists()
    assert os.stat(site / "demo" / "tool").st_mode & 0o777 == 0o755
    assert payload.site_dir(str(out)) == str(site)
    assert payload.install(str(out)).startswith("wheels already installed")


def test_gpu_payload_refuses_wheels_for_another_python_and_a_corrupt_chunk(tmp_path):
    payload = _load("gpu_payload")
    wheels, data = tmp_path / "wheels", tmp_path / "data"
    wheels.mkdir(), data.mkdir()
    import zipfile
    with zipfile.ZipFile(wheels / "demo-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("demo/__init__.py", "")
    (data / "cifar10.tar.gz").write_bytes(b"x")
    other = payload.pack(str(wheels), str(data), ["cifar10.tar.gz"], str(tmp_path / "a"), 10**6, {}, "2.7")
    assert payload.install(str(tmp_path / "a")).startswith("wheels not installed: they are for Python 2.7")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = payload.pack(str(wheels), str(data), ["cifar10.tar.gz"], str(tmp_path / "b"), 10**6, {}, here)
    chunk = tmp_path / "b" / manifest["chunks"][0]["carry"] / manifest["chunks"][0]["name"]
    chunk.write_bytes(b"\0" + chunk.read_bytes()[1:])
    with pytest.raises(RuntimeError, match="sha256 differs"):
        payload.install(str(tmp_path / "b"))
    assert other["carries"] == ["carry-1"]


def test_gpu_payload_closure_follows_requirements_and_extras():
    payload = _load("gpu_payload")
    found = payload.closure(("optuna",))
    # optuna requires alembic, colorlog, sqlalchemy; alembic requires Mako; no extra is followed.
    assert {"optuna", "alembic", "colorlog", "sqlalchemy", "mako"} <= set(found)
    assert "ray" not in found and found["optuna"] == "5.0.0"
    assert "pyarrow" in payload.closure(("ray[tune]",)) and "pyarrow" not in payload.closure(("ray",))
