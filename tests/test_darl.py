"""DARL's loss pieces against the spec's hand values (darl.md §9)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables import augment
from trainables.darl import DarlConfig, Method, ala_factor, darl_loss, energy, soft_cross_entropy
from trainables.engine import Batch

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_energy_hand_values():
    assert float(energy(torch.tensor([0.0, 0.0]), 1)) == pytest.approx(-math.log(2), abs=1e-6)
    assert float(energy(torch.tensor([2.0, 0.0, 0.0]), 1)) == pytest.approx(-2.239545, abs=1e-5)
    assert float(energy(torch.tensor([2.0, 0.0, 0.0]), 2)) == pytest.approx(-3.102889, abs=1e-5)
    z = torch.zeros(10)
    z[0] = 30
    assert float(energy(z, 8)) == pytest.approx(-31.5359, abs=1e-4)
    assert float(energy(torch.zeros(10), 8)) == pytest.approx(-8 * math.log(10), abs=1e-4)


def test_ala_factor_hand_values_and_invariants():
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert energy(z, 1).tolist() == pytest.approx([-2.126928, -1.693147, -0.693147], abs=1e-5)
    assert ala_factor(z, 1).tolist() == pytest.approx([1.148421, 1.229025, 1.622554], abs=1e-5)
    assert ala_factor(torch.zeros(4, 3), 1).tolist() == pytest.approx([1.25] * 4)
    e = ala_factor(torch.randn(64, 10) * 10, 8)
    assert float((e - 1).sum()) == pytest.approx(1.0, abs=1e-5)
    assert bool(((e >= 1) & (e < 2)).all())   # float32 rounds tiny shares to exactly 1


def one_expert_cfg(**kw) -> DarlConfig:
    return DarlConfig(num_experts=1, use_aaw=False, **kw)


def test_ala_margin_arithmetic():
    # z = 0, φ = (0.8, 0.2), Ê = 1.5: softmax gives (8/9, 1/9), so CE for y = 1 is ln 9.
    margins = torch.log(torch.tensor([[0.8, 0.2]]))
    adjusted = torch.zeros(1, 2) + 1.5 * margins
    p = adjusted.softmax(-1)
    assert p[0].tolist() == pytest.approx([8 / 9, 1 / 9], abs=1e-6)
    assert float(soft_cross_entropy(adjusted, torch.tensor([[0.0, 1.0]]))) == pytest.approx(2.197225, abs=1e-5)


def test_eq3_soft_target_decomposition():
    z = torch.tensor([[1.0, 0.0, -1.0]])
    loss = soft_cross_entropy(z, torch.tensor([[0.3, 0.0, 0.7]]))
    assert float(loss) == pytest.approx(1.807606, abs=1e-5)
    assert float(loss) == pytest.approx(0.3 * 0.407606 + 0.7 * 2.407606, abs=1e-5)


def test_ala_off_equals_plain_logit_adjusted_ce():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 3) * 3
    q = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    margins = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    ones = torch.ones(6)
    loss, _ = darl_loss(logits, q, margins, [], one_expert_cfg(use_ala=False), ones)
    expected = F.cross_entropy(logits[0] + margins[0], q.argmax(1))
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


def test_detached_ala_gradient():
    # With Ê detached, ∂loss/∂z = (softmax(z + Ê·T) − q) / M for K = 1 without AAW.
    torch.manual_seed(1)
    z = (torch.randn(1, 5, 4) * 2).requires_grad_(True)
    q = F.one_hot(torch.tensor([0, 1, 2, 3, 0]), 4).float()
    margins = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    loss, _ = darl_loss(z, q, margins, [], one_expert_cfg(tau_energy=2.0), torch.ones(5))
    loss.backward()
    ehat = ala_factor(z[0].detach(), 2.0)
    expected = ((z[0].detach() + ehat[:, None] * margins).softmax(-1) - q) / 5
    assert torch.allclose(z.grad[0], expected, atol=1e-6)


def test_mixup_two_hot_label():
    qa, qb = F.one_hot(torch.tensor([0]), 3).float(), F.one_hot(torch.tensor([2]), 3).float()
    _, q = augment.mixup(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2), qa, qb, 0.3)
    assert q[0].tolist() == pytest.approx([0.3, 0.0, 0.7])
    _, same = augment.mixup(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2), qa, qa, 0.3)
    assert same[0].tolist() == pytest.approx([1.0, 0.0, 0.0])


class FixedCentre(np.random.RandomState):
    def __init__(self, cy, cx):
        super().__init__(0)
        self.centre = [cy, cx]

    def randint(self, *args, **kwargs):
        return self.centre.pop(0)


def test_cutmix_area_correction():
    ones, zeros = torch.ones(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    qa, qb = F.one_hot(torch.tensor([0]), 3).float(), F.one_hot(torch.tensor([2]), 3).float()
    x, _, lam = augment.cutmix(ones, zeros, qa, qb, augment.cutmix_box(32, 32, 0.75, FixedCentre(16, 16)))
    assert lam == 0.75
    x, q, lam = augment.cutmix(ones, zeros, qa, qb, augment.cutmix_box(32, 32, 0.75, FixedCentre(0, 0)))
    assert lam == 0.9375
    assert q[0].tolist() == pytest.approx([0.9375, 0.0, 0.0625])
    assert float(x.mean()) == pytest.approx(lam)


def test_batch_assembly_rows_and_targets():
    b = 8
    method = Method(DarlConfig(), CIFAR10_IR100, torch.device("cpu"))
    batch = Batch(torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,)),
                  torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,)))
    x, q, weight, clean = method.compose(batch, np.random.RandomState(0))
    assert x.shape == (4 * b, 3, 32, 32) and q.shape == (4 * b, 10)
    assert torch.allclose(q.sum(1), torch.ones(4 * b))
    assert bool((q[:2 * b].max(1).values == 1).all())
    assert clean.tolist() == [True] * (2 * b) + [False] * (2 * b)
    assert weight.tolist() == [1.0] * (4 * b)


def test_lgla_ablation_row_has_no_balanced_stream():
    method = Method(DarlConfig(use_mixup=False, use_cutmix=False), CIFAR10_IR100, torch.device("cpu"))
    assert not method.uses_balanced_stream


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = DarlConfig()
    method = Method(cfg, CIFAR10_IR100, torch.device("cpu"))
    model = method.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)),
                  torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    x, q, weight, clean = method.compose(batch, np.random.RandomState(0))
    model.train()

    def loss_now():
        logits, _ = model(x)
        return darl_loss(logits, q, method.margins, method.bands, cfg, weight, clean)[0]
    before = loss_now()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert float(loss_now().detach()) < float(before.detach())


def test_lr_schedule():
    cfg = DarlConfig()
    assert [cfg.lr_at(e) for e in (0, 4, 5, 319, 320, 359, 360, 399)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    linear = DarlConfig(warmup_method="linear")
    assert [linear.lr_at(e) for e in range(5)] == pytest.approx(
        [0.033333, 0.046667, 0.06, 0.073333, 0.086667], abs=1e-5)


def test_crop_flip_keeps_pixels_and_shapes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment.crop_flip_cutout(x, gen, cutout=0)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # With zero padding, every output pixel is either padding (0) or one of the input pixels.
    for i in range(16):
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0}


def test_ambiguity_stats_hand_values():
    from trainables.darl import ambiguity_stats
    ehat = torch.tensor([1.5, 1.1, 1.2, 1.2])             # M = 4: shares 2.0, 0.4, 0.8, 0.8
    group = torch.tensor([0, 0, 2, 1])
    clean = torch.tensor([True, True, False, False])
    stats = ambiguity_stats(ehat, group, clean)
    assert float(stats["ehat_max"]) == pytest.approx(1.5)
    assert float(stats["ehat_share_clean_head"]) == pytest.approx((2.0 + 0.4) / 2)
    assert float(stats["ehat_share_mixed_tail"]) == pytest.approx(0.8)
    assert float(stats["ehat_share_clean_tail"]) == 0.0     # no such rows


def test_method_loss_reports_group_diagnostics():
    method = Method(DarlConfig(), CIFAR10_IR100, torch.device("cpu"))
    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)),
                  torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    loss, stats = method.loss(method.build_model(), batch, np.random.RandomState(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"ehat_max", "ehat_share_clean_head", "ehat_share_mixed_tail"} <= set(stats)
