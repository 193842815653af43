"""Bad input as a new user gives it: one line naming the value and what is accepted, exit 2,
before Ray starts, and nothing written (no experiment folder, no MLflow store or run)."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sqlite3
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution
from PIL import Image

import spaces
from search import compare, pull, run
from tests.conftest import REPO
from trainables import registry
from trainables.config import Accepts, TrainConfig

METHODS = registry.names()


def one_line_error(capsys, main, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def nothing_written(folder) -> None:
    assert sorted(os.listdir(folder)) == [], os.listdir(folder)


def without_root_override(argv: list[str]) -> list[str]:
    """Runs `argv` without the capability that lets root write to read-only files and folders
    (so a read-only store is read-only to the test, as it is to a user)."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: read-only files are writable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]


# -- config: every field of every method has a declared range, checked when the config is built --

def field_cases():
    for name in METHODS:
        cls = registry.get(name).config_cls
        for f in dataclasses.fields(cls):
            yield name, cls, f.name


def outside(rule: Accepts) -> list:
    """Returns values just outside `rule`, and values of the wrong kind."""
    if rule.kind in ("number", "integer"):
        values = ["abc", True, math.nan, math.inf]
        step = 1 if rule.kind == "integer" else 0.1
        if rule.low is not None:
            values.append(rule.low if rule.low_open else rule.low - step)
        if rule.high is not None:
            values.append(rule.high if rule.high_open else rule.high + step)
        if rule.kind == "integer":
            values.append(2.5)
        return values
    if rule.kind == "choice":
        return ["bogus", 1, 0] if True in rule.choices else ["bogus", 7]
    if rule.kind == "text":
        return [5, ["a"]]
    if rule.kind == "names":
        return ["cifar100", [1], [""]]
    return [[1.5], [-0.1], "0.8"]   # fractions


@pytest.mark.parametrize("method", METHODS)
def test_every_field_declares_what_it_accepts(method):
    cls = registry.get(method).config_cls
    accepted = cls.accepted()
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in accepted]
    assert missing == []
    assert not set(accepted) - {f.name for f in dataclasses.fields(cls)}   # no stale entries
    cls()   # the paper's defaults are accepted


@pytest.mark.parametrize("method, cls, field", list(field_cases()))
def test_each_field_refuses_values_outside_its_range(method, cls, field):
    rule = cls.accepted()[field]
    for value in outside(rule):
        with pytest.raises(ValueError) as info:
            cls.from_dict({field: value})
        message = str(info.value)
        assert len(message.splitlines()) == 1
        assert message.startswith(f"{field}=") and "accepted: " in message, message


@pytest.mark.parametrize("method", METHODS)
def test_search_space_bounds_and_paper_point_are_accepted(method):
    cls = registry.get(method).config_cls
    for dataset in ("cifar10", "cifar100", "imagenet-lt", "places-lt"):   # each set's own ranges
        space = spaces.get(method, dataset)
        # Meta-CALA groups a large set's classes on some features: raw pixels here.
        base = {"dataset": dataset, **({"meta_group_weights": "pixels"} if method == "cala_meta"
                                       and not dataset.startswith("cifar") else {})}
        cls.from_dict({**base, **space.paper_point})
        for param, dist in space.distributions.items():
            values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
            for value in values:
                cls.from_dict({**base, param: value})


@pytest.mark.parametrize("values, message", [
    ({"weight_decay": -0.1}, "weight_decay=-0.1; accepted: a number >= 0"),
    ({"lr": 0}, "lr=0; accepted: a number > 0"),
    ({"momentum": 1.0}, "momentum=1.0; accepted: a number in [0, 1)"),
    ({"epochs": 3.0}, "epochs=3.0; accepted: an integer >= 1"),
    ({"nesterov": 1}, "nesterov=1; accepted: True, False"),
    ({"n_max": 0}, "n_max=0; accepted: an integer >= 1 or null"),
    ({"lr_milestones": [0.5, 1.2]}, "lr_milestones=(0.5, 1.2); accepted: a list of numbers in [0, 1]"),
    ({"odin_temperature": float("nan")}, "odin_temperature=nan; accepted: a number > 0"),
])
def test_hand_picked_fields(values, message):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(values)
    assert str(info.value) == message


