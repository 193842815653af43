"""CALA's loss, adjustment estimators and meta step against hand values (CALA spec §3, §10)."""
import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables import data, losses
from trainables.cala import (HeuristicConfig, HeuristicMethod, MetaConfig, MetaMethod, NeighbourBank,
                             cala_loss, characteristics, class_smoothed, density_ratio)
from trainables.engine import Batch
from trainables.method import TrainData

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors (tests/conftest.py)


# -- the CALA loss -------------------------------------------------------------------------------
def test_cala_loss_hand_value():
    # z = 0, p_tr = (0.8, 0.2), τ1 = τ2 = 1, v = (0, log 2): adj = (log 0.8, log 0.4), softmax (2/3, 1/3).
    z = torch.zeros(1, 2)
    prior = torch.log(torch.tensor([0.8, 0.2]))
    v = torch.tensor([[0.0, math.log(2)]])
    y0, y1 = torch.tensor([0]), torch.tensor([1])
    assert float(cala_loss(z, y0, y0, 1.0, prior, v, 1.0, 1.0)) == pytest.approx(math.log(1.5), abs=1e-6)
    mixed = cala_loss(z, y0, y1, 0.25, prior, v, 1.0, 1.0)   # λ·CE(adj, y_a) + (1 − λ)·CE(adj, y_b)
    assert float(mixed) == pytest.approx(0.25 * math.log(1.5) + 0.75 * math.log(3), abs=1e-6)


def test_tau2_zero_without_mixup_is_logit_adjustment_bit_for_bit():
    torch.manual_seed(0)
    z, y = torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    prior = losses.log_prior(CIFAR10_IR100)
    v = torch.randn(16, 10) * 4
    ours = cala_loss(z, y, y, 1.0, prior, v, 1.5, 0.0)
    assert torch.equal(ours, losses.logit_adjusted_cross_entropy(z, y, prior, tau=1.5))


def test_per_row_constant_in_v_leaves_the_loss_unchanged():
    torch.manual_seed(1)
    z, y_a, y_b = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    prior = losses.log_prior([50, 30, 10, 6, 4])
    v = torch.randn(8, 5)
    shift = torch.randn(8, 1) * 10
    for lam in (1.0, 0.3):
        base = cala_loss(z, y_a, y_b, lam, prior, v, 1.5, 1.0)
        shifted = cala_loss(z, y_a, y_b, lam, prior, v + shift, 1.5, 1.0)
        assert float(shifted) == pytest.approx(float(base), abs=1e-5)


# -- Heuristic-CALA's estimator ------------------------------------------------------------------
def test_class_smoothing_divides_by_the_class_count_in_the_batch():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    out = class_smoothed(p, torch.tensor([0, 0, 1]), 0.5)
    # class 0's mean row is (0.5, 0.5); class 1 has one row, its own.
    assert out.numpy() == pytest.approx(np.array([[0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]))
    assert torch.equal(class_smoothed(p, torch.tensor([0, 0, 1]), 0.0), p)


def test_density_ratio_modes_hand_values():
    p_pr, p_mx = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    assert density_ratio(p_pr, p_mx, "log", 0.0, 5.0).tolist()[0] == pytest.approx(
        [math.log(2), math.log(2 / 3)], abs=1e-6)
    ratio = np.array([2.0, 2 / 3])
    assert density_ratio(p_pr, p_mx, "l2_ratio").tolist()[0] == pytest.approx(
        list(ratio / np.linalg.norm(ratio)), abs=1e-6)
    absent = density_ratio(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]), "log", 1e-6, 5.0)
    assert absent.tolist()[0] == pytest.approx([math.log(0.500001 / 1.000001), 5.0], abs=1e-6)


def tiny_bank() -> NeighbourBank:
    """Two batches of two rows, C = 2; the newest batch is the query."""
    bank = NeighbourBank(2)
    bank.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.9, 0.1], [0.2, 0.8]]),
              torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    bank.push(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), torch.tensor([[0.6, 0.4], [0.3, 0.7]]),
              torch.tensor([[0.5, 0.5], [0.0, 1.0]]))   # row 0 is a λ = 0.5 Mixup row
    return bank


