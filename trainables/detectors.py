"""Feature-based OOD detectors: statistics fitted on the ID training set, then a confidence per image.

Each detector is two calls: `fit(name, train_feats, train_labels, num_classes, **params) -> state`
(a dict of tensors, small enough to travel in a checkpoint) and
`confidence(name, state, feats, classify, **params) -> [B]` (higher = more in-distribution).

Features are the penultimate-layer activations, [B, D]: the global-average-pooled output of the
last stage, after its ReLU (what the classifier sees). For LGLA's K-expert network they are the K
expert features concatenated ([B, 64K], the backbone's whole pooled output before it is split per
expert); `classify` maps features laid out as [K, B, d] back to the test-time logits [B, C] and is
only used by ReAct. The definitions follow OpenOOD v1.5's postprocessors:

- knn: Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors". Training and
  test features are L2-normalised; the confidence is minus the Euclidean distance to the k-th
  nearest training feature (k = `ood_knn_k`, 50 in the paper's CIFAR-10 setting).
- mahalanobis: Lee et al. 2018, penultimate layer only, no input pre-processing (OpenOOD v1.5's
  `mds`): class means and one tied covariance of the class-centred training features
  (scikit-learn's EmpiricalCovariance, its precision from a pseudo-inverse); confidence =
  -min_c (f - μ_c)ᵀ Σ⁻¹ (f - μ_c).
- mahalanobis_pp: the hyperspherical variant, Mahalanobis++ (Müller & Hein, ICML 2025): the same
  score on L2-normalised features, the class means and tied covariance estimated from the
  normalised training features (features projected onto the unit sphere, where a shared Gaussian
  fits far better than on raw features whose norms vary across classes).
- react: Sun et al. 2021, "ReAct: Out-of-distribution Detection With Rectified Activations".
  Activations are clipped at c, the `ood_react_percentile`-th percentile (90 in the paper) of all
  training activations; the confidence is the energy T·logsumexp(z/T) of the logits computed from
  the clipped features (T = `ood_energy_temperature`, 1 in the paper).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance

from trainables import scores

NAMES = scores.FEATURE_NAMES
# classify(feats [K, B, d]) -> test-time logits [B, C]
ClassifyFn = Callable[[torch.Tensor], torch.Tensor]


def flatten_experts(feats: torch.Tensor) -> torch.Tensor:
    """Returns expert features [K, B, d] as one feature per image [B, K*d] (experts concatenated)."""
    return feats.transpose(0, 1).flatten(1)


def knn_fit(train_feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Returns the bank of L2-normalised training features [N, D]."""
    return {"bank": F.normalize(train_feats.float(), dim=1)}


def knn(feats: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Returns -||z - z_(k)||_2 [B] for normalised features z against the normalised `bank`."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"ood_knn_k={k}; accepted: 1 to the {len(bank)} training images in the bank")
    dist = torch.cdist(F.normalize(feats.float(), dim=1), bank)
    return -dist.topk(k, dim=1, largest=False).values[:, -1]


def gaussian_fit(train_feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Returns class means [C, D] and the precision [D, D] of the tied covariance around them."""
    f = train_feats.double().cpu()
    labels = labels.cpu()
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training image; Mahalanobis needs every class mean")
    means = torch.stack([f[labels == c].mean(0) for c in range(num_classes)])
    centred = (f - means[labels]).numpy()
    precision = EmpiricalCovariance(assume_centered=True).fit(centred).precision_
    device = train_feats.device
    return {"means": means.float().to(device), "precision": torch.from_numpy(precision).float().to(device)}


def mahalanobis(feats: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Returns -min_c (f - μ_c)ᵀ P (f - μ_c) [B] for features [B, D], means [C, D], precision P [D, D]."""
    diff = feats.float().unsqueeze(1) - means                          # [B, C, D]
    dist = torch.einsum("bcd,de,bce->bc", diff, precision, diff)
    return -dist.min(1).values


def react_fit(train_feats: torch.Tensor, percentile: float) -> dict[str, torch.Tensor]:
    """Returns the clipping threshold c: the `percentile`-th percentile of all training activations."""
    if not 0 < percentile <= 100:
        raise ValueError(f"ood_react_percentile={percentile}; accepted: a percentile in (0, 100]")
    c = np.percentile(train_feats.float().cpu().numpy(), percentile)   # numpy: no size limit
    return {"threshold": torch.tensor(float(c), device=train_feats.device)}


def react(feats: torch.Tensor, threshold: torch.Tensor, classify: ClassifyFn,
          temperature: float = 1.0) -> torch.Tensor:
    """Returns the energy of the logits of features [K, B, d] clipped at `threshold` from above."""
    return scores.energy(classify(feats.clamp(max=threshold)), temperature)


def fit(name: str, train_feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
        **params) -> dict[str, torch.Tensor]:
    """Returns detector `name`'s statistics from training features [K, N, d] and labels [N]."""
    flat = flatten_experts(train_feats)
    if name == "knn":
        return knn_fit(flat)
    if name == "mahalanobis":
        return gaussian_fit(flat, labels, num_classes)
    if name == "mahalanobis_pp":
        return gaussian_fit(F.normalize(flat.float(), dim=1), labels, num_classes)
    if name == "react":
        return react_fit(flat, params["percentile"])
    raise ValueError(f"unknown feature-based OOD score {name!r}; expected one of {', '.join(NAMES)}")


def confidence(name: str, state: dict[str, torch.Tensor], feats: torch.Tensor, classify: ClassifyFn,
               **params) -> torch.Tensor:
    """Returns detector `name`'s confidence [B] for features [K, B, d], given its fitted `state`."""
    if name == "knn":
        return knn(flatten_experts(feats), state["bank"], params["k"])
    if name == "mahalanobis":
        return mahalanobis(flatten_experts(feats), state["means"], state["precision"])
    if name == "mahalanobis_pp":
        return mahalanobis(F.normalize(flatten_experts(feats).float(), dim=1), state["means"], state["precision"])
    if name == "react":
        return react(feats, state["threshold"], classify, params.get("temperature", 1.0))
    raise ValueError(f"unknown feature-based OOD score {name!r}; expected one of {', '.join(NAMES)}")