def test_method_specific_ranges():
    cases = [("darl", {"tau_energy": -1.0}, "tau_energy=-1.0; accepted: a number > 0"),
             ("pascl", {"tail_fraction": 0}, "tail_fraction=0; accepted: a number in (0, 1]"),
             ("open_sampling", {"cb_beta": 1.0}, "cb_beta=1.0; accepted: a number in [0, 1)"),
             ("rna", {"ood_score": "norm"}, "ood_score='norm'; accepted: rn, msp, energy, max_logit, odin"),
             ("energy_oe", {"m_in": -3.0}, "m_in=-3.0 with m_out=-5.0; accepted: m_in < m_out")]
    for method, values, message in cases:
        with pytest.raises(ValueError) as info:
            registry.get(method).config_cls.from_dict(values)
        assert str(info.value).startswith(message)


def test_config_scores_match_the_scorers():
    from trainables import config, scores
    assert list(config.OOD_SCORES) == scores.NAMES


# -- search/run.py -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["ce", "--set", "weight_decay=-0.1"], "bad config: weight_decay=-0.1; accepted: a number >= 0"),
    (["darl", "--set", "cos_scale=0"], "cos_scale=0; accepted: a number > 0"),
    (["la", "--set", "warmup_epochs=-1"], "warmup_epochs=-1; accepted: an integer >= 0"),
    (["ce", "--tracking-uri", "foo://bar"], "--tracking-uri foo://bar: unsupported scheme 'foo'; accepted: http://"),
    (["ce", "--tracking-uri", "sqlite://"], "--tracking-uri sqlite://: expected sqlite:///PATH"),
])
def test_run_refuses_before_anything_is_written(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, run.main, [*argv, "--no-download"])
    assert expected in err
    nothing_written(tmp_path)


def test_storage_on_a_file_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("not a folder")
    err = one_line_error(capsys, run.main, ["ce", "--storage", str(tmp_path / "results" / "x")])
    assert err == f"error: --storage {tmp_path / 'results' / 'x'}: {tmp_path / 'results'} is a file; expected a folder"
    assert os.listdir(tmp_path) == ["results"]


def run_cli(argv: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(without_root_override([sys.executable, os.path.join(REPO, "search", "run.py"), *argv]),
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_read_only_storage_is_refused(tmp_path):
    storage = tmp_path / "ro"
    storage.mkdir()
    storage.chmod(0o555)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = run_cli(["ce", "--storage", str(storage), "--no-download"], cwd)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: --storage {storage}: cannot write in {storage} (Permission denied); "
                                   f"expected a writable folder")
    assert os.listdir(storage) == [] and os.listdir(cwd) == []


def make_store(path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (x)")


def tables(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]


def test_read_only_sqlite_store_is_refused(tmp_path):
    store = tmp_path / "mlflow.db"
    make_store(store)
    store.chmod(0o444)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = run_cli(["ce", "--tracking-uri", f"sqlite:///{store}", "--storage", str(cwd / "rr"),
                    "--no-download"], cwd)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and f"sqlite:///{store}" in err and "readonly database" in err, err
    assert tables(store) == ["runs"] and os.listdir(cwd) == []


def test_locked_sqlite_store_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    make_store(store)
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")   # another program writing to the store
    try:
        err = one_line_error(capsys, run.main, ["ce", "--tracking-uri", f"sqlite:///{store}",
                                                "--no-download"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "database is locked" in err and "no other program holds locked" in err
    assert sorted(os.listdir(tmp_path)) == ["mlflow.db"] and tables(store) == ["runs"]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_archive_is_named(capsys, tmp_path, monkeypatch, data_dir, damage):
    damaged = tmp_path / "data"
    damaged.mkdir()
    for name in os.listdir(data_dir):
        if name.endswith(".tar.gz") and name != "cifar10.tar.gz":
            os.symlink(os.path.join(data_dir, name), damaged / name)
    archive = damaged / "cifar10.tar.gz"
    with open(os.path.join(data_dir, "cifar10.tar.gz"), "rb") as f:
        whole = f.read()
    archive.write_bytes(whole[: len(whole) // 3] if damage == "truncated" else bytes(range(256)) * 100)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    err = one_line_error(capsys, run.main, ["ce", "--data-dir", str(damaged), "--cache-dir", str(tmp_path / "cache"),
                                            "--no-download"])
    assert err.startswith(f"error: archive {archive} is damaged (")
    nothing_written(work)


# -- search/pull.py ----------------------------------------------------------------------------

@pytest.fixture
def pull_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b""), "not a NumPy array file (No data left in file)"),
    (lambda p: np.save(p, np.zeros((0, 32, 32, 3), np.uint8)), "holds no images"),
    (lambda p: np.save(p, np.array({"a": 1}, dtype=object), allow_pickle=True), "not a NumPy array file"),
    (lambda p: np.save(p, np.zeros((2, 32, 32, 3), np.float32)),
     "expected uint8 (N, 32, 32, 3), got float32 (2, 32, 32, 3) (scale to 0-255"),
    (lambda p: np.save(p, np.zeros((2, 32, 32), np.uint8)), "expected uint8 (N, 32, 32, 3), got uint8 (2, 32, 32)"),
])
def test_pull_names_the_bad_array_file(capsys, pull_dir, make, expected):
    path = pull_dir / "images.npy"
    make(path)
    err = one_line_error(capsys, pull.main, ["darl-cifar10-lt-ir100", "images.npy"])
    assert err.startswith("error: images.npy: ") and expected in err, err
    assert os.listdir(pull_dir) == ["images.npy"]