def test_neighbourhood_and_v_for_a_tiny_bank_by_hand():
    bank = tiny_bank()
    assert bank.full
    # K = 2, self included: row 0's neighbours are itself and old row 0, row 1's itself and old row 1.
    p_pr, p_mx = bank.neighbourhood(2)
    assert p_pr.numpy() == pytest.approx(np.array([[0.75, 0.25], [0.25, 0.75]]))
    assert p_mx.numpy() == pytest.approx(np.array([[0.75, 0.25], [0.0, 1.0]]))
    y_a = torch.tensor([0, 1])   # one row per class: smoothing is the identity here
    v = density_ratio(class_smoothed(p_pr, y_a, 0.05), class_smoothed(p_mx, y_a, 0.05), "log", 1e-6, 20.0)
    by_hand = [[0.0, 0.0], [math.log(0.250001 / 0.000001), math.log(0.750001 / 1.000001)]]
    assert v.numpy() == pytest.approx(np.array(by_hand), abs=1e-4)
    v = density_ratio(class_smoothed(p_pr, y_a, 0.05), class_smoothed(p_mx, y_a, 0.05), "log", 1e-6, 5.0)
    assert v[1, 0] == 5.0   # clipped
    # Without itself, row 0's neighbours are old row 0 (cos 0.995) and new row 1 (cos 0.198).
    p_pr, p_mx = bank.neighbourhood(2, exclude_self=True)
    assert p_pr[0].tolist() == pytest.approx([0.6, 0.4])
    assert p_mx[0].tolist() == pytest.approx([0.5, 0.5])


def test_v_is_zero_for_a_confident_correct_model_on_a_single_class_neighbourhood():
    method = HeuristicMethod(HeuristicConfig(knn_k=4, batch_size=4, mixup_alpha=0.0), [40, 20], CPU)
    y = torch.zeros(4, dtype=torch.long)
    onehot = F.one_hot(y, 2).float()
    method.begin_epoch(0, None)
    h = torch.randn(4, 8)
    assert method.adjustment(h, onehot, onehot, y).abs().max() == 0   # warm-up: bank not full
    for _ in range(method.bank.window - 1):
        v = method.adjustment(torch.randn(4, 8), onehot, onehot, y)
    assert v.shape == (4, 2) and bool(torch.isfinite(v).all())
    assert v[:, 0].tolist() == pytest.approx([0.0] * 4, abs=1e-6)


def test_v_finite_and_shaped_on_random_data():
    method = HeuristicMethod(HeuristicConfig(knn_k=40, batch_size=16), CIFAR10_IR100, CPU)
    method.begin_epoch(0, None)
    for _ in range(method.bank.window):
        y = torch.randint(0, 10, (16,))
        v = method.adjustment(torch.randn(16, 64), torch.randn(16, 10).softmax(1),
                              F.one_hot(y, 10).float(), y)
    assert v.shape == (16, 10) and bool(torch.isfinite(v).all()) and float(v.abs().max()) <= 5.0
    assert float(v.abs().max()) > 0
    method.begin_epoch(1, None)   # the bank is reset every epoch
    assert len(method.bank.batches) == 0


def test_bank_window_rule():
    assert HeuristicMethod(HeuristicConfig(), CIFAR10_IR100, CPU).bank.window == 2
    assert HeuristicMethod(HeuristicConfig(), [500] * 100, CPU).bank.window == 9


# -- Meta-CALA's characteristics and adjustment network -------------------------------------------
def test_characteristics_hand_values():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    h = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    zeta, cur = characteristics(h, z, y, None, 2)
    assert zeta.shape == (3, 42) and cur.shape == (3, 21)
    zn, yn, hn = z.numpy().astype(np.float64), y.numpy(), h.numpy().astype(np.float64)
    q = np.exp(zn) / np.exp(zn).sum(1, keepdims=True)
    rows = np.arange(3)
    q_y = q[rows, yn]
    onehot = np.eye(2)[yn]
    base = np.stack([-np.log(q_y), zn[rows, yn], np.linalg.norm(onehot - q, axis=1), q_y,
                     -(q * np.log(q)).sum(1), q_y - q[rows, 1 - yn]], 1)
    hoods = [[0, 1], [1, 0], [2, 1]]   # by hand: cos(0,1) = 0.8, cos(1,2) = 0.6, cos(0,2) = 0
    mean = np.stack([base[n].mean(0) for n in hoods])
    same = [1.0, 1.0, 0.5]
    other = [0.0, 0.0, 0.5]
    centre = [hn[n].mean(0) for n in hoods]
    cos = [hn[i] @ c / np.linalg.norm(hn[i]) / np.linalg.norm(c) for i, c in enumerate(centre)]
    expected = np.concatenate([base, mean, base - mean, np.stack([same, other, cos], 1)], 1)
    assert cur.numpy() == pytest.approx(expected, abs=1e-5)
    assert zeta[:, 21:].abs().max() == 0                      # first visit: no change
    prev = cur.clone()
    prev[0] = float("nan")                                     # row 0 never seen
    prev[1:] -= 1.0
    zeta, _ = characteristics(h, z, y, prev, 2)
    assert zeta[0, 21:].abs().max() == 0
    assert zeta[1:, 21:].numpy() == pytest.approx(np.ones((2, 21)), abs=1e-5)


