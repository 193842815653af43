"""The post-hoc sweep (validation only) and feature-based scores through the engine and the champion."""
from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from search import tracking
from trainables import engine, metrics, posthoc, registry, scores
from trainables.config import TrainConfig
from trainables.method import Method


# -- a toy method whose logits and features are its input pixels ------------------------------
class PixelNet(torch.nn.Module):
    """logits = features = the first two channels of a 1x1 image, minus 128."""
    num_experts = 1

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Identity()

    def forward(self, x):
        feats = x[:, :2, 0, 0] - 128
        return self.classifier(feats).unsqueeze(0), feats.unsqueeze(0)


class PixelMethod(Method):
    name = "pixels"

    def build_model(self):
        return PixelNet()

    def eval_transform(self, x_uint8):
        return x_uint8.float()

    def loss(self, model, batch, rng):
        raise NotImplementedError


def images(rows) -> torch.Tensor:
    """Returns uint8 1x1 images [N, 3, 1, 1] whose first two channels are the rows + 128."""
    x = torch.zeros(len(rows), 3, 1, 1, dtype=torch.uint8)
    x[:, :2, 0, 0] = torch.tensor(rows) + 128
    return x


def pixel_method(**cfg) -> tuple[PixelMethod, PixelNet]:
    method = PixelMethod(TrainConfig(device="cpu", **cfg), [1, 1], torch.device("cpu"))
    return method, method.build_model()


def test_grid_puts_the_configured_point_first_without_repeats():
    points = posthoc.grid(TrainConfig(ood_score="odin"), n_train=100)
    assert len(points) == 24 and points[0] == {"odin_temperature": 1000.0, "odin_eps": 0.0014}
    assert points[1] == {"odin_temperature": 1.0, "odin_eps": 0.0}
    assert [p["ood_knn_k"] for p in posthoc.grid(TrainConfig(ood_score="knn", ood_knn_k=3), 12)] == [3, 1, 5, 10]
    assert posthoc.grid(TrainConfig(ood_score="msp"), 100) == [{}]
    assert "odin_eps [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.003]" in posthoc.RULE


def test_energy_sweep_picks_the_temperature_that_separates_validation():
    # ID logits (5, 5), OOD (10, -10). T·logsumexp(z/T): T=1, 2, 5 rank OOD above ID (10 > 5.69,
    # 10.0 > 6.39, 10.09 > 8.47); T=10 and 100 rank ID above (11.93 > 11.27, 74.3 > 69.8). Ties keep
    # the earlier point: T=10.
    method, model = pixel_method(ood_score="energy")
    val_id, val_ood = images([[5, 5]] * 3), images([[10, -10]] * 2)
    result = posthoc.sweep(method, model, images([[5, 5]]), torch.tensor([0]), val_id, [val_ood], 8)
    assert [round(a, 6) for _, a in result.table] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert result.chosen == {"ood_energy_temperature": 10.0} and method.cfg.ood_energy_temperature == 10.0
    assert result.report["posthoc_ood_energy_temperature"] == 10.0
    assert result.report["posthoc_val_auroc"] == 1.0 and result.report["posthoc_val_auroc_configured"] == 0.0
    assert result.report["posthoc_sweep_ran"] == 1.0 and result.report["posthoc_grid_size"] == 5.0


def test_knn_sweep_refits_per_k_and_prefers_the_k_that_ignores_a_stray_training_point():
    # Six training features around (1, 0) and one stray at (0, 1). Validation OOD sits on the stray:
    # at k=1 its distance is 0 (looks ID), at k=5 it is far; ID sits in the cluster.
    cluster = [[20, 1], [20, -1], [20, 2], [20, -2], [20, 3], [20, -3]]
    method, model = pixel_method(ood_score="knn", ood_knn_k=1)
    result = posthoc.sweep(method, model, images([*cluster, [0, 20]]), torch.tensor([0] * 6 + [1]),
                           images([[30, 0], [40, 1]]), [images([[0, 30], [0, 5]])], 8)
    assert [p["ood_knn_k"] for p, _ in result.table] == [1, 5]
    assert [a for _, a in result.table] == [0.0, 1.0]
    assert result.chosen == {"ood_knn_k": 5} and method.cfg.ood_knn_k == 5


