"""COCL: each loss term and the test-time calibration against hand values, the class groups, the
method on an engine-shaped batch and a gradient-decrease check."""
import math

import numpy as np
import pytest
import torch

import spaces
from trainables.cocl import (CoclConfig, CoclNetwork, Method, calibrated_logits, farthest_rows,
                             head_classes, head_triplet_loss, outlier_class_loss, split_normalize,
                             tail_prototype_loss)
from trainables.engine import Batch
from trainables.pascl import tail_classes

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
E = math.e
CPU = torch.device("cpu")


def test_split_normalize_normalises_each_half():
    # [3, 4 | 0, 2] -> [3/5, 4/5 | 0, 1]
    out = split_normalize(torch.tensor([[3.0, 4.0, 0.0, 2.0]]), heads=2)
    assert out[0].tolist() == pytest.approx([0.6, 0.8, 0.0, 1.0])


def test_outlier_class_loss_hand_values():
    # C = 2, outlier class 2. Row 1: logits (0, 0, ln 2) -> P(2) = 2 / (1 + 1 + 2) = 1/2 -> ln 2.
    # Row 2: all zero -> P(2) = 1/3 -> ln 3. Mean: (ln 2 + ln 3) / 2 = ln 6 / 2.
    logits = torch.tensor([[0.0, 0.0, math.log(2)], [0.0, 0.0, 0.0]])
    assert float(outlier_class_loss(logits)) == pytest.approx(math.log(6) / 2, abs=1e-6)


def test_tail_prototype_loss_hand_values():
    # One normalisation head, 2-d. Prototypes w0 = (2, 0), w1 = (0, 1); one outlier o = (-1, 0).
    # Normalised keys: (1, 0), (0, 1), (-1, 0).
    # Row a: f = (1, 0), tail, target 0: sims (1, 0, -1) -> CE = ln(e + 1 + 1/e) - 1.
    # Row b: f = (0, 5), head, ignored.
    # Row c: f = (0, 3), tail, target 1: sims (0, 1, 0) -> CE = ln(e + 2) - 1.
    feats = torch.tensor([[1.0, 0.0], [0.0, 5.0], [0.0, 3.0]])
    target = torch.tensor([0, -1, 1])
    is_tail = torch.tensor([True, False, True])
    protos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = torch.tensor([[-1.0, 0.0]])
    loss = tail_prototype_loss(feats, target, is_tail, protos, out, temperature=1.0, heads=1)
    want = ((math.log(E + 1 + 1 / E) - 1) + (math.log(E + 2) - 1)) / 2
    assert float(loss) == pytest.approx(want, abs=1e-6)
    # T = 0.5 doubles the similarities: row a -> ln(e^2 + 1 + e^-2) - 2; row c -> ln(e^2 + 2) - 2.
    loss = tail_prototype_loss(feats, target, is_tail, protos, out, temperature=0.5, heads=1)
    want = ((math.log(E**2 + 1 + E**-2) - 2) + (math.log(E**2 + 2) - 2)) / 2
    assert float(loss) == pytest.approx(want, abs=1e-6)


def test_tail_prototype_loss_normalises_per_half():
    # 4-d, two halves. f = (3, 4 | 0, 1) -> (.6, .8 | 0, 1); prototype (1, 0 | 0, 1) -> itself;
    # outlier (0, 1 | 1, 0) -> itself. Sims: f.w = .6 + 1 = 1.6, f.o = .8 + 0 = 0.8.
    # CE to the prototype at T = 1: ln(1 + e^(0.8 - 1.6)) = ln(1 + e^-0.8) = 0.371101.
    loss = tail_prototype_loss(torch.tensor([[3.0, 4.0, 0.0, 1.0]]), torch.tensor([0]),
                               torch.tensor([True]), torch.tensor([[1.0, 0.0, 0.0, 1.0]]),
                               torch.tensor([[0.0, 1.0, 1.0, 0.0]]), temperature=1.0, heads=2)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.8)), abs=1e-6)


def test_tail_prototype_loss_without_tail_rows_is_zero_with_graph():
    protos = torch.ones(2, 4, requires_grad=True)
    loss = tail_prototype_loss(torch.ones(3, 4), torch.zeros(3, dtype=torch.long),
                               torch.zeros(3, dtype=torch.bool), protos, torch.ones(2, 4), 0.07)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert protos.grad is not None