def meta_setup(**kw):
    torch.manual_seed(0)
    counts = [6, 4, 2]
    cfg = MetaConfig(batch_size=8, meta_batch_size=6, knn_k=4, **kw)
    method = MetaMethod(cfg, counts, CPU)
    # 8x8 images keep the double backward cheap on a CPU; the network pools globally.
    train_x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    train_y = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    meta_x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    method.begin_training(TrainData(train_x, train_y, meta_x, torch.tensor([0, 0, 1, 1, 2, 2])))
    method.begin_epoch(0, None)
    model = method.build_model()
    model.train()
    index = torch.tensor([0, 2, 4, 6, 7, 9, 10, 11])
    gen = torch.Generator().manual_seed(0)
    batch = Batch(method.train_transform(train_x[index], gen), train_y[index], index=index)
    return method, model, batch


@pytest.mark.parametrize("meta_out", ["per_class", "gt_scalar"])
def test_meta_step_has_nonzero_gradient_and_moves_omega(meta_out):
    method, model, batch = meta_setup(meta_out=meta_out)
    before = [p.detach().clone() for p in method.meta_net.parameters()]
    loss, stats = method.loss(model, batch, np.random.RandomState(0))
    grads = [p.grad for p in method.meta_net.parameters() if p.grad is not None]
    assert grads and float(torch.stack([g.norm() for g in grads]).norm()) > 0
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(method.meta_net.parameters(), before))
    assert moved > 0
    loss.backward()   # the engine's step still finds the classifier's graph intact
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(stats["meta_loss"])


def test_meta_cala_starts_as_logit_adjustment():
    method, model, batch = meta_setup(meta_interval=1000)   # no meta step: Ω keeps its zero last layer
    loss, _ = method.loss(model, batch, np.random.RandomState(0))
    with torch.no_grad():
        z = model(batch.x)[0][0]
    expected = losses.logit_adjusted_cross_entropy(z, batch.y, method.log_prior, 1.5)
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-5)


def test_meta_memory_and_state_dict_round_trip():
    method, model, batch = meta_setup()
    loss, _ = method.loss(model, batch, np.random.RandomState(0))
    assert bool(torch.isfinite(method.memory[batch.index]).all())
    assert bool(torch.isnan(method.memory[1]).all())          # row 1 was not in the batch
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored, _, _ = meta_setup()
    restored.load_state_dict(torch.load(buffer))
    twin = copy.deepcopy(model)
    out_a, _ = method.loss(model, batch, np.random.RandomState(1))
    out_b, _ = restored.loss(twin, batch, np.random.RandomState(1))
    assert float(out_a.detach()) == float(out_b.detach())
    for p, q in zip(method.meta_net.parameters(), restored.meta_net.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(method.memory.nan_to_num(-7), restored.memory.nan_to_num(-7))


def test_meta_needs_a_meta_set():
    method = MetaMethod(MetaConfig(), [5, 3], CPU)
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="meta_per_class"):
        method.begin_training(TrainData(empty, torch.zeros(0, dtype=torch.long), empty,
                                        torch.zeros(0, dtype=torch.long)))


# -- the methods in the engine's shapes ----------------------------------------------------------
def few_sgd_steps_lower_the_loss(method, model, batch):
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.0)

    def loss_now():
        return method.loss(model, batch, np.random.RandomState(0))[0]   # same λ and pairing each time
    first = loss_now()
    loss = first
    for _ in range(3):
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = loss_now()
    assert float(loss.detach()) < float(first.detach())


def test_heuristic_steps_lower_its_loss():
    torch.manual_seed(0)
    method = HeuristicMethod(HeuristicConfig(batch_size=8, knn_k=4), CIFAR10_IR100, CPU)
    method.bank = NeighbourBank(1)   # v from the batch itself, so every call has a live v
    model = method.build_model()
    model.train()
    batch = Batch(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)), index=torch.arange(8))
    few_sgd_steps_lower_the_loss(method, model, batch)


def test_meta_steps_lower_its_loss():
    method, model, batch = meta_setup()
    batch.index = None
    few_sgd_steps_lower_the_loss(method, model, batch)