def test_odin_sweep_scores_every_point_like_odin_and_picks_the_best():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 4))

    class LinearMethod(PixelMethod):
        def build_model(self):
            return net

        def logits(self, model, x):
            return model(x)

        def eval_transform(self, x_uint8):
            return x_uint8.float() / 255

    method = LinearMethod(TrainConfig(device="cpu"), [1, 1], torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    val_id = torch.randint(0, 256, (12, 3, 1, 1), dtype=torch.uint8, generator=gen)
    val_ood = [torch.randint(0, 256, (9, 3, 1, 1), dtype=torch.uint8, generator=gen)]
    result = posthoc.sweep(method, net, val_id, torch.zeros(12, dtype=torch.long), val_id, val_ood, 5)
    assert len(result.table) == 24
    for point, auroc in result.table:
        conf = [scores.odin(net, method.eval_transform(x), point["odin_temperature"], point["odin_eps"])
                .numpy() for x in (val_id, val_ood[0])]
        assert auroc == pytest.approx(metrics.auroc(*conf), abs=1e-12), point
    assert result.val_auroc == max(a for _, a in result.table)
    assert result.chosen == next(p for p, a in result.table if a == result.val_auroc)


def test_a_score_without_parameters_has_nothing_to_sweep():
    method, model = pixel_method(ood_score="mahalanobis")
    result = posthoc.sweep(method, model, images([[1, 0], [0, 1]]), torch.tensor([0, 1]),
                           images([[1, 0]]), [images([[0, 1]])], 8)
    assert len(result.table) == 1 and result.chosen == {} and math.isnan(result.val_auroc)
    assert result.report["posthoc_sweep_ran"] == 0.0


# -- real images through the engine ------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.reports = []

    def restore(self, load):
        pass

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))