def test_farthest_rows_and_head_triplet_hand_values():
    # Outliers o0 = (0, 0), o1 = (1, 0), o2 = (0, 3). Distances: d01 = 1, d02 = 3, d12 = sqrt 10.
    # Farthest: o0 -> o2, o1 -> o2, o2 -> o1.
    out = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert farthest_rows(out).tolist() == [2, 2, 1]
    # Negatives (head features): n0 = (0, 1), n1 = (4, 4), n2 = (0, 3); margin 1.
    # o0: max(3 - 1 + 1, 0) = 3; o1: max(sqrt 10 - 5 + 1, 0) = 0; o2: max(sqrt 10 - 0 + 1, 0).
    negatives = torch.tensor([[0.0, 1.0], [4.0, 4.0], [0.0, 3.0]])
    want = (3 + 0 + math.sqrt(10) + 1) / 3
    assert float(head_triplet_loss(out, negatives, margin=1.0)) == pytest.approx(want, abs=1e-5)
    # margin 2: o0 -> 4, o1 -> max(sqrt 10 - 3, 0) = 0.162278, o2 -> sqrt 10 + 2.
    want = (4 + math.sqrt(10) - 3 + math.sqrt(10) + 2) / 3
    assert float(head_triplet_loss(out, negatives, margin=2.0)) == pytest.approx(want, abs=1e-5)


def test_calibration_and_score_hand_values():
    # counts (3, 1): π = (3/4, 1/4). Raw logits (0, 0, 0), τ = 1:
    # calibrated = (-ln 3/4, -ln 1/4, 0), so exp gives (4/3, 4, 1) and P(outlier) = 1 / (4/3 + 4 + 1) = 3/19.
    prior_log = torch.log(torch.tensor([0.75, 0.25]))
    z = calibrated_logits(torch.zeros(1, 3), prior_log, tau=1.0)
    assert z[0].tolist() == pytest.approx([-math.log(0.75), -math.log(0.25), 0.0], abs=1e-6)
    method = Method(CoclConfig(), [3, 1], CPU)

    class Stub(torch.nn.Module):
        prototypes = None

        def forward(self, x):
            return x[None], x[None, :, :2]
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    assert method.confidence(Stub(), x)[0].item() == pytest.approx(-3 / 19, abs=1e-6)
    # Row 2: raw argmax over the ID classes is class 0 (1 > 0.5); OLC adds -ln π:
    # 1 + 0.2877 = 1.2877 < 0.5 + 1.3863 = 1.8863, so the tail class 1 wins.
    assert method.logits(Stub(), x)[1].argmax().item() == 1
    assert method.logits(Stub(), x).shape == (2, 2)
    raw = Method(CoclConfig(tau_olc=0.0), [3, 1], CPU)    # τ = 0: P(outlier) = 1/3 on zeros
    assert raw.confidence(Stub(), x)[0].item() == pytest.approx(-1 / 3, abs=1e-6)
    assert raw.logits(Stub(), x)[1].argmax().item() == 0


def test_head_and_tail_classes_follow_the_code_thresholds():
    # labels <= round(0.4 C) and labels >= round(0.6 C) on count-sorted classes.
    assert head_classes(CIFAR10_IR100, 0.4).tolist() == [True] * 5 + [False] * 5
    assert int(head_classes(list(range(500, 0, -5)), 0.4).sum()) == 41
    assert tail_classes(CIFAR10_IR100, 0.4).tolist() == [False] * 6 + [True] * 4
    method = Method(CoclConfig(), CIFAR10_IR100, CPU)
    assert method.prototype_of.tolist() == [-1] * 6 + [0, 1, 2, 3]
    assert method.build_model().prototypes.shape == (4, 64)


def test_config_defaults_follow_the_code():
    cfg = CoclConfig()
    assert (cfg.optimizer, cfg.lr_schedule, cfg.lr, cfg.weight_decay) == ("adam", "cosine", 1e-3, 5e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.outlier_batch_size, cfg.warmup_epochs) == (100, 128, 256, 0)
    assert (cfg.lambda_ocl, cfg.lambda_tail, cfg.lambda_head) == (0.05, 0.05, 0.1)
    assert (cfg.temperature, cfg.margin, cfg.tau_olc, cfg.ood_score) == (0.07, 1.0, 1.0, "outlier_class")
    assert CoclConfig(batch_size=32).outlier_batch_size == 64            # 2:1 follows the budget
    assert CoclConfig(batch_size=32, outlier_batch_size=10).outlier_batch_size == 10
    with pytest.raises(ValueError, match="ood_score='odin'; accepted: outlier_class, msp"):
        CoclConfig(ood_score="odin")
    with pytest.raises(ValueError, match="tail_rate=1.0"):
        CoclConfig(tail_rate=1.0)


def test_space_paper_point_is_inside_and_configurable():
    space = spaces.get("cocl")
    for name, value in space.paper_point.items():
        dist = space.distributions[name]
        assert dist.low <= value <= dist.high
    cfg = CoclConfig.from_dict(space.paper_point)
    assert (cfg.lambda_ocl, cfg.lambda_tail, cfg.lambda_head) == (0.05, 0.05, 0.1)


PROTOTYPES = [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]]


