"""PASCL stage 1: the loss terms against hand values and an independent numpy reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spaces
from trainables import losses
from trainables.engine import Batch
from trainables.method import TrainData
from trainables.pascl import (Method, PasclConfig, PasclNetwork, pascl_contrastive_loss,
                              tail_classes)

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
E = math.e


def reference_supcon(z, labels, anchor, contrast, t):
    """numpy: mean over anchors of -mean_{p in P(i)} log(exp(z_i.z_p/t) / sum_{a in A(i)} exp(z_i.z_a/t))."""
    z, labels = np.asarray(z, np.float64), np.asarray(labels)
    out = []
    for i in np.flatnonzero(anchor):
        others = [a for a in range(len(z)) if a != i and (contrast[a] or anchor[a])]
        log_den = np.log(sum(np.exp(z[i] @ z[a] / t) for a in others))
        pos = [p for p in others if labels[p] == labels[i]]
        out.append(-np.mean([z[i] @ z[p] / t - log_den for p in pos]))
    return float(np.mean(out))


def five_rows():
    # rows: tail view 1, tail view 2 (class 8), head (class 0), two outliers; unit 2-d projections
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([8, 8, 0, -1, -1])
    anchor = torch.tensor([True, True, False, False, False])
    ood = labels < 0
    return z, labels, anchor, ood


def test_contrastive_hand_values_official_masks():
    # Anchor 0: A = {1, 3, 4} with z·z_a = 1, -1, 0; P = {1} (its other view). Head row 2 absent.
    z, labels, anchor, ood = five_rows()
    loss = pascl_contrastive_loss(z, labels, anchor, anchor | ood, temperature=1.0)
    assert float(loss) == pytest.approx(math.log(E + 1 / E + 1) - 1, abs=1e-6)   # 0.407606
    assert float(loss) == pytest.approx(0.407606, abs=1e-5)


def test_contrastive_hand_values_with_head_negatives():
    # The head row joins every denominator with z·z_h = 0: one more e^0 term.
    z, labels, anchor, ood = five_rows()
    loss = pascl_contrastive_loss(z, labels, anchor, torch.ones(5, dtype=torch.bool), temperature=1.0)
    assert float(loss) == pytest.approx(math.log(E + 1 / E + 2) - 1, abs=1e-6)   # 0.626493


def test_contrastive_temperature_scales_similarities():
    z, labels, anchor, ood = five_rows()
    t = 0.5   # sims become 2, -2, 0
    loss = pascl_contrastive_loss(z, labels, anchor, anchor | ood, temperature=t)
    assert float(loss) == pytest.approx(math.log(E**2 + E**-2 + 1) - 2, abs=1e-6)


def test_contrastive_masks_on_seven_rows_match_numpy_reference():
    # Tail classes 8 and 9 (views 1 in rows 0-1, views 2 in rows 3-4), head rows 2 and 5, one outlier.
    rng = np.random.RandomState(0)
    z = rng.randn(7, 4)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = np.array([8, 9, 0, 8, 9, 0, -1])
    anchor = np.isin(labels, [8, 9])
    ood = labels < 0
    zt = torch.tensor(z, dtype=torch.float32)
    lt, at = torch.tensor(labels), torch.tensor(anchor)
    official = pascl_contrastive_loss(zt, lt, at, at | torch.tensor(ood), 0.07)
    expected = reference_supcon(z, labels, anchor, anchor | ood, 0.07)
    assert float(official) == pytest.approx(expected, rel=1e-4)
    with_head = pascl_contrastive_loss(zt, lt, at, torch.ones(7, dtype=torch.bool), 0.07)
    expected = reference_supcon(z, labels, anchor, np.ones(7, bool), 0.07)
    assert float(with_head) == pytest.approx(expected, rel=1e-4)
    # Head rows never anchor and (officially) never enter: moving them changes nothing.
    moved = zt.clone()
    moved[[2, 5]] = -moved[[2, 5]]
    unchanged = pascl_contrastive_loss(moved, lt, at, at | torch.tensor(ood), 0.07)
    assert float(unchanged) == pytest.approx(float(official))


def test_outliers_are_never_anchors():
    # Two identical outliers would be a perfect positive pair if they anchored; the loss ignores it.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([7, 7, -1, -1])
    anchor = torch.tensor([True, True, False, False])
    loss = pascl_contrastive_loss(z, labels, anchor, torch.ones(4, dtype=torch.bool), 1.0)
    # Anchor 0: sims (0, .6, .6), positive the other view (0); anchor 1: sims (0, .8, .8).
    hand = (math.log(1 + 2 * math.exp(0.6)) + math.log(1 + 2 * math.exp(0.8))) / 2
    assert float(loss) == pytest.approx(hand, abs=1e-6)
    z.requires_grad_(True)
    pascl_contrastive_loss(z, labels, anchor, torch.ones(4, dtype=torch.bool), 1.0).backward()
    assert torch.isfinite(z.grad).all()


def test_no_tail_rows_gives_zero_with_graph():
    z = F.normalize(torch.randn(4, 3), dim=1).requires_grad_(True)
    loss = pascl_contrastive_loss(z, torch.tensor([0, 1, -1, -1]), torch.zeros(4, dtype=torch.bool),
                                  torch.ones(4, dtype=torch.bool), 0.07)
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_oe_term_hand_values():
    # logsumexp(2,0,0) - 2/3 = log(e^2 + 2) - 2/3; uniform logits give log C.
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = ((math.log(E**2 + 2) - 2 / 3) + math.log(3)) / 2
    assert float(losses.outlier_exposure_loss(logits)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.335745, abs=1e-5)


def test_tail_classes_bottom_k_by_count():
    assert tail_classes(CIFAR10_IR100, 0.4).nonzero().squeeze(1).tolist() == [6, 7, 8, 9]
    shuffled = [50, 5000, 139, 2997, 83, 1796, 232, 1077, 387, 645]
    assert tail_classes(shuffled, 0.4).nonzero().squeeze(1).tolist() == [0, 2, 4, 6]
    assert int(tail_classes(list(range(100, 0, -1)), 0.4).sum()) == 40


def test_config_defaults_follow_the_paper():
    cfg = PasclConfig()
    assert (cfg.optimizer, cfg.lr_schedule, cfg.lr, cfg.weight_decay) == ("adam", "cosine", 1e-3, 5e-4)
    assert cfg.epochs == 200
    assert (cfg.batch_size, cfg.warmup_epochs, cfg.ood_score, cfg.lambda_oe) == (256, 0, "msp", 0.5)
    assert [cfg.lr_at(e) for e in (0, 100)] == pytest.approx([1e-3, 5e-4])
    c10 = Method(cfg, CIFAR10_IR100, torch.device("cpu"))
    assert (c10.lambda_pascl, c10.temperature) == (0.1, 0.07)
    c100 = Method(cfg, list(range(500, 0, -5)), torch.device("cpu"))
    assert (c100.lambda_pascl, c100.temperature) == (0.02, 0.2)
    with pytest.raises(ValueError, match="tail_fraction=0"):
        PasclConfig(tail_fraction=0)


def test_space_paper_point_is_inside_and_configurable():
    space = spaces.get("pascl")
    for name, value in space.paper_point.items():
        dist = space.distributions[name]
        assert dist.low <= value <= dist.high
    PasclConfig.from_dict(space.paper_point)


def make_method(n_train=40, **kw):
    method = Method(PasclConfig(**kw), CIFAR10_IR100, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.arange(n_train) % 10
    method.begin_training(TrainData(x, y, x[:0], y[:0]))
    return method, x, y


def engine_batch(method, x, y, index, n_out=6):
    gen = torch.Generator().manual_seed(1)
    out = torch.randint(0, 256, (n_out, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return Batch(method.train_transform(x[index], gen), y[index],
                 x_out=method.train_transform(out, gen), index=index)


def test_second_view_is_deterministic_given_rng():
    method, x, _ = make_method()
    index = torch.tensor([3, 8, 9, 17])
    a = method.second_view(index, np.random.RandomState(5))
    b = method.second_view(index, np.random.RandomState(5))
    c = method.second_view(index, np.random.RandomState(6))
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


class LinearStub(torch.nn.Module):
    """model(x) -> (first 10 pixels as logits, next 5 as feats); projection = normalisation."""

    def forward(self, x):
        flat = x.flatten(1)
        return flat[None, :, :10], flat[None, :, 10:15]

    def project(self, feats):
        return F.normalize(feats, dim=-1)


def test_total_is_ce_on_both_views_plus_weighted_oe_and_pascl():
    method, x, y = make_method()
    index = torch.tensor([6, 7, 8, 9, 16, 0, 1, 2])   # tail 6-9 (two of class 6), head 0-2
    batch = engine_batch(method, x, y, index)
    loss, stats = method.loss(LinearStub(), batch, np.random.RandomState(3))
    x2 = method.second_view(index, np.random.RandomState(3))
    rows = torch.cat([batch.x, x2, batch.x_out]).flatten(1)
    logits, feats = rows[:, :10].double().numpy(), rows[:, 10:15].double().numpy()
    y2 = np.r_[y[index].numpy(), y[index].numpy()]

    def log_softmax(a):
        return a - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)) - a.max(1, keepdims=True)
    ce = -log_softmax(logits[:16])[np.arange(16), y2].mean()
    out = logits[16:]
    oe = np.mean(np.log(np.exp(out - out.max(1, keepdims=True)).sum(1)) + out.max(1) - out.mean(1))
    z = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    labels = np.r_[y2, [-1] * 6]
    anchor = labels >= 6
    con = reference_supcon(z, labels, anchor, anchor | (labels < 0), 0.07)
    assert float(stats["loss_ce"]) == pytest.approx(ce, rel=1e-4)
    assert float(stats["loss_oe"]) == pytest.approx(oe, rel=1e-4)
    assert float(stats["loss_pascl"]) == pytest.approx(con, rel=1e-3)
    assert float(stats["tail_anchors"]) == 10   # 5 tail rows x 2 views
    assert float(loss) == pytest.approx(ce + 0.5 * oe + 0.1 * con, rel=1e-4)
    reweighted = Method(PasclConfig(lambda_oe=1.0, lambda_pascl=2.0), CIFAR10_IR100, torch.device("cpu"))
    reweighted.begin_training(TrainData(x, y, x[:0], y[:0]))
    weighted, _ = reweighted.loss(LinearStub(), batch, np.random.RandomState(3))
    assert float(weighted) == pytest.approx(ce + 1.0 * oe + 2.0 * con, rel=1e-4)


def test_model_contract_and_method_loss_on_an_engine_batch():
    torch.manual_seed(0)
    method, x, y = make_method()
    model = method.build_model()
    assert isinstance(model, PasclNetwork)
    logits, feats = model(method.eval_transform(x[:3]))
    assert logits.shape == (1, 3, 10) and feats.shape == (1, 3, 64)
    assert model.project(feats[0]).norm(dim=1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    batch = engine_batch(method, x, y, torch.arange(8))
    loss, stats = method.loss(model, batch, np.random.RandomState(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss_ce", "loss_oe", "loss_pascl", "tail_anchors"} <= set(stats)
    assert method.confidence(model.eval(), method.eval_transform(x[:3])).shape == (3,)


def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    method, x, y = make_method()
    model = method.build_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.0)
    batch = engine_batch(method, x, y, torch.arange(12))

    def loss_now():
        return method.loss(model, batch, np.random.RandomState(0))[0]   # same second view each call
    before = float(loss_now().detach())
    for _ in range(3):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
    assert float(loss_now().detach()) < before