class Untouchable:
    """Stands in for a test set: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the post-hoc sweep touched test data ({name})")

    def __getitem__(self, index):
        raise AssertionError("the post-hoc sweep touched test data (indexing)")

    def __len__(self):
        raise AssertionError("the post-hoc sweep touched test data (len)")


@pytest.fixture(scope="module")
def tiny(data_dir, cache_dir):
    """The smallest real CIFAR-10-LT build (36 training images) and its prepared data."""
    values = dict(data_dir=data_dir, cache_dir=cache_dir, download=False, n_max=10, imbalance_ratio=10,
                  val_per_class=2, test_per_class=2, ood_max_images=20, val_ood_size=20,
                  test_ood=("mnist",), batch_size=16, epochs=1, warmup_epochs=0, device="cpu")
    return values, engine.prepare(TrainConfig(**values))


def ce_config(values, **extra):
    method_cls = registry.get("ce")
    return method_cls, method_cls.config_cls.from_dict({**values, **extra})


@pytest.mark.parametrize("score", ["knn", "mahalanobis", "mahalanobis_pp", "react"])
def test_a_real_trial_with_a_feature_score_runs_end_to_end(score, tiny):
    values, prepared = tiny
    method_cls, cfg = ce_config(values, ood_score=score, ood_knn_k=5)
    recorder = Recorder()
    out = engine.fit(method_cls, cfg, recorder, prepared)
    for key in ("val_auroc", "test_auroc", "test_fpr95", "test_mnist_auroc"):
        assert np.isfinite(out[key]), (key, out)
    assert out["posthoc_sweep_ran"] == 0.0 and "posthoc_val_auroc" not in out


@pytest.mark.parametrize("score, fields", [("energy", ("ood_energy_temperature",)), ("knn", ("ood_knn_k",))])
def test_the_sweep_never_touches_test_sets_and_the_trial_tests_with_its_choice(score, fields, tiny, tmp_path):
    # (ODIN's grid costs 24 passes over validation on a CPU; its sweep is checked point by point on
    # a small network above.)
    values, prepared = tiny
    method_cls, cfg = ce_config(values, ood_score=score, ood_knn_k=5, posthoc_sweep=True)
    trial = engine.Trial(method_cls, cfg, prepared)
    trial.train_epoch()
    test_x, test_ood_x = trial.test_x, trial.test_ood_x
    trial.test_x, trial.test_ood_x = Untouchable(), [Untouchable()]
    report = trial.posthoc_sweep()
    trial.test_x, trial.test_ood_x = test_x, test_ood_x
    points = posthoc.grid(cfg, len(prepared.id.train))
    assert report["posthoc_grid_size"] == len(points) > 1 and report["posthoc_sweep_ran"] == 1.0
    chosen = {f: report[f"posthoc_{f}"] for f in fields}
    assert chosen in points
    assert {f: getattr(trial.cfg, f) for f in fields} == chosen == {f: getattr(trial.method.cfg, f) for f in fields}
    # Validation with the trial's score now measures the chosen point's AUROC.
    assert trial.validate()[0]["val_auroc"] == pytest.approx(report["posthoc_val_auroc"], abs=1e-9)
    trial.save(str(tmp_path), {}, None)
    with open(tmp_path / engine.META_FILE) as f:
        saved = json.load(f)["config"]
    assert {f: saved[f] for f in fields} == chosen


def test_fit_with_the_sweep_reports_the_chosen_values(tiny, tmp_path):
    values, prepared = tiny
    method_cls, cfg = ce_config(values, ood_score="react", posthoc_sweep=True)
    out = engine.fit(method_cls, cfg, engine.LocalReporter(str(tmp_path)), prepared)
    assert out["posthoc_sweep_ran"] == 1.0 and out["posthoc_grid_size"] == 5
    assert out["posthoc_ood_react_percentile"] in posthoc.GRIDS["react"]["ood_react_percentile"]
    assert out["posthoc_val_auroc"] >= out["posthoc_val_auroc_configured"]
    assert np.isfinite(out["test_auroc"]) and out["posthoc_seconds"] > 0
    with open(tmp_path / engine.META_FILE) as f:
        meta = json.load(f)
    assert meta["config"]["ood_react_percentile"] == out["posthoc_ood_react_percentile"]
    threshold = torch.load(tmp_path / engine.STATE_FILE)["detector"]["threshold"]
    assert threshold.ndim == 0 and float(threshold) > 0   # a percentile of post-ReLU activations
    assert "posthoc_sweep" in prepared.record["posthoc_rule"]


def test_champion_with_a_feature_score_loads_and_predicts(tiny, tmp_path, tracking_uri, monkeypatch):
    values, prepared = tiny
    method_cls, cfg = ce_config(values, ood_score="knn", ood_knn_k=5)
    ckpt = tmp_path / "ckpt"
    engine.fit(method_cls, cfg, engine.LocalReporter(str(ckpt)), prepared)
    bank = torch.load(ckpt / engine.STATE_FILE)["detector"]["bank"]
    assert bank.shape == (len(prepared.id.train), 64)
    assert torch.allclose(bank.norm(dim=1), torch.ones(len(bank)))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = tracking.ensure_experiment(client, "tailtune/posthoc-champion", tracking_uri)
    run = client.create_run(experiment)
    test_images = prepared.id.test.x
    tracking.log_champion(client, run.info.run_id, str(ckpt), "posthoc-knn-champion", test_images[:2],
                          "a kNN-scored champion", {"method": "ce"})
    client.set_terminated(run.info.run_id)
    model = mlflow.pyfunc.load_model("models:/posthoc-knn-champion@champion")
    table = model.predict(test_images)
    # The registered model scores exactly as the trial did: the kNN bank came with the checkpoint.
    trial_scores = np.load(ckpt / engine.SCORES_FILE)["id_confidence"]
    assert np.allclose(table["ood_score"].to_numpy(float), -trial_scores, atol=1e-5)
    assert table["is_ood"].dtype == bool and len(table) == len(test_images)
