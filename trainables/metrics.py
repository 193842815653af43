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
  catches 95% of OOD. Both put the threshold at the ceil(0.95 n)-th largest positive score, so at
  least 95% of positives are kept, and count a negative tied with the threshold as accepted.
- `fpr95_idpos_oe` / `fpr95_oodpos_oe`: the same two conventions under the tie rule of the
  reference `fpr_and_fdr_at_recall` (outlier-exposure code, copied by PASCL, RNA and their
  descendants): thresholds only at distinct score values, the one whose recall is *nearest* 0.95
  (possibly below it; the lower threshold wins an exact tie), every sample tied with it counted as
  accepted. Papers from that lineage report these numbers.
- Head/middle/tail groups follow the DARL spec's rank rule: classes sorted by training count,
  head = first round(C/3), middle = up to round(2C/3), tail = the rest (CIFAR-10: 3/4/3).
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

GROUP_RULE = "rank_round: classes by train count desc; head=first round(C/3), middle to round(2C/3)"
FPR_CONVENTIONS = ("fpr95_idpos: OOD accepted at 95% ID kept; fpr95_oodpos: ID flagged at 95% OOD caught; "
                   "threshold = ceil(0.95n)-th largest positive; *_oe: same with the reference "
                   "fpr_and_fdr_at_recall tie rule (distinct thresholds, recall nearest 0.95)")
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
        "fpr95_idpos_oe": fpr_at_recall_reference(conf_id, conf_ood),
        "fpr95_oodpos_oe": fpr_at_recall_reference(-conf_ood, -conf_id),
    }


def fpr_at_recall_reference(pos: np.ndarray, neg: np.ndarray, recall_level: float = 0.95) -> float:
    """Returns the fraction of negatives accepted at the reference `fpr_and_fdr_at_recall` cutoff.

    Scores are higher for positives. Thresholds are the distinct score values, taken in
    descending order; at each, the positives and negatives at or above it are counted (a tie at
    the threshold is accepted). From the lowest threshold that keeps every positive upwards, the
    first threshold whose recall is nearest `recall_level` is the cutoff, so the recall used can
    be below `recall_level`. With pos = ID confidences this is the ID-positive convention; with
    pos = -OOD confidences, neg = -ID confidences the OOD-positive one.
    """
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"fpr_at_recall_reference: {len(pos)} positives and {len(neg)} negatives; "
                         "accepted: at least one of each")
    scores = np.r_[pos, neg]
    is_pos = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, is_pos = scores[order], is_pos[order]
    # The last index of each run of tied scores, so a threshold takes its whole run.
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(is_pos, dtype=np.float64)[ends]
    fps = 1 + ends - tps
    recall = tps / tps[-1]
    last = int(np.searchsorted(tps, tps[-1]))   # first threshold that keeps every positive
    # Walk from that threshold to the highest one; the reference then appends (recall 1, fps 0).
    recall = np.r_[recall[last::-1], 1.0]
    fps = np.r_[fps[last::-1], 0.0]
    cutoff = int(np.argmin(np.abs(recall - recall_level)))
    return float(fps[cutoff] / len(neg))


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
