"""Feature-based OOD detectors on tiny 2-D cases computed by hand, and the features every method
exposes to them."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from trainables import detectors, registry
from trainables.config import TrainConfig

LT_COUNTS = [int(100 * 0.6 ** c) + 1 for c in range(10)]   # 101 ... 2: ten long-tailed classes


def experts(rows) -> torch.Tensor:
    """Returns 2-D features as one expert's [1, B, 2]."""
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def identity_head(feats: torch.Tensor) -> torch.Tensor:
    return feats.mean(0)   # one expert whose logits are its features


def test_knn_distance_to_the_kth_normalised_neighbour():
    # Bank (3, 0), (0, 2), (1, 1) normalises to (1, 0), (0, 1), (1, 1)/√2; the query (2, 0) to (1, 0).
    bank = detectors.fit("knn", experts([[3, 0], [0, 2], [1, 1]]), torch.tensor([0, 1, 1]), 2)["bank"]
    query = experts([[2, 0]])
    conf = [float(detectors.confidence("knn", {"bank": bank}, query, identity_head, k=k)) for k in (1, 2, 3)]
    assert conf == pytest.approx([0.0, -math.sqrt(2 - math.sqrt(2)), -math.sqrt(2)], abs=1e-6)
    # Scale does not matter: (200, 0) is the same direction.
    assert float(detectors.confidence("knn", {"bank": bank}, experts([[200, 0]]), identity_head, k=2)) \
        == pytest.approx(conf[1], abs=1e-6)
    with pytest.raises(ValueError, match="ood_knn_k=4; accepted: 1 to the 3 training images"):
        detectors.confidence("knn", {"bank": bank}, query, identity_head, k=4)


def test_mahalanobis_uses_class_means_and_one_tied_covariance():
    # Class 0: (-2, 0), (2, 0), mean (0, 0); class 1: (10, -1), (10, 1), mean (10, 0). Centred rows
    # (∓2, 0), (0, ∓1): covariance diag(2, 0.5) (1/N), precision diag(0.5, 2).
    feats = experts([[-2, 0], [2, 0], [10, -1], [10, 1]])
    state = detectors.fit("mahalanobis", feats, torch.tensor([0, 0, 1, 1]), 2)
    assert state["means"].tolist() == [[0, 0], [10, 0]]
    assert torch.allclose(state["precision"], torch.tensor([[0.5, 0.0], [0.0, 2.0]]))
    conf = detectors.confidence("mahalanobis", state, experts([[0, 3], [7, 0]]), identity_head)
    # (0, 3): d0 = 2·9 = 18, d1 = 0.5·100 + 18 = 68 -> -18. (7, 0): d0 = 0.5·49, d1 = 0.5·9 -> -4.5.
    assert conf.tolist() == pytest.approx([-18.0, -4.5])


def test_mahalanobis_needs_every_class():
    with pytest.raises(ValueError, match=r"classes \[2\] have no training image"):
        detectors.fit("mahalanobis", experts([[0, 1], [1, 0]]), torch.tensor([0, 1]), 3)


def test_mahalanobis_pp_fits_and_scores_on_the_unit_circle():
    # Raw rows of varied norm; normalised: class 0 (0.8, ±0.6), mean (0.8, 0); class 1 (±0.6, 0.8),
    # mean (0, 0.8). Centred rows (0, ±0.6), (±0.6, 0): covariance 0.18·I, precision I/0.18.
    feats = experts([[1.6, 1.2], [2.4, -1.8], [2.4, 3.2], [-0.3, 0.4]])
    state = detectors.fit("mahalanobis_pp", feats, torch.tensor([0, 0, 1, 1]), 2)
    assert torch.allclose(state["means"], torch.tensor([[0.8, 0.0], [0.0, 0.8]]), atol=1e-6)
    assert torch.allclose(state["precision"], torch.eye(2) / 0.18, rtol=1e-5)
    conf = detectors.confidence("mahalanobis_pp", state, experts([[0, 5], [10, 0], [-3, -4]]), identity_head)
    # (0, 1): nearest mean (0, 0.8), 0.04/0.18; (1, 0): nearest (0.8, 0), same; (-0.6, -0.8):
    # nearest (0.8, 0), (1.96 + 0.64)/0.18.
    assert conf.tolist() == pytest.approx([-2 / 9, -2 / 9, -130 / 9], rel=1e-5)
    # Plain Mahalanobis on the same raw rows depends on the norm; this one does not.
    assert float(detectors.confidence("mahalanobis_pp", state, experts([[0, 0.01]]), identity_head)) \
        == pytest.approx(-2 / 9, rel=1e-5)


