"""CE, LA, OE (and LA+OE) and Energy-OE against hand values (rna.md §8 items 1-5, Liu et al. 2020)."""
import math

import numpy as np
import pytest
import torch

from trainables import augment, losses, scores
from trainables.baselines import (BaselineConfig, CrossEntropy, EnergyOE, EnergyOeConfig, LaConfig,
                                  LogitAdjustment, OeConfig, OutlierExposure, imbalance_loss,
                                  prior_outlier_loss)
from trainables.engine import Batch

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
THREE = [6, 3, 1]                       # π = (0.6, 0.3, 0.1)
CPU = torch.device("cpu")


def lse(z):
    z = np.asarray(z, dtype=np.float64)
    return z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))


def engine_batch(b=4, m=8, c=10, seed=0, method=None, size=16):
    """A batch as the engine builds it: uint8 images through the method's train transform
    (16 px by default: ResNet-32 pools globally, and the CPU budget of the tests is small)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b + m, 3, size, size), dtype=torch.uint8, generator=gen)
    transform = method.train_transform if method else (lambda x, g: x.float() / 255)
    return Batch(transform(images[:b], gen), torch.randint(0, c, (b,), generator=gen),
                 x_out=transform(images[b:], gen), index=torch.arange(b))


def test_cross_entropy_hand_values():
    method = CrossEntropy(BaselineConfig(), THREE, CPU)
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # row 1: log(e² + 2) − 2 = 0.239545; row 2: log 3
    assert float(method.id_loss(z, torch.tensor([0, 2]))) == pytest.approx((0.239545 + math.log(3)) / 2, abs=1e-6)


def test_logit_adjustment_hand_values():
    prior_log = losses.log_prior(THREE)
    y = torch.tensor([2])
    # z = 0, τ = 1: softmax(log π) = π, so the loss is −log 0.1
    assert float(imbalance_loss("la", torch.zeros(1, 3), y, prior_log, 1.0)) == pytest.approx(math.log(10), abs=1e-5)
    # τ = 2: softmax ∝ π² = (0.36, 0.09, 0.01), so −log(0.01 / 0.46) = log 46
    assert float(imbalance_loss("la", torch.zeros(1, 3), y, prior_log, 2.0)) == pytest.approx(math.log(46), abs=1e-5)
    # "ce" ignores τ
    assert float(imbalance_loss("ce", torch.zeros(1, 3), y, prior_log, 2.0)) == pytest.approx(math.log(3), abs=1e-6)
    z = np.array([[1.0, -0.5, 2.0]])
    expected = lse(z + 0.7 * np.log([0.6, 0.3, 0.1])) - (z[0, 0] + 0.7 * np.log(0.6))
    method = LogitAdjustment(LaConfig(tau=0.7), THREE, CPU)
    assert float(method.id_loss(torch.tensor(z, dtype=torch.float32), torch.tensor([0]))) == pytest.approx(float(expected[0]), abs=1e-5)


def test_la_at_tau_zero_equals_ce():
    torch.manual_seed(0)
    ce, la = CrossEntropy(BaselineConfig(), CIFAR10_IR100, CPU), LogitAdjustment(LaConfig(tau=0.0), CIFAR10_IR100, CPU)
    model = ce.build_model()
    batch = engine_batch(method=ce)
    rng = np.random.RandomState(0)
    with torch.no_grad():
        ce_loss = float(ce.loss(model, batch, rng)[0])
        assert float(la.loss(model, batch, rng)[0]) == pytest.approx(ce_loss, abs=1e-6)
        la_loss = float(LogitAdjustment(LaConfig(), CIFAR10_IR100, CPU).loss(model, batch, rng)[0])
    assert la_loss != pytest.approx(ce_loss, abs=1e-3)


def test_outlier_exposure_to_uniform_hand_values():
    # logsumexp(2, 0, 0) − mean(2, 0, 0) = 2.239545 − 0.666667
    assert float(losses.outlier_exposure_loss(torch.tensor([[2.0, 0.0, 0.0]]))) == pytest.approx(1.572879, abs=1e-5)
    assert float(losses.outlier_exposure_loss(torch.zeros(4, 10))) == pytest.approx(math.log(10), abs=1e-6)  # its minimum
    # prior target: logsumexp − Σ π z = 2.239545 − 0.6·2
    assert float(prior_outlier_loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0.6, 0.3, 0.1]))) == pytest.approx(1.039545, abs=1e-5)
    z = torch.randn(5, 3)
    assert float(prior_outlier_loss(z, torch.full((3,), 1 / 3))) == pytest.approx(float(losses.outlier_exposure_loss(z)), abs=1e-6)


def test_oe_total_is_id_plus_lambda_times_outlier_term():
    torch.manual_seed(1)
    method = OutlierExposure(OeConfig(lambda_oe=0.25), CIFAR10_IR100, CPU)
    model = method.build_model()
    with torch.no_grad():
        loss, stats = method.loss(model, engine_batch(method=method), np.random.RandomState(0))
        la_oe = OutlierExposure(OeConfig(imbalance_loss="la", oe_target="prior"), CIFAR10_IR100, CPU)
        assert torch.isfinite(la_oe.loss(model, engine_batch(method=la_oe), np.random.RandomState(0))[0])
    assert float(loss) == pytest.approx(float(stats["l_id"] + 0.25 * stats["l_oe"]), abs=1e-5)
    assert float(stats["l_oe"]) >= math.log(10) - 1e-5    # CE to uniform is at least log C


def test_energy_margin_hinge_cases():
    m_in, m_out = -23.0, -5.0
    confident = torch.zeros(1, 10)
    confident[0, 0] = 30.0                                 # E ≈ −30 < m_in: no ID penalty
    flat = torch.zeros(1, 10)                              # E = −log 10 ≈ −2.3: above m_in and m_out
    peaked = torch.zeros(1, 10)
    peaked[0, 0] = 10.0                                    # E ≈ −10.0004 < m_out: outlier penalised
    e_flat, e_peaked = -lse(np.zeros(10)), -lse(np.r_[10.0, np.zeros(9)])
    assert float(losses.energy_margin_loss(confident, flat, m_in, m_out)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.energy_margin_loss(flat, flat, m_in, m_out)) == pytest.approx((e_flat - m_in) ** 2, rel=1e-5)
    assert float(losses.energy_margin_loss(confident, peaked, m_in, m_out)) == pytest.approx((m_out - e_peaked) ** 2, rel=1e-5)
    both = losses.energy_margin_loss(torch.cat([confident, flat]), torch.cat([flat, peaked]), m_in, m_out)
    assert float(both) == pytest.approx(((e_flat - m_in) ** 2 + (m_out - e_peaked) ** 2) / 2, rel=1e-5)
    assert float(scores.energy(peaked)[0]) == pytest.approx(-e_peaked, abs=1e-4)   # score = −E


def test_energy_oe_defaults_and_total():
    assert EnergyOE(EnergyOeConfig(), CIFAR10_IR100, CPU).m_in == -23.0
    assert EnergyOE(EnergyOeConfig(dataset="cifar100"), [500] * 100, CPU).m_in == -27.0
    assert EnergyOE(EnergyOeConfig(m_in=-20.0), CIFAR10_IR100, CPU).m_in == -20.0
    torch.manual_seed(2)
    method = EnergyOE(EnergyOeConfig(lambda_energy=0.3), CIFAR10_IR100, CPU)
    with torch.no_grad():
        loss, stats = method.loss(method.build_model(), engine_batch(method=method), np.random.RandomState(0))
    assert float(loss) == pytest.approx(float(stats["l_id"] + 0.3 * stats["l_energy"]), rel=1e-5)


def test_recipe_and_scores():
    cfg = BaselineConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.outlier_batch_size, cfg.nesterov, cfg.weight_decay) == (200, 128, 512, False, 2e-4)
    assert BaselineConfig(batch_size=16).outlier_batch_size == 64
    assert BaselineConfig(batch_size=16, outlier_batch_size=16).outlier_batch_size == 16
    assert [c().ood_score for c in (BaselineConfig, LaConfig, OeConfig, EnergyOeConfig)] == ["msp", "msp", "msp", "energy"]
    assert not CrossEntropy.uses_outliers and not LogitAdjustment.uses_outliers
    assert OutlierExposure.uses_outliers and EnergyOE.uses_outliers
    with pytest.raises(ValueError, match="imbalance_loss='ldam'"):
        OeConfig(imbalance_loss="ldam")
    with pytest.raises(ValueError, match="outlier_ratio"):
        BaselineConfig(outlier_ratio=0)


def test_lr_schedule_of_the_recipe():
    # Spec checklist 5: 0.02 … 0.1 over epochs 0-4, 0.1 to 159, 1e-3 on 160-179, 1e-5 on 180-199.
    cfg = BaselineConfig()
    epochs = [0, 1, 2, 3, 4, 5, 159, 160, 179, 180, 199]
    assert [cfg.lr_at(e) for e in epochs] == pytest.approx(
        [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1, 1e-3, 1e-3, 1e-5, 1e-5])
    assert BaselineConfig(warmup_method="constant").lr_at(0) == pytest.approx(0.01)


def test_train_transform_has_no_cutout():
    method = CrossEntropy(BaselineConfig(), THREE, CPU)
    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    out = method.train_transform(white, torch.Generator().manual_seed(0))
    # A 4-px crop shift can only bring padding into the outer 4 px; cutout would hole the centre.
    assert torch.equal(out[:, :, 4:28, 4:28], augment.normalize(white)[:, :, 4:28, 4:28])


@pytest.mark.parametrize("method_cls,cfg", [(CrossEntropy, BaselineConfig()), (LogitAdjustment, LaConfig()),
                                            (OutlierExposure, OeConfig()), (EnergyOE, EnergyOeConfig())])
def test_a_few_sgd_steps_lower_the_loss(method_cls, cfg):
    torch.manual_seed(0)
    method = method_cls(cfg, CIFAR10_IR100, CPU)
    model = method.build_model().train()
    batch = engine_batch(method=method)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []
    for _ in range(2):
        loss, stats = method.loss(model, batch, np.random.RandomState(0))
        assert loss.ndim == 0 and torch.isfinite(loss) and all(v.ndim == 0 for v in stats.values())
        history.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        history.append(float(method.loss(model, batch, np.random.RandomState(0))[0]))
    assert history[-1] < history[0]


def test_loss_on_an_engine_shaped_batch():
    torch.manual_seed(0)
    method = OutlierExposure(OeConfig(), CIFAR10_IR100, CPU)
    batch = engine_batch(b=4, m=4, method=method, size=32)
    assert batch.x.shape == (4, 3, 32, 32) and batch.x.dtype == torch.float32
    with torch.no_grad():
        loss, stats = method.loss(method.build_model(), batch, np.random.RandomState(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and set(stats) == {"l_id", "l_oe"}
