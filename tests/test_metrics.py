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
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95_idpos": 0.0, "fpr95_oodpos": 0.0,
                 "fpr95_idpos_oe": 0.0, "fpr95_oodpos_oe": 0.0}


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


# Heavily tied MSP scores: 50 ID images (20 at 1.0, 27 at 0.9, 3 at 0.5) and 50 OOD images
# (3 at 1.0, 22 at 0.9, 25 at 0.5).
TIED_ID = np.array([1.0] * 20 + [0.9] * 27 + [0.5] * 3)
TIED_OOD = np.array([1.0] * 3 + [0.9] * 22 + [0.5] * 25)


def test_reference_fpr95_tie_rule_id_positive_hand_value():
    # Thresholds at the distinct values 1.0, 0.9, 0.5 keep 20, 47, 50 ID (recall .40, .94, 1.0)
    # and accept 3, 25, 50 OOD. Nearest recall to .95 is .94 (|-.01| < |.05|): threshold 0.9, and
    # the 22 OOD tied at 0.9 count as accepted: FPR = 25 / 50 = 0.5.
    assert metrics.fpr_at_recall_reference(TIED_ID, TIED_OOD) == pytest.approx(0.5)
    # The ceil rule keeps >= 95%: the ceil(47.5) = 48th largest ID is 0.5, which accepts all OOD.
    assert metrics.fpr_at_95_tpr(TIED_ID, TIED_OOD) == pytest.approx(1.0)


def test_reference_fpr95_tie_rule_ood_positive_hand_value():
    # OOD positive, score = -confidence. Thresholds -0.5, -0.9, -1.0 catch 25, 47, 50 OOD (recall
    # .5, .94, 1.0) and flag 3, 30, 50 ID. Nearest .95 is .94 at -0.9: the 27 ID tied at 0.9 are
    # flagged with the 3 at 0.5: FPR = 30 / 50 = 0.6. The ceil rule needs 48 OOD: all 50 ID, 1.0.
    m = metrics.ood_metrics(TIED_ID, TIED_OOD)
    assert m["fpr95_oodpos_oe"] == pytest.approx(0.6)
    assert m["fpr95_oodpos"] == pytest.approx(1.0)
    assert m["fpr95_idpos_oe"] == pytest.approx(0.5)
    assert m["fpr95_idpos"] == pytest.approx(1.0)


def test_reference_fpr95_without_ties_picks_the_lower_threshold_on_equal_distance():
    # ID 1..20 (positives), OOD [1.5, 2.5, 30, 0]. Walking up from the threshold 1 (recall 1.0):
    # 1.5 (19/20 = .95), 2 (.95), 2.5 (.90) ... the first exact .95 is the lower threshold 1.5,
    # which accepts 1.5, 2.5 and 30: 3 / 4. The ceil rule's threshold is the ID value 2: 2 / 4.
    conf_id, conf_ood = np.arange(1, 21, dtype=float), np.array([1.5, 2.5, 30.0, 0.0])
    assert metrics.fpr_at_recall_reference(conf_id, conf_ood) == pytest.approx(0.75)
    assert metrics.fpr_at_95_tpr(conf_id, conf_ood) == pytest.approx(0.5)


def test_reference_fpr95_rejects_an_empty_side():
    with pytest.raises(ValueError, match="0 negatives"):
        metrics.fpr_at_recall_reference(np.ones(3), np.ones(0))
