"""Classification and OOD-detection metrics, with their conventions spelled out.

Conventions used everywhere in tailtune:
- An OOD *confidence* is higher for in-distribution (ID) inputs. Every function here takes
  confidences; the user-facing `ood_score` of a registered model is its negation.
- AUROC is the same whichever class is called positive.
- AUPR-in treats ID as positive (score = confidence); AUPR-out treats OOD as positive
  (score = -confidence). Both are average precision (step-wise), as in scikit-learn.
- FPR95 comes in two conventions, both reported and named:
  `fpr95_idpos` (OpenOOD v1 / ODIN / DARL): fraction of OOD accepted at the threshold that keeps
  95% of ID; `fpr95_oodpos` (PASCL / OpenOOD v1.5): fraction of ID flagged at the threshold that
  catches 95% of OOD.
- Head/middle/tail groups follow the DARL spec's rank rule: classes sorted by training count,
  head = first round(C/3), middle = up to round(2C/3), tail = the rest (CIFAR-10: 3/4/3).
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

GROUP_RULE = "rank_round: classes by train count desc; head=first round(C/3), middle to round(2C/3)"
FPR_CONVENTIONS = "fpr95_idpos: OOD accepted at 95% ID kept; fpr95_oodpos: ID flagged at 95% OOD caught"
AUPR_CONVENTION = "average precision; aupr_in: ID positive, aupr_out: OOD positive"


def class_groups(counts: list[int]) -> dict[str, np.ndarray]:
    """Returns {"head", "middle", "tail"} -> class indices, by the rank_round rule."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    n = len(counts)
    h, t = round(n / 3), round(2 * n / 3)
    return {"head": order[:h], "middle": order[h:t], "tail": order[t:]}


def pascl_shot_groups(counts: list[int]) -> dict[str, np.ndarray]:
    """Returns the PASCL/COCL `shot_acc` split (thresholds at ranks int(0.34C), int(0.67C))."""
    c = np.asarray(counts)
    ranked = np.sort(c)[::-1]
    many, few = ranked[int(0.34 * len(c))], ranked[int(0.67 * len(c))]
    idx = np.arange(len(c))
    return {"head": idx[c > many], "middle": idx[(c <= many) & (c >= few)], "tail": idx[c < few]}


def accuracy_by_group(pred: np.ndarray, y: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Returns top-1 `acc` and `acc_<group>` (mean of per-class accuracies within the group)."""
    pred, y = np.asarray(pred), np.asarray(y)
    out = {"acc": float((pred == y).mean())}
    for g, classes in groups.items():
        per_class = [float((pred[y == c] == c).mean()) for c in classes if (y == c).any()]
        out[f"acc_{g}"] = float(np.mean(per_class)) if per_class else math.nan
    return out


def auroc(conf_id: np.ndarray, conf_ood: np.ndarray) -> float:
    """Returns the area under the ROC curve of ID (positive) vs OOD by confidence."""
    labels = np.r_[np.ones(len(conf_id)), np.zeros(len(conf_ood))]
    return float(roc_auc_score(labels, np.r_[conf_id, conf_ood]))


def fpr_at_95_tpr(conf_id: np.ndarray, conf_ood: np.ndarray) -> float:
    """Returns the fraction of OOD accepted at the threshold keeping 95% of ID (ID positive).

    Threshold = the ceil(0.95 n_id)-th largest ID confidence; OOD at or above it count as accepted.
    """
    return float((np.asarray(conf_ood) >= threshold_at_tpr(conf_id, 0.95)).mean())


def ood_metrics(conf_id: np.ndarray, conf_ood: np.ndarray) -> dict[str, float]:
    """Returns auroc, aupr_in, aupr_out, fpr95_idpos, fpr95_oodpos for one ID/OOD pair."""
    conf_id, conf_ood = np.asarray(conf_id, np.float64), np.asarray(conf_ood, np.float64)
    labels = np.r_[np.ones(len(conf_id)), np.zeros(len(conf_ood))]
    scores = np.r_[conf_id, conf_ood]
    return {
        "auroc": auroc(conf_id, conf_ood),
        "aupr_in": float(average_precision_score(labels, scores)),
        "aupr_out": float(average_precision_score(1 - labels, -scores)),
        "fpr95_idpos": fpr_at_95_tpr(conf_id, conf_ood),
        # OOD-positive: the roles swap and the score is negated.
        "fpr95_oodpos": fpr_at_95_tpr(-conf_ood, -conf_id),
    }


def per_group_auroc(conf_id: np.ndarray, y_id: np.ndarray, conf_ood: np.ndarray,
                    groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Returns `auroc_<group>`: ID test samples whose TRUE label is in the group vs all OOD."""
    out = {}
    for g, classes in groups.items():
        mask = np.isin(y_id, classes)
        out[f"auroc_{g}"] = auroc(conf_id[mask], conf_ood) if mask.any() else math.nan
    return out


def threshold_at_tpr(conf_id: np.ndarray, tpr: float = 0.95) -> float:
    """Returns the confidence threshold that keeps `tpr` of the given ID confidences."""
    ranked = np.sort(np.asarray(conf_id))[::-1]
    return float(ranked[math.ceil(tpr * len(ranked)) - 1])
