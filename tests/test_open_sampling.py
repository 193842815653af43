"""Open-sampling's pieces against the spec's hand values and checklist (open_sampling.md §3.3-3.8, §10)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables.baselines import CrossEntropy, LaConfig, LogitAdjustment, joint_logits
from trainables.engine import Batch
from trainables.open_sampling import (Method, OpenSamplingConfig, class_prior, class_weights,
                                      complementary_distribution, label_distribution,
                                      open_sampling_regulariser, sample_open_labels)

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CPU = torch.device("cpu")
# Spec §3.3's table for CIFAR-10-LT IR100 (6 decimals).
GAMMA_DEFAULT = [0.001313, 0.053893, 0.085420, 0.104295, 0.115635, 0.122408, 0.126477, 0.128918,
                 0.130388, 0.131254]
GAMMA_MCD = [0.0, 0.053280, 0.085226, 0.104352, 0.115843, 0.122706, 0.126829, 0.129303, 0.130792,
             0.131670]


def test_gamma_hand_examples():
    # K = 3, β = (0.6, 0.3, 0.1): default α = 0.7, Kα − 1 = 1.1, Γ = (0.1, 0.4, 0.6) / 1.1
    assert complementary_distribution([6, 3, 1]) == pytest.approx([1 / 11, 4 / 11, 6 / 11])
    assert class_weights(complementary_distribution([6, 3, 1])) == pytest.approx([3 / 11, 12 / 11, 18 / 11])
    # K = 2, β = (0.75, 0.25): default α = 1 gives Γ = (0.25, 0.75); the MCD (α = 0.75) puts all on the tail
    assert complementary_distribution([3, 1]) == pytest.approx([0.25, 0.75])
    assert label_distribution([3, 1], "mcd") == pytest.approx([0.0, 1.0])
    assert complementary_distribution([6, 3, 1], alpha=2.0) == pytest.approx([1.4 / 5, 1.7 / 5, 1.9 / 5])


def test_gamma_and_omega_for_cifar10_lt_ir100():
    beta = class_prior(CIFAR10_IR100)
    alpha = beta.max() + beta.min()
    assert alpha == pytest.approx(0.407061, abs=1e-6)
    assert 10 * alpha - 1 == pytest.approx(3.070611, abs=1e-6)
    gamma = complementary_distribution(CIFAR10_IR100)
    assert gamma == pytest.approx(GAMMA_DEFAULT, abs=1e-5)
    assert gamma.sum() == pytest.approx(1.0, abs=1e-12)
    omega = class_weights(gamma)
    assert omega.sum() == pytest.approx(10.0, abs=1e-9)
    assert omega[[0, 1, 9]] == pytest.approx([0.01313, 0.5389, 1.3125], abs=1e-4)
    assert 512 * gamma[[0, 9]] == pytest.approx([0.67, 67.2], abs=0.01)   # expected labels per batch of 512


def test_mcd_zero_head_mass_and_exact_rebalancing():
    mcd = label_distribution(CIFAR10_IR100, "mcd")
    assert mcd[0] == 0.0 and mcd == pytest.approx(GAMMA_MCD, abs=1e-5)
    # M' = K·n_max − N outliers labelled by the MCD fill every class to exactly n_max.
    n = np.asarray(CIFAR10_IR100, dtype=float)
    extra = 10 * 5000 - n.sum()
    assert extra == 37_594
    assert n + extra * mcd == pytest.approx(np.full(10, 5000.0))


def test_gamma_limits_and_errors():
    assert complementary_distribution(CIFAR10_IR100, alpha=1e6) == pytest.approx(np.full(10, 0.1), abs=1e-5)
    assert complementary_distribution(CIFAR10_IR100, alpha=5.0).min() == pytest.approx(0.0938, abs=1e-4)
    assert complementary_distribution(CIFAR10_IR100, alpha=5.0).max() == pytest.approx(0.1020, abs=1e-4)
    with pytest.raises(ValueError, match="alpha=0.3 is below max_j beta_j"):
        complementary_distribution(CIFAR10_IR100, alpha=0.3)
    # balanced data: the MCD is 0/0, and falls back to uniform (spec A14)
    assert label_distribution([5, 5, 5, 5], "mcd") == pytest.approx([0.25] * 4)
    assert complementary_distribution([5, 5, 5, 5]) == pytest.approx([0.25] * 4)


def test_ablation_distributions():
    cb = label_distribution(CIFAR10_IR100, "cb", cb_beta=0.9999)
    assert cb == pytest.approx([0.0051, 0.0077, 0.0121, 0.0195, 0.0319, 0.0525, 0.0868, 0.1443, 0.2409, 0.3993],
                               abs=1e-4)
    assert label_distribution(CIFAR10_IR100, "original") == pytest.approx(class_prior(CIFAR10_IR100))
    assert label_distribution(CIFAR10_IR100, "uniform") == pytest.approx([0.1] * 10)
    assert label_distribution(CIFAR10_IR100, "single:9").tolist() == [0.0] * 9 + [1.0]
    with pytest.raises(ValueError, match="single:10"):
        label_distribution(CIFAR10_IR100, "single:10")


def test_open_labels_follow_gamma():
    gamma = complementary_distribution(CIFAR10_IR100)
    labels = sample_open_labels(torch.as_tensor(gamma), 1_000_000, torch.Generator().manual_seed(0))
    assert labels.dtype == torch.int64
    assert np.bincount(labels.numpy(), minlength=10) / len(labels) == pytest.approx(gamma, abs=0.002)
    gen = torch.Generator().manual_seed(1)   # dynamic labels: every batch gets fresh ones
    assert not torch.equal(sample_open_labels(torch.as_tensor(gamma), 64, gen),
                           sample_open_labels(torch.as_tensor(gamma), 64, gen))


def test_regulariser_hand_values():
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 1])
    omega = torch.tensor([0.5, 1.5])
    ce = np.array([np.log1p(np.exp(2.0)), np.log(2.0)])        # 2.126928, 0.693147
    assert float(open_sampling_regulariser(z, labels, omega, "weight_sum")) == pytest.approx(ce.mean(), abs=1e-6)
    assert float(open_sampling_regulariser(z, labels, omega, "batch_mean")) == pytest.approx(1.5 * ce.mean(), abs=1e-6)
    torch.manual_seed(0)
    z, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    omega = torch.as_tensor(class_weights(complementary_distribution(CIFAR10_IR100)), dtype=torch.float32)
    assert float(open_sampling_regulariser(z, labels, omega)) == pytest.approx(
        float(F.cross_entropy(z, labels, weight=omega)), abs=1e-6)
    assert float(open_sampling_regulariser(z, labels, torch.ones(10))) == pytest.approx(
        float(F.cross_entropy(z, labels)), abs=1e-6)


def small_batch(method, b=4, m=8, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b + m, 3, size, size), dtype=torch.uint8, generator=gen)
    return Batch(method.train_transform(images[:b], gen), torch.randint(0, 10, (b,), generator=gen),
                 x_out=method.train_transform(images[b:], gen), index=torch.arange(b))


def test_config_defaults_and_errors():
    cfg = OpenSamplingConfig()
    assert (cfg.eta, cfg.label_dist, cfg.alpha, cfg.use_weight, cfg.reg_norm, cfg.ood_score) == (
        1.0, "complementary", None, True, "weight_sum", "msp")
    assert cfg.outlier_batch_size == 512 and Method.uses_outliers
    assert Method(OpenSamplingConfig(use_weight=False), CIFAR10_IR100, CPU).omega.tolist() == [1.0] * 10
    scaled = Method(OpenSamplingConfig(alpha_scale=1.0), CIFAR10_IR100, CPU).gamma
    assert scaled == pytest.approx(GAMMA_MCD, abs=1e-5)                 # α = max β is the MCD
    for bad, match in [({"label_dist": "zipf"}, "label_dist='zipf'"), ({"reg_norm": "sum"}, "reg_norm='sum'"),
                       ({"alpha_scale": 0.5}, "alpha_scale=0.5"), ({"alpha": 1.0, "alpha_scale": 2.0}, "at most one"),
                       ({"label_dist": "mcd", "alpha": 1.0}, "complementary"), ({"imbalance_loss": "ldam"}, "ldam")]:
        with pytest.raises(ValueError, match=match):
            OpenSamplingConfig(**bad)
    with pytest.raises(ValueError, match="alpha=0.2 is below"):
        Method(OpenSamplingConfig(alpha=0.2), CIFAR10_IR100, CPU)


def test_eta_scales_the_regulariser_and_zero_eta_is_the_host_loss():
    torch.manual_seed(0)
    method = Method(OpenSamplingConfig(), CIFAR10_IR100, CPU)
    model = method.build_model()
    batch = small_batch(method)
    out = {}
    with torch.no_grad():
        for eta in (0.0, 1.0, 2.5):
            method.cfg.eta = eta
            out[eta] = method.loss(model, batch, np.random.RandomState(7))   # same labels each time
    l_reg = float(out[1.0][1]["l_reg"])
    assert float(out[0.0][0]) == pytest.approx(float(out[0.0][1]["l_imb"]), abs=1e-6)
    assert float(out[2.5][0]) - float(out[0.0][0]) == pytest.approx(2.5 * l_reg, rel=1e-5)
    assert float(out[1.0][0]) - float(out[0.0][0]) == pytest.approx(l_reg, rel=1e-5)


def test_zero_eta_matches_the_host_method_in_eval_mode():
    # In eval mode BatchNorm uses running statistics, so the joint forward's ID rows equal a
    # forward of the ID batch alone: L_imb must then be the host method's own loss.
    torch.manual_seed(0)
    host_ce, host_la = CrossEntropy(LaConfig(), CIFAR10_IR100, CPU), LogitAdjustment(LaConfig(), CIFAR10_IR100, CPU)
    model = host_ce.build_model().eval()
    batch = small_batch(host_ce)
    rng = np.random.RandomState(0)
    with torch.no_grad():
        for kind, host in (("ce", host_ce), ("la", host_la)):
            method = Method(OpenSamplingConfig(eta=0.0, imbalance_loss=kind), CIFAR10_IR100, CPU)
            assert float(method.loss(model, batch, rng)[0]) == pytest.approx(float(host.loss(model, batch, rng)[0]), abs=1e-5)


def test_schedule_before_os_start_epoch_is_the_host_loss():
    torch.manual_seed(0)
    method = Method(OpenSamplingConfig(os_start_epoch=2), CIFAR10_IR100, CPU)
    model = method.build_model()
    batch = small_batch(method)
    with torch.no_grad():
        method.begin_epoch(1, model)
        loss, stats = method.loss(model, batch, np.random.RandomState(0))
        assert float(stats["l_reg"]) == 0.0
        assert float(loss) == pytest.approx(float(F.cross_entropy(model(batch.x)[0][0], batch.y)), abs=1e-6)
        method.begin_epoch(2, model)
        assert float(method.loss(model, batch, np.random.RandomState(0))[1]["l_reg"]) > 0


def test_gradients_reach_the_backbone_from_both_terms():
    torch.manual_seed(0)
    method = Method(OpenSamplingConfig(), CIFAR10_IR100, CPU)
    model = method.build_model()
    batch = small_batch(method, b=2, m=2)
    z_in, z_out = joint_logits(model, batch.x, batch.x_out)
    labels = sample_open_labels(method.gamma_device, 2, torch.Generator().manual_seed(0))
    for term in (method.id_loss(z_in, batch.y), open_sampling_regulariser(z_out, labels, method.omega)):
        model.zero_grad()
        term.backward(retain_graph=True)
        assert float(model.conv1.weight.grad.abs().sum()) > 0


def test_a_few_sgd_steps_lower_the_loss():
    torch.manual_seed(0)
    method = Method(OpenSamplingConfig(), CIFAR10_IR100, CPU)
    model = method.build_model().train()
    batch = small_batch(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []
    for _ in range(2):
        loss, stats = method.loss(model, batch, np.random.RandomState(0))
        assert loss.ndim == 0 and torch.isfinite(loss) and set(stats) == {"l_imb", "l_reg"}
        history.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        history.append(float(method.loss(model, batch, np.random.RandomState(0))[0]))
    assert history[-1] < history[0]