def test_pull_names_the_unreadable_image(capsys, pull_dir):
    (pull_dir / "imgs").mkdir()
    Image.new("RGB", (40, 40)).save(pull_dir / "imgs" / "a.png")
    (pull_dir / "imgs" / "b.png").write_bytes(b"not an image")
    err = one_line_error(capsys, pull.main, ["darl-cifar10-lt-ir100", "imgs"])
    assert err.startswith(f"error: {os.path.join('imgs', 'b.png')}: not a readable image"), err
    assert os.listdir(pull_dir) == ["imgs"]


@pytest.mark.parametrize("uri", [None, "sqlite:///nowhere/mlflow.db", "./nowhere"])
def test_pull_never_creates_a_store(capsys, pull_dir, monkeypatch, uri):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    np.save(pull_dir / "images.npy", np.zeros((2, 32, 32, 3), np.uint8))
    err = one_line_error(capsys, pull.main, ["darl-cifar10-lt-ir100", "images.npy",
                                             *(["--tracking-uri", uri] if uri else [])])
    assert "no tracking store at" in err and "--tracking-uri" in err
    assert os.listdir(pull_dir) == ["images.npy"]


def test_pull_of_a_missing_model_is_one_line(capsys, pull_dir, tracking_uri):
    np.save(pull_dir / "images.npy", np.zeros((2, 32, 32, 3), np.uint8))
    err = one_line_error(capsys, pull.main, ["no-such-model", "images.npy", "--tracking-uri", tracking_uri])
    assert f"cannot load models:/no-such-model@champion from {tracking_uri}" in err


# -- search/compare.py -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--methods", "foo"], "error: unknown method 'foo'; expected one of: cala, cala_meta, ce, cocl, darl"),
    (["--methods", "ce,foo"], "error: unknown method 'foo'"),
    (["--set", "bogus=1"], "error: unknown config keys ['bogus']"),
    (["--set", "weight_decay=-0.1"], "error: weight_decay=-0.1; accepted: a number >= 0"),
    (["--epochs", "0"], "error: epochs=0; accepted: an integer >= 1"),
])
def test_compare_refuses_like_run(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert one_line_error(capsys, compare.main, argv).startswith(expected)
    nothing_written(tmp_path)


def test_compare_options_all_have_help():
    parser = compare.make_parser()
    for action in parser._actions:
        assert action.help, action.option_strings


# -- champion registration interrupted: the half-made model is dropped ------------------------

class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_unregistered_logged_models_are_dropped(tracking_uri):
    from search import orchestrate
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = client.create_experiment(f"orphans-{os.getpid()}")
    run_id = client.create_run(experiment_id).info.run_id
    with mlflow.start_run(run_id=run_id):
        kept = mlflow.pyfunc.log_model(name="model", python_model=Constant())
        orphan = mlflow.pyfunc.log_model(name="model", python_model=Constant())   # registration never came
    mlflow.register_model(kept.model_uri, f"orphans-{os.getpid()}")
    assert orchestrate.drop_unregistered_models(client, experiment_id, run_id) == [orphan.model_id]
    left = [m.model_id for m in client.search_logged_models([experiment_id])]
    assert left == [kept.model_id]
    assert orchestrate.drop_unregistered_models(client, experiment_id, run_id) == []