def test_heuristic_loss_runs_on_an_engine_batch():
    # bank_samples_per_class = 1 fills the bank in ceil(10 / 4) + 1 = 4 steps
    method = HeuristicMethod(HeuristicConfig(batch_size=4, bank_samples_per_class=1), CIFAR10_IR100, CPU)
    model = method.build_model()
    method.begin_epoch(0, model)
    gen = torch.Generator().manual_seed(0)
    x = method.train_transform(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), gen)
    for step in range(method.bank.window):
        loss, stats = method.loss(model, Batch(x, torch.randint(0, 10, (4,)), index=torch.arange(4)),
                                  np.random.RandomState(step))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"v_mean", "v_std", "v_frac_clipped"} <= set(stats)
    assert float(stats["v_std"]) > 0   # the bank is full: v is live
    assert method.confidence(model.eval(), x).shape == (4,)   # energy on raw logits


def test_recipe_schedule_and_config_errors():
    cfg = HeuristicConfig()
    assert cfg.ood_score == "energy" and cfg.epochs == 200 and cfg.weight_decay == 5e-4
    lrs = [cfg.lr_at(e) for e in (0, 4, 5, 159, 160, 179, 180, 199)]
    # LDAM-DRW's warm-up lr·(e+1)/5, then ×0.01 at 160 and again at 180 (spec §8.1 #21)
    assert lrs == pytest.approx([0.02, 0.1, 0.1, 0.1, 1e-3, 1e-3, 1e-5, 1e-5])
    with pytest.raises(ValueError, match="v_mode='log2'"):
        HeuristicConfig(v_mode="log2")
    with pytest.raises(ValueError, match="meta_out"):
        MetaConfig(meta_out="scalar")
    assert MetaConfig().meta_per_class == 300


def test_meta_holdout_is_balanced_and_disjoint():
    # Spec §10 test 6, for the meta_holdout split: 3,000 balanced meta images, disjoint from
    # training and validation, taken before the long-tailed subsampling.
    y = np.repeat(np.arange(10), 5000)
    counts = data.lt_counts(10, 5000 - 50 - 300, 100)
    train, val, meta = data._holdout_and_subsample(y, counts, 50, 0, 300)
    assert np.bincount(y[meta], minlength=10).tolist() == [300] * 10
    assert np.bincount(y[val], minlength=10).tolist() == [50] * 10
    assert np.bincount(y[train], minlength=10).tolist() == counts
    assert not (set(meta) & set(train)) and not (set(meta) & set(val)) and not (set(val) & set(train))
    _, val_without_meta, _ = data._holdout_and_subsample(y, counts, 50, 0, 0)
    assert np.array_equal(val, val_without_meta)


# -- per-dataset defaults, the class-count floor, the fp32 meta step -----------------------------
def test_cifar100_takes_the_specs_k_and_meta_set_and_says_so():
    heuristic = HeuristicConfig(dataset="cifar100")
    assert heuristic.knn_k == 80 and heuristic.dataset_defaults == "cifar100: knn_k=80"
    meta = MetaConfig(dataset="cifar100")
    assert (meta.knn_k, meta.meta_per_class) == (80, 30)          # K = 80, M = 3,000 = 30 x 100
    assert meta.dataset_defaults == "cifar100: knn_k=80, meta_per_class=30"
    assert (MetaConfig().knn_k, MetaConfig().meta_per_class) == (40, 300)   # CIFAR-10 unchanged
    assert MetaConfig().dataset_defaults == "cifar10: knn_k=40, meta_per_class=300"
    # An explicit value wins and is not reported as a default; the record survives a round trip.
    given = MetaConfig(dataset="cifar100", knn_k=20)
    assert (given.knn_k, given.meta_per_class, given.dataset_defaults) == (20, 30, "cifar100: meta_per_class=30")
    again = MetaConfig.from_dict(given.to_dict())
    assert again.to_dict() == given.to_dict() and again.to_dict()["dataset_defaults"] == given.dataset_defaults
    # The paper's 5-image tail needs n_max = 500 (nothing held out); validation's 50 leave 4, and
    # the 30-image meta set keeps it there.
    assert data.lt_counts(100, 500, 100)[-1] == 5
    assert data.lt_counts(100, 500 - 50 - 30, 100)[-1] == data.lt_counts(100, 500 - 50, 100)[-1] == 4