class PixelStub(torch.nn.Module):
    """model(x) -> (first 11 values as C + 1 logits, next 4 as features); 4 prototypes of 4-d."""

    def __init__(self):
        super().__init__()
        self.prototypes = torch.nn.Parameter(torch.tensor(
            PROTOTYPES))

    def forward(self, x):
        flat = x.flatten(1)
        return flat[None, :, :11], flat[None, :, 11:15]


def test_total_is_the_weighted_sum_of_the_four_terms():
    # ID rows: classes 0, 1 (head, identical features so any head negative is the same), 6, 9
    # (tail, prototypes 0 and 3); two outliers.
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 15, generator=g)
    rows[1, 11:] = rows[0, 11:]
    x = torch.zeros(6, 3, 32, 32)
    x.view(6, -1)[:, :15] = rows
    y = torch.tensor([0, 1, 6, 9])
    batch = Batch(x[:4], y, x_out=x[4:])
    method = Method(CoclConfig(), CIFAR10_IR100, CPU)
    loss, stats = method.loss(PixelStub(), batch, np.random.RandomState(0))
    z, f = rows[:, :11].double().numpy(), rows[:, 11:].double().numpy()

    def ce(logits, target):
        return float(np.log(np.exp(logits).sum()) - logits[target])
    want_ce = np.mean([ce(z[i], int(y[i])) for i in range(4)])
    want_ocl = np.mean([ce(z[i], 10) for i in (4, 5)])
    unit = lambda v: v / np.linalg.norm(v)   # noqa: E731
    halves = lambda v: np.r_[unit(v[:2]), unit(v[2:])]   # noqa: E731
    keys = [halves(np.array(p)) for p in PROTOTYPES] + [halves(f[4]), halves(f[5])]
    want_tail = np.mean([ce(np.array([halves(f[i]) @ k for k in keys]) / 0.07, p)
                         for i, p in ((2, 0), (3, 3))])
    dist = lambda a, b: np.linalg.norm(a - b)   # noqa: E731
    want_head = np.mean([max(dist(f[a], f[p]) - dist(f[a], f[0]) + 1.0, 0.0) for a, p in ((4, 5), (5, 4))])
    assert float(stats["loss_ce"]) == pytest.approx(want_ce, rel=1e-5)
    assert float(stats["loss_ocl"]) == pytest.approx(want_ocl, rel=1e-5)
    assert float(stats["loss_tail"]) == pytest.approx(want_tail, rel=1e-4)
    assert float(stats["loss_head"]) == pytest.approx(want_head, rel=1e-4, abs=1e-5)
    want = want_ce + 0.05 * want_ocl + 0.05 * want_tail + 0.1 * want_head
    assert float(loss) == pytest.approx(want, rel=1e-4)
    reweighted = Method(CoclConfig(lambda_ocl=1.0, lambda_tail=0.0, lambda_head=2.0), CIFAR10_IR100, CPU)
    loss2, _ = reweighted.loss(PixelStub(), batch, np.random.RandomState(0))
    assert float(loss2) == pytest.approx(want_ce + want_ocl + 2.0 * want_head, rel=1e-4)


def test_no_head_rows_gives_zero_head_term():
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = Batch(x[:3], torch.tensor([6, 7, 9]), x_out=x[3:])
    _, stats = Method(CoclConfig(), CIFAR10_IR100, CPU).loss(PixelStub(), batch, np.random.RandomState(0))
    assert float(stats["loss_head"]) == 0.0 and float(stats["loss_tail"]) > 0


def engine_batch(method, n_id=12, n_out=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n_id + n_out, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.arange(n_id) % 10
    return Batch(method.train_transform(x[:n_id], gen), y, x_out=method.train_transform(x[n_id:], gen),
                 index=torch.arange(n_id)), x


def test_model_contract_and_method_loss_on_an_engine_batch():
    torch.manual_seed(0)
    method = Method(CoclConfig(), CIFAR10_IR100, CPU)
    model = method.build_model()
    assert isinstance(model, CoclNetwork)
    batch, x = engine_batch(method)
    logits, feats = model(batch.x)
    assert logits.shape == (1, 12, 11) and feats.shape == (1, 12, 64)
    loss, stats = method.loss(model, batch, np.random.RandomState(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss_ce", "loss_ocl", "loss_tail", "loss_head", "p_outlier_id", "p_outlier_ood"} <= set(stats)
    model.eval()
    images = method.eval_transform(x[:3])
    assert method.logits(model, images).shape == (3, 10)
    conf = method.confidence(model, images)
    assert conf.shape == (3,) and bool(((conf <= 0) & (conf >= -1)).all())


def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    method = Method(CoclConfig(), CIFAR10_IR100, CPU)
    model = method.build_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    batch, _ = engine_batch(method)

    def loss_now():
        return method.loss(model, batch, np.random.RandomState(0))[0]   # same head negatives each call
    before = float(loss_now().detach())
    for _ in range(3):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
    assert float(loss_now().detach()) < before