def test_react_clips_at_the_training_percentile_before_the_energy():
    # Training activations 0, 4, 1, 3, 2, 2: the 50th percentile is 2, the 100th is 4.
    train = experts([[0, 4], [1, 3], [2, 2]])
    half = detectors.fit("react", train, torch.tensor([0, 1, 1]), 2, percentile=50.0)
    assert float(half["threshold"]) == 2.0
    query = experts([[5, 1], [1.5, 1]])
    conf = detectors.confidence("react", half, query, identity_head, temperature=1.0)
    # (5, 1) -> (2, 1): log(e² + e), down from log(e⁵ + e); (1.5, 1) is below the clip and unchanged.
    assert conf.tolist() == pytest.approx([math.log(math.e ** 2 + math.e), math.log(math.e ** 1.5 + math.e)])
    full = detectors.fit("react", train, torch.tensor([0, 1, 1]), 2, percentile=100.0)
    assert float(detectors.confidence("react", full, query[:, :1], identity_head)) == \
        pytest.approx(math.log(math.e ** 4 + math.e))
    with pytest.raises(ValueError, match="ood_react_percentile=0; accepted: a percentile in"):
        detectors.fit("react", train, torch.tensor([0, 1, 1]), 2, percentile=0)


def test_experts_are_concatenated_in_order():
    feats = torch.arange(12.0).view(2, 3, 2)    # K=2 experts, B=3 images, d=2
    flat = detectors.flatten_experts(feats)
    assert flat.tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]


@pytest.mark.parametrize("field, value, message", [
    ("ood_knn_k", 0, "ood_knn_k=0; accepted: an integer >= 1"),
    ("ood_react_percentile", 150.0, r"ood_react_percentile=150.0; accepted: a number in \(0, 100\]"),
    ("ood_energy_temperature", 0.0, "ood_energy_temperature=0.0; accepted: a number > 0"),
    ("posthoc_sweep", "yes", "posthoc_sweep='yes'; accepted: True, False")])
def test_bad_detector_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("name", registry.names())
def test_every_method_classifies_its_own_features_into_its_logits(name):
    """ReAct recomputes logits from (clipped) features: unclipped, they must be the method's logits."""
    method_cls = registry.get(name)
    fields = {f.name for f in dataclasses.fields(method_cls.config_cls)}
    cfg = method_cls.config_cls.from_dict({k: v for k, v in {"device": "cpu", "meta_per_class": 2}.items()
                                           if k in fields})
    method = method_cls(cfg, LT_COUNTS, torch.device("cpu"))
    torch.manual_seed(0)
    model = method.build_model().eval()
    x = method.eval_transform(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        feats = method.features(model, x)
        assert feats.shape[:2] == (model.num_experts, 4)
        assert torch.allclose(method.classify(model, feats), method.logits(model, x), atol=1e-5)


def test_unfitted_feature_score_says_what_to_do():
    method_cls = registry.get("ce")
    method = method_cls(method_cls.config_cls(ood_score="knn", device="cpu"), [2, 1], torch.device("cpu"))
    model = method.build_model().eval()
    with pytest.raises(RuntimeError, match="ood_score='knn' scores against training statistics; call fit_detector"):
        method.confidence(model, torch.zeros(1, 3, 32, 32))


def test_fit_detector_on_a_real_model_matches_the_detector_on_its_features():
    method_cls = registry.get("darl")   # LGLA: 3 experts, features concatenated to 192
    cfg = method_cls.config_cls(ood_score="mahalanobis", device="cpu")
    method = method_cls(cfg, LT_COUNTS, torch.device("cpu"))
    torch.manual_seed(0)
    model = method.build_model()
    train_x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    train_y = torch.arange(10).repeat(2)
    method.fit_detector(model, train_x, train_y, batch_size=6)
    assert method.detector["means"].shape == (10, 192) and method.detector["precision"].shape == (192, 192)
    with torch.no_grad():
        flat = detectors.flatten_experts(method.features(model, method.eval_transform(train_x)))
    assert torch.allclose(method.detector["means"][3], (flat[3] + flat[13]) / 2, atol=1e-5)
    conf = method.confidence(model, method.eval_transform(train_x[:3]))
    assert conf.shape == (3,) and np.isfinite(conf.numpy()).all()
