"""RICASSO's loss pieces against hand values and independent numpy (ricasso.md §3)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spaces import ricasso as space
from trainables import lgla, losses
from trainables.method import Batch, TrainData
from trainables.ricasso import (Method, RicassoConfig, adjusted_logits, cbcl_loss, dec_pull,
                                dual_entropy, hat_sampler_weights, nod_loss, rcl_loss, vbl_push)

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
SMALL_COUNTS = [50, 30, 20, 10]          # K = 3 bands: {0} and {1, 2, 3}
CPU = torch.device("cpu")
LGLA_ROW = dict(use_mix_in_cls=False, use_hat_stream=False, use_aala=False, use_cbcl=False,
                use_rcl=False)


def random_batch(b: int, c: int = 10, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, c, (b,), generator=g),
                 torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, c, (b,), generator=g))


def numpy_cls_loss(z, q, margins, band_of, s, clean, tau=None):
    """Eq. 7 summed over experts, mean over rows, written independently: AAW by LGLA's rule
    (θ = arccos(z/s), band means of θ_y over clean rows, g = 1 + max(0, θ - mean)) and, if τ
    is given, the AALA factor 1 + softmax over rows of -τ logsumexp(z/τ)."""
    total = 0.0
    for zk, tk in zip(z, margins):
        if tau is None:
            ehat = np.ones(len(zk))
        else:
            e = -tau * np.log(np.exp(zk / tau).sum(1))
            ehat = 1 + np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        a = zk + ehat[:, None] * tk[None, :]
        log_p = a - a.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        theta = np.arccos(zk / s)
        y = q.argmax(1)
        means = {r: theta[clean & (band_of[y] == r), y[clean & (band_of[y] == r)]].mean()
                 for r in set(band_of[y[clean]])}
        g = np.ones_like(zk)
        for c in range(zk.shape[1]):
            if band_of[c] in means:
                g[:, c] = 1 + np.maximum(0, theta[:, c] - means[band_of[c]])
        total += (-(g * q * log_p).sum(1)).mean()
    return total


# ---- §3.0 static margins and the two τ ------------------------------------------------------------

def test_global_margin_is_tau_log_prior_and_tau_energy_tied():
    method = Method(RicassoConfig(), CIFAR10_IR100, CPU)
    assert float(method.margins[2][0]) == pytest.approx(-2.726227, abs=1e-5)   # 3 log(5000/12406)
    assert method.tau_energy == 3.0
    assert Method(RicassoConfig(tau_gla=2.0), CIFAR10_IR100, CPU).tau_energy == 2.0
    assert Method(RicassoConfig(tau_energy=8.0), CIFAR10_IR100, CPU).tau_energy == 8.0
    # The printed e^τ φ form only shifts every logit by τ: the softmax cannot see it.
    z, log_phi = torch.tensor([1.0, -2.0, 0.5]), torch.log(torch.tensor([0.7, 0.2, 0.1]))
    assert torch.allclose((z + log_phi + 3.0).softmax(0), (z + log_phi).softmax(0))


# ---- §3.3 AALA and L_cls ----------------------------------------------------------------------

def test_aala_factor_scales_the_static_margin():
    z = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    t = torch.log(torch.tensor([[0.8, 0.2]]))
    adjusted, ehat = adjusted_logits(z, t, tau_energy=1.0)
    assert ehat[0].tolist() == pytest.approx([1.148421, 1.229025, 1.622554], abs=1e-5)
    expected = z[0] + torch.tensor([1.148421, 1.229025, 1.622554])[:, None] * t
    assert torch.allclose(adjusted[0], expected, atol=1e-5)
    off, ones = adjusted_logits(z, t, tau_energy=1.0, use_aala=False)
    assert torch.equal(ones, torch.ones(1, 3)) and torch.allclose(off, z + t)


def test_nod_without_aala_and_aaw_is_logit_adjusted_ce():
    torch.manual_seed(0)
    z = torch.randn(1, 6, 3) * 3
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    log_prior = losses.log_prior([70, 20, 10])
    adjusted, _ = adjusted_logits(z, log_prior[None], 1.0, use_aala=False)
    got = nod_loss(z, adjusted, F.one_hot(y, 3).float(), [], 30.0, torch.ones(6, dtype=torch.bool),
                   use_aaw=False)
    assert float(got) == pytest.approx(float(losses.logit_adjusted_cross_entropy(z[0], y, log_prior)),
                                       abs=1e-6)


def test_nod_two_hot_row_is_the_lambda_mix_of_two_losses():
    z = torch.tensor([[[1.0, 0.0, -1.0]]])
    t = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    adjusted, _ = adjusted_logits(z, t, 1.0, use_aala=False)
    clean = torch.ones(1, dtype=torch.bool)

    def loss(q):
        return float(nod_loss(z, adjusted, torch.tensor([q]), [], 30.0, clean, use_aaw=False))
    a = (np.array([1.0, 0.0, -1.0]) + np.log([0.5, 0.3, 0.2]))
    log_p = a - np.log(np.exp(a).sum())
    assert loss([0.3, 0.0, 0.7]) == pytest.approx(-(0.3 * log_p[0] + 0.7 * log_p[2]), abs=1e-6)
    assert loss([0.3, 0.0, 0.7]) == pytest.approx(0.3 * loss([1, 0, 0]) + 0.7 * loss([0, 0, 1]), abs=1e-6)


def test_nod_loss_with_aala_and_aaw_matches_numpy():
    torch.manual_seed(1)
    s, tau = 30.0, 2.0
    z = (torch.rand(3, 6, 4) * 2 - 1) * s * 0.9
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    q = F.one_hot(y, 4).float()
    q[5] = torch.tensor([0.6, 0.4, 0.0, 0.0])          # a two-hot row: not in AAW's means
    clean = torch.tensor([True] * 5 + [False])
    margins = lgla.static_margins(SMALL_COUNTS, 3, 2.0)
    bands = lgla.class_bands(SMALL_COUNTS, 3)
    adjusted, _ = adjusted_logits(z, margins, tau)
    got = nod_loss(z, adjusted, q, bands, s, clean)
    expected = numpy_cls_loss(z.double().numpy(), q.double().numpy(), margins.double().numpy(),
                              np.array([0, 1, 1, 1]), s, clean.numpy(), tau)
    assert float(got) == pytest.approx(expected, rel=1e-5)


# ---- §3.4-3.6 VBL, DEC, CBCL ----------------------------------------------------------------

def test_vbl_push_hand_values():
    # b = 1: sources (1,0) and (0,1); Mixup feature (0.5,0.5) -> 0.5 + 0.5; CutMix (1,1) -> 1 + 1.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 1.0]])
    assert float(vbl_push(z, 1)) == pytest.approx(1.5)
    # b = 2 pairs row r of each block with row r of the others.
    z2 = torch.tensor([[0.0], [2.0], [1.0], [2.0], [0.5], [3.0], [1.0], [2.0]])
    # Mixup rows: 0.25 + 0.25 and 1 + 1; CutMix rows: 1 + 0 and 0 + 0.
    assert float(vbl_push(z2, 2)) == pytest.approx((0.5 + 2.0 + 1.0 + 0.0) / 4)


def test_dual_entropy_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # 2 ln 2; -(0.75 ln 0.75 + 1.25 ln 0.25); a two-hot row on p = (½, ½) is again 2 ln 2
    assert dual_entropy(logits, q).tolist() == pytest.approx([1.386294, 1.948630, 1.386294], abs=1e-5)


def test_dec_pull_hand_value_and_constant_weight():
    z = torch.tensor([[2.0, 0.0]], requires_grad=True)
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    adjusted = torch.zeros(1, 2, requires_grad=True)             # p = (½, ½), ω = 2 ln 2
    q = torch.tensor([[0.25, 0.75]])                              # Σ q ||z - c||² = 0.25·4 + 0.75·2
    d_plus = dec_pull(z, centers, adjusted, q)
    assert float(d_plus.detach()) == pytest.approx(0.5 * 2 * math.log(2) * 2.5, abs=1e-6)
    d_plus.backward()
    assert adjusted.grad is None                                  # ω is a weight, not a target
    assert z.grad[0].tolist() == pytest.approx([2 * math.log(2) * 1.25, -2 * math.log(2) * 0.75], abs=1e-6)


def test_cbcl_hand_values_and_direction():
    one, three = torch.tensor(1.0), torch.tensor(3.0)
    assert float(cbcl_loss(one, three, 1, 1, 0, 0)) == pytest.approx(math.tanh(-1), abs=1e-6)
    e = math.exp
    assert float(cbcl_loss(one, three, 2.0, 0.5, 1.0, 1.0)) == pytest.approx(
        (e(2) - e(1.5) + 1) / (e(2) + e(1.5) + 1), abs=1e-6)
    d_plus, d_minus = torch.tensor(0.5, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    cbcl_loss(d_plus, d_minus, 1, 1, 0, 1e-8).backward()
    assert float(d_plus.grad) > 0 > float(d_minus.grad)          # pull d+ down, push d- up


def test_cbcl_does_not_overflow():
    big, zero = torch.tensor(500.0, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    out = cbcl_loss(big, zero, 1, 1, 0, 1e-8)
    out.backward()
    assert float(out.detach()) == pytest.approx(1.0) and math.isfinite(float(big.grad))
    assert float(cbcl_loss(torch.tensor(400.0), torch.tensor(400.0), 1, 1, 0, 1e-8)) == pytest.approx(0.0)


# ---- §3.7 RCL -----------------------------------------------------------------------------------

def test_rcl_hand_values_and_stop_gradient():
    u_m = torch.tensor([[1.0, 0.0]], requires_grad=True)
    u_c = torch.tensor([[0.0, 2.0]], requires_grad=True)
    h_m = torch.tensor([[3.0, 0.0]], requires_grad=True)
    h_c = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = rcl_loss(u_m, u_c, h_m, h_c)                           # -(1/√2) - 0
    assert float(loss.detach()) == pytest.approx(-1 / math.sqrt(2), abs=1e-6)
    loss.backward()
    assert h_m.grad is None and h_c.grad is None and u_m.grad is not None
    same = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    assert float(rcl_loss(same, same, 2 * same, same)) == pytest.approx(-2.0)


# ---- §3.1 streams ----------------------------------------------------------------------------------

def test_hat_sampler_class_masses():
    labels = torch.tensor([0, 0, 0, 0, 1])
    for rho, masses in ((1.0, [0.5, 0.5]), (2.0, [0.2, 0.8]), (0.0, [0.8, 0.2])):
        w = hat_sampler_weights(labels, [4, 1], rho)
        share = [float(w[labels == c].sum() / w.sum()) for c in (0, 1)]
        assert share == pytest.approx(masses)


def test_reversed_stream_is_drawn_by_the_method():
    cfg = RicassoConfig(hat_sampler_rho=2.0)
    method = Method(cfg, CIFAR10_IR100, CPU)
    y = torch.repeat_interleave(torch.arange(10), torch.tensor([64, 32, 16, 8, 4, 2, 2, 1, 1, 1]))
    x = torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8)
    method.begin_training(TrainData(x, y, x[:0], y[:0]))
    batch = method.draw_hat_stream(random_batch(512), np.random.RandomState(0))
    assert batch.x_bal.shape == (512, 3, 32, 32) and batch.x_bal.dtype == torch.float32
    # ρ = 2 on these counts: the tail classes 7-9 (one image each) take most of the draws.
    assert float((batch.y_bal >= 7).float().mean()) > 0.5
    loss, _ = method.loss(method.build_model(), random_batch(4), np.random.RandomState(0))
    assert torch.isfinite(loss)


def test_rows_in_the_classification_loss_follow_the_flags():
    b = 2
    full = Method(RicassoConfig(), CIFAR10_IR100, CPU)
    assert full.cls_rows(4 * b, b).tolist() == [True] * 8
    no_nod = Method(RicassoConfig(use_mix_in_cls=False, use_hat_stream=False), CIFAR10_IR100, CPU)
    assert no_nod.uses_balanced_stream                    # CBCL and RCL still need the mixes
    assert no_nod.cls_rows(4 * b, b).tolist() == [True] * 2 + [False] * 6
    lgla_row = Method(RicassoConfig(**LGLA_ROW), CIFAR10_IR100, CPU)
    assert not lgla_row.uses_balanced_stream
    assert lgla_row.cls_rows(b, b).tolist() == [True] * 2


# ---- the method on an engine-shaped batch -------------------------------------------------------

def test_table4_row1_is_lgla():
    torch.manual_seed(0)
    method = Method(RicassoConfig(**LGLA_ROW), CIFAR10_IR100, CPU)
    model = method.build_model().eval()
    batch = Batch(torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 3, 6, 9]))
    loss, _ = method.loss(model, batch, np.random.RandomState(0))
    with torch.no_grad():
        z, _ = model(batch.x)
    band_of = np.array([0] + [1] * 9)
    expected = numpy_cls_loss(z.double().numpy(), F.one_hot(batch.y, 10).double().numpy(),
                              method.margins.double().numpy(), band_of, 30.0, np.ones(6, bool))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_method_loss_runs_on_an_engine_batch():
    method = Method(RicassoConfig(), CIFAR10_IR100, CPU)
    model = method.build_model().train()
    loss, stats = method.loss(model, random_batch(4), np.random.RandomState(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss_nod", "loss_cbcl", "loss_rcl", "dec_d_plus", "vbl_d_minus", "ehat_max"} <= set(stats)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in stats.values())
    # A one-row last batch: the RCL heads' BatchNorm cannot run, the rest still does.
    loss, stats = method.loss(model, random_batch(1), np.random.RandomState(0))
    assert torch.isfinite(loss) and float(stats["loss_rcl"]) == 0.0
    logits = method.logits(model.eval(), torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)


def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    method = Method(RicassoConfig(), CIFAR10_IR100, CPU)
    model = method.build_model().train()
    # Plain SGD: the paper's momentum 0.9 overshoots on one repeated batch of noise images.
    optimizer = torch.optim.SGD([*model.parameters(), *method.rcl_heads.parameters(),
                                 method.centers], lr=0.01)
    batch = random_batch(4)

    def loss_now():
        return method.loss(model, batch, np.random.RandomState(0))   # same mixes every call
    before, before_stats = loss_now()
    for _ in range(3):
        loss, _ = loss_now()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, after_stats = loss_now()
    assert float(after.detach()) < float(before.detach())
    for term in ("loss_nod", "loss_cbcl", "loss_rcl"):
        assert float(after_stats[term]) < float(before_stats[term])


def test_optimizer_groups_and_state_round_trip():
    method = Method(RicassoConfig(), CIFAR10_IR100, CPU)
    model = method.build_model()
    optimizer = method.build_optimizer(model)
    decayed, centres = optimizer.param_groups
    assert centres["params"] == [method.centers] and centres["weight_decay"] == 0.0
    assert decayed["weight_decay"] == 2e-4
    assert len(decayed["params"]) == len(list(model.parameters())) + len(list(method.rcl_heads.parameters()))
    other = Method(RicassoConfig(), CIFAR10_IR100, CPU)
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.centers, method.centers)
    assert all(torch.equal(a, b) for a, b in zip(other.rcl_heads.state_dict().values(),
                                                 method.rcl_heads.state_dict().values()))


# ---- config and search space ----------------------------------------------------------------------

def test_config_errors_and_fixed_mixing():
    with pytest.raises(ValueError, match="dec_rows='some'; accepted: all, clean"):
        RicassoConfig(dec_rows="some")
    with pytest.raises(ValueError, match="unknown config keys"):
        RicassoConfig.from_dict({"use_mixup": False})
    assert "lambda_mix" not in RicassoConfig().to_dict()


def test_space_paper_point_is_a_valid_config():
    fields = {f.name for f in dataclasses.fields(RicassoConfig)}
    assert set(space.SPACE) <= fields and set(space.PAPER_POINT) == set(space.SPACE)
    RicassoConfig.from_dict(space.PAPER_POINT)
    # The paper's one τ: the energy temperature starts at LGLA's CIFAR-10 τ; the rest are defaults.
    assert space.PAPER_POINT["tau_energy"] == Method(RicassoConfig(), CIFAR10_IR100, CPU).tau_energy
    defaults = RicassoConfig()
    assert all(getattr(defaults, k) == v for k, v in space.PAPER_POINT.items() if k != "tau_energy")