@pytest.mark.parametrize("method_cls, cfg_cls", [(HeuristicMethod, HeuristicConfig), (MetaMethod, MetaConfig)])
def test_a_class_left_with_under_two_images_is_a_one_line_error(method_cls, cfg_cls):
    cfg = cfg_cls(n_max=100, meta_per_class=2) if cfg_cls is MetaConfig else cfg_cls(n_max=100)
    with pytest.raises(ValueError) as info:
        method_cls(cfg, [100, 21, 4, 1], CPU)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("class 3 has 1 training image(s)") and "accepted: " in message
    assert "imbalance_ratio=100" in message and "n_max=100" in message
    method_cls(cfg, [100, 21, 4, 2], CPU)   # two is enough


def test_meta_step_runs_in_fp32_under_bf16_autocast(monkeypatch):
    """The trial's bf16 autocast covers the real forward; the virtual step, its second-order
    gradient and the meta forward run in fp32, and land where an fp32 trial's do."""
    import trainables.cala as cala
    calls = []
    real_call, real_grad = cala.functional_call, torch.autograd.grad

    def spy_call(module, tensors, args):
        out = real_call(module, tensors, args)
        calls.append(("forward", torch.is_autocast_enabled("cpu"), out[0].dtype))
        return out

    def spy_grad(outputs, inputs, **kw):
        grads = real_grad(outputs, inputs, **kw)
        calls.append(("grad", torch.is_autocast_enabled("cpu"), outputs.dtype,
                      {g.dtype for g in grads if g is not None}))
        return grads

    monkeypatch.setattr(cala, "functional_call", spy_call)
    monkeypatch.setattr(torch.autograd, "grad", spy_grad)
    results = {}
    for precision in ("bf16", "fp32"):
        calls.clear()
        method, model, batch = meta_setup()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            real_logits = model(batch.x)[0]
            _, stats = method.loss(model, batch, np.random.RandomState(0))
        assert real_logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        # bf16: an fp32 recompute of f_W(x), then the meta forward on Ŵ; fp32 reuses f_W(x).
        forwards = [c for c in calls if c[0] == "forward"]
        assert len(forwards) == (2 if precision == "bf16" else 1)
        assert all(not on and dtype == torch.float32 for _, on, dtype in forwards)
        assert [c[1:] for c in calls if c[0] == "grad"] == [(False, torch.float32, {torch.float32})]
        results[precision] = (float(stats["meta_loss"]), [p.detach().clone() for p in method.meta_net.parameters()])
    assert results["bf16"][0] == pytest.approx(results["fp32"][0], rel=1e-4)
    for p, q in zip(results["bf16"][1], results["fp32"][1]):
        assert torch.allclose(p, q, atol=2e-3)   # Adam's first step is ±lr (1e-3) per weight


@pytest.mark.parametrize("ratio", [10, 50, 100])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_smoke_preset_keeps_calas_tail_at_two_images(ratio, num_classes):
    from search.run import preset_config
    from trainables import registry
    for name in ("cala", "cala_meta"):
        n_max = preset_config("smoke", registry.get(name), ratio)["n_max"]
        assert min(data.lt_counts(num_classes, n_max, ratio)) >= 2, (name, ratio, n_max)
    # A method without the floor keeps the preset's n_max (whose tail is 1 image at IR 100).
    assert preset_config("smoke", registry.get("darl"), ratio)["n_max"] == 100
    assert min(data.lt_counts(num_classes, 100, 100)) == 1


@pytest.mark.parametrize("name", ["cala", "cala_meta"])
def test_the_searches_first_trial_takes_the_data_sets_k(name):
    """The paper point follows the config's per-data-set default: K = 80 on CIFAR-100, not the
    CIFAR-10 value 40 that spaces/ fixes (cala.md §2, Fig. A-2)."""
    from search import compare, reproduce, run
    from trainables import registry
    assert run.paper_space(name, "cifar10").paper_point["knn_k"] == 40
    assert run.paper_space(name, "cifar100").paper_point["knn_k"] == 80
    plan = run.build_plan(run.parse_args([name, "--dataset", "cifar100", "--preset", "small"]))
    assert plan["space"].paper_point["knn_k"] == 80                    # enqueued as trial 0
    assert plan["space"].distributions["knn_k"].choices == (10, 20, 40, 60, 80, 100)   # the range is kept
    cfg = registry.get(name).config_cls.from_dict({**plan["config"], **plan["space"].paper_point})
    assert cfg.knn_k == 80
    # --space still narrows it, and a fixed K wins.
    plan = run.build_plan(run.parse_args([name, "--dataset", "cifar100", "--space", "knn_k=20"]))
    assert plan["space"].paper_point["knn_k"] == 20
    assert reproduce.build_plan(reproduce.parse_args([name, "--dataset", "cifar100"]))["config"]["knn_k"] == 80
    assert compare.paper_space is run.paper_space   # compare.py's point is the same
