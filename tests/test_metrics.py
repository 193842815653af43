"""Metrics against hand-computed values (DARL spec §9, items 18-19)."""
import math

import numpy as np
import pytest

from trainables import metrics


def test_auroc_and_group_auroc_hand_values():
    conf_id = np.array([0.9, 0.8, 0.3, 0.6])
    y_id = np.array([0, 1, 8, 9])
    conf_ood = np.array([0.5, 0.1])
    # 7 of 8 (ID, OOD) pairs are ordered correctly: 0.3 < 0.5 is the one miss.
    assert metrics.auroc(conf_id, conf_ood) == pytest.approx(0.875)
    groups = {"head": np.array([0, 1]), "tail": np.array([8, 9])}
    per_group = metrics.per_group_auroc(conf_id, y_id, conf_ood, groups)
    assert per_group == {"auroc_head": pytest.approx(1.0), "auroc_tail": pytest.approx(0.75)}
    # Weighted identity: overall AUROC = ID-count-weighted mean of the group AUROCs.
    assert 0.5 * per_group["auroc_head"] + 0.5 * per_group["auroc_tail"] == pytest.approx(0.875)


def test_fpr95_id_positive_hand_value():
    conf_id = np.arange(1, 21, dtype=float)            # threshold keeps 19 of 20: value 2
    conf_ood = np.array([1.5, 2.5, 30.0, 0.0])         # 2.5 and 30 are accepted
    assert metrics.fpr_at_95_tpr(conf_id, conf_ood) == pytest.approx(0.5)


def test_fpr95_ood_positive_is_the_swapped_convention():
    conf_id = np.arange(1, 21, dtype=float)
    conf_ood = np.array([1.5, 2.5, 30.0, 0.0])
    m = metrics.ood_metrics(conf_id, conf_ood)
    # OOD positive: keep 95% of OOD flagged (ceil(3.8) = 4 -> all, threshold at OOD's max = 30):
    # every ID confidence <= 30 is flagged as OOD, so the ID false-positive rate is 1.
    assert m["fpr95_oodpos"] == pytest.approx(1.0)
    assert m["fpr95_idpos"] == pytest.approx(0.5)


def test_aupr_in_and_out_hand_values():
    conf_id = np.array([0.9, 0.4])
    conf_ood = np.array([0.6, 0.1])
    m = metrics.ood_metrics(conf_id, conf_ood)
    # ID positive, ranked 0.9(ID) 0.6(OOD) 0.4(ID) 0.1: AP = 0.5*1 + 0.5*(2/3).
    assert m["aupr_in"] == pytest.approx(0.5 + 1 / 3)
    # OOD positive, ranked by -conf: 0.1(OOD) 0.4(ID) 0.6(OOD) 0.9: AP = 0.5*1 + 0.5*(2/3).
    assert m["aupr_out"] == pytest.approx(0.5 + 1 / 3)
    assert m["auroc"] == pytest.approx(0.75)


def test_perfect_separation():
    m = metrics.ood_metrics(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0]))
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95_idpos": 0.0, "fpr95_oodpos": 0.0}


def test_class_groups_rank_round_rule():
    c10 = metrics.class_groups([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    assert [list(c10[g]) for g in ("head", "middle", "tail")] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    c100 = metrics.class_groups(list(range(100, 0, -1)))
    assert [len(c100[g]) for g in ("head", "middle", "tail")] == [33, 34, 33]
    # Table 3 regression: DARL's overall AUROC is the 3/4/3-weighted mean of its group AUROCs.
    assert 0.3 * 84.70 + 0.4 * 94.41 + 0.3 * 88.63 == pytest.approx(89.76, abs=0.005)


def test_pascl_shot_groups_give_34_34_32_on_cifar100_ir100():
    counts = [int(500 * 0.01 ** (c / 99)) for c in range(100)]
    g = metrics.pascl_shot_groups(counts)
    assert [len(g[k]) for k in ("head", "middle", "tail")] == [34, 34, 32]


def test_accuracy_by_group_is_mean_of_per_class_accuracy():
    y = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 0, 2, 2])
    groups = {"head": np.array([0, 1]), "middle": np.array([]), "tail": np.array([2])}
    acc = metrics.accuracy_by_group(pred, y, groups)
    assert acc["acc"] == pytest.approx(5 / 8)
    assert acc["acc_head"] == pytest.approx((0.5 + 0.5) / 2)
    assert acc["acc_tail"] == pytest.approx(1.0)
    assert math.isnan(acc["acc_middle"])


def test_threshold_keeps_95_percent():
    conf = np.arange(100, dtype=float)
    t = metrics.threshold_at_tpr(conf, 0.95)
    assert (conf >= t).mean() == pytest.approx(0.95)
