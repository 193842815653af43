"""RNA's loss, score, BN wiring, model and augmentation against the spec (rna.md, unit tests
listed after §9)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import spaces
from trainables import augment, data, losses, metrics, models
from trainables.method import Batch
from trainables.rna import Method, RnaConfig, representation_norm, rna_loss

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CPU = torch.device("cpu")


class FeatureStub(torch.nn.Module):
    """Stand-in model: the input rows are the features f, logits = f, h_φ = identity (no BN, so
    rows are independent)."""

    def forward(self, x):
        f = x.flatten(1)
        return f.unsqueeze(0), f.unsqueeze(0)

    def project(self, feats):
        return feats


def small_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create("resnet18_rna", 10, **kw)


# -- data facts the spec's numbers rest on ------------------------------------------------------
def test_cifar_lt_counts_and_shot_groups():
    assert data.lt_counts(10, 5000, 100) == CIFAR10_IR100 and sum(CIFAR10_IR100) == 12406
    c100 = data.lt_counts(100, 500, 100)
    assert sum(c100) == 10847
    groups = metrics.pascl_shot_groups(CIFAR10_IR100)
    assert [g.tolist() for g in groups.values()] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert [len(g) for g in metrics.pascl_shot_groups(c100).values()] == [34, 34, 32]


# -- loss terms ---------------------------------------------------------------------------------
def test_la_with_uniform_prior_is_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4) * 3, torch.tensor([0, 1, 2, 3, 0, 1])
    uniform = losses.log_prior([7, 7, 7, 7])
    la = losses.logit_adjusted_cross_entropy(logits, y, uniform, tau=1.0)
    assert float(la) == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-6)


def test_la_hand_value():
    # z = (2, 0), y = 1, π = (0.8, 0.2), τ = 1: log(0.8 e^2 + 0.2) - log 0.2 (Eq. 2).
    la = losses.logit_adjusted_cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1]),
                                             losses.log_prior([4, 1]), tau=1.0)
    assert float(la) == pytest.approx(math.log(0.8 * math.e ** 2 + 0.2) - math.log(0.2), abs=1e-6)
    la2 = losses.logit_adjusted_cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1]),
                                              losses.log_prior([4, 1]), tau=2.0)
    assert float(la2) == pytest.approx(math.log(0.64 * math.e ** 2 + 0.04) - math.log(0.04), abs=1e-6)


def test_rna_loss_hand_value():
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]])        # norms 5, 0, sqrt 5
    expected = -(math.log(6) + math.log(1) + math.log(1 + math.sqrt(5))) / 3
    assert float(rna_loss(h)) == pytest.approx(expected, abs=1e-6)


def test_rna_gradient_is_eq6_over_batch():
    # ∂L/∂h_i = -h_i / (B ||h_i|| (1 + ||h_i||)), so its norm is 1 / (B (1 + ||h_i||)) (Eqs. 6-7).
    torch.manual_seed(1)
    h = (torch.randn(5, 128) * torch.tensor([0.1, 1, 3, 10, 60])[:, None]).requires_grad_(True)
    rna_loss(h).backward()
    norm = h.detach().norm(dim=1)
    assert torch.allclose(h.grad.norm(dim=1), 1 / (5 * (1 + norm)), rtol=1e-5)
    expected = -h.detach() / (5 * norm[:, None] * (1 + norm[:, None]))
    assert torch.allclose(h.grad, expected, rtol=1e-4, atol=1e-9)


def test_method_loss_hand_value_ignores_outlier_rows():
    # ID row f = (3, 4), y = 0, π = (0.8, 0.2), λ = 0.5: L_LA = log(0.8e^3 + 0.2e^4) - (3 + log 0.8),
    # L_RNA = -log(1 + 5). The outlier row (100, -7) must not enter the loss.
    method = Method(RnaConfig(lambda_rna=0.5), [4, 1], CPU)
    batch = Batch(torch.tensor([[3.0, 4.0]]), torch.tensor([0]), x_out=torch.tensor([[100.0, -7.0]]))
    loss, stats = method.loss(FeatureStub(), batch, np.random.RandomState(0))
    la = np.log(0.8 * np.exp(3) + 0.2 * np.exp(4)) - (3 + np.log(0.8))
    assert float(stats["loss_la"]) == pytest.approx(la, abs=1e-5)
    assert float(stats["loss_rna"]) == pytest.approx(-np.log(6), abs=1e-6)
    assert float(loss) == pytest.approx(la - 0.5 * np.log(6), abs=1e-5)
    assert float(stats["feat_norm_id"]) == pytest.approx(5.0)
    assert float(stats["feat_norm_ood"]) == pytest.approx(math.hypot(100, 7), rel=1e-6)
    assert float(stats["active_ratio_ood"]) == 0.5


# -- BN: one joint forward of ID ∪ outliers ----------------------------------------------------
def test_bn_running_stats_come_from_the_joint_batch():
    model = small_model()
    method = Method(RnaConfig(), CIFAR10_IR100, CPU)
    torch.manual_seed(2)
    x_id, x_out = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16) * 0.2   # dark outliers
    model.train()
    method.loss(model, Batch(x_id, torch.tensor([0, 1, 2, 3]), x_out=x_out), np.random.RandomState(0))
    with torch.no_grad():
        pre_bn = model.conv1(torch.cat([x_id, x_out]))            # stem BN input [8, 64, 16, 16]
        id_only = model.conv1(x_id)
    joint_mean = pre_bn.mean(dim=(0, 2, 3))
    joint_var = pre_bn.transpose(0, 1).flatten(1).var(dim=1, unbiased=True)
    bn = model.bn1
    assert torch.allclose(bn.running_mean, 0.9 * 0 + 0.1 * joint_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 * 1 + 0.1 * joint_var, atol=1e-5)
    assert not torch.allclose(bn.running_mean, 0.1 * id_only.mean(dim=(0, 2, 3)), atol=1e-4)


def test_outlier_rows_have_no_loss_but_shape_the_id_loss():
    method = Method(RnaConfig(), CIFAR10_IR100, CPU)
    model = small_model()
    torch.manual_seed(3)
    x_id, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 9])
    x_out = torch.rand(4, 3, 8, 8).requires_grad_(True)
    rng = np.random.RandomState(0)
    # Train mode: the outliers move the BN batch statistics, so the ID loss depends on them.
    model.train()
    loss, _ = method.loss(model, Batch(x_id, y, x_out=x_out), rng)
    (grad,) = torch.autograd.grad(loss, x_out)
    assert float(grad.abs().sum()) > 0
    other, _ = method.loss(model, Batch(x_id, y, x_out=torch.zeros(4, 3, 8, 8)), rng)
    assert abs(float(other.detach()) - float(loss.detach())) > 1e-4
    # Eval mode (rows independent): an outlier row has no loss term of its own.
    model.eval()
    loss, _ = method.loss(model, Batch(x_id, y, x_out=x_out), rng)
    (grad,) = torch.autograd.grad(loss, x_out)
    assert float(grad.abs().sum()) == 0.0


# -- model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shortcut_affine", [True, False])
def test_bn_affine_off_except_flagged_shortcuts(shortcut_affine):
    model = models.create("resnet18_rna", 10, shortcut_bn_affine=shortcut_affine)
    bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    shortcuts = {f"layer{i}.0.shortcut.1" for i in (2, 3, 4)}
    assert shortcuts <= set(bns) and len(bns) == 20
    for name, bn in bns.items():
        assert bn.momentum == 0.1 and bn.eps == 1e-5
        assert (bn.weight is not None) == (shortcut_affine and name in shortcuts), name


def test_parameter_count_and_shapes():
    # kuangliu's ResNet-18 (C = 10) has 11,173,962 parameters, 9,600 of them BN γ, β over its 4,800
    # BN channels. RNA drops them except the shortcut BNs' 2·(128 + 256 + 512) = 1,792, and adds
    # h_φ: 512·512 + 512 + 512·128 + 128 = 328,320.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(models.create("resnet18_rna", 10)) == 11_173_962 - 9_600 + 1_792 + 328_320
    assert count(models.create("resnet18_rna", 10, shortcut_bn_affine=False)) == 11_173_962 - 9_600 + 328_320
    model = small_model()
    logits, feats = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (1, 2, 10) and feats.shape == (1, 2, 512)
    assert bool((feats >= 0).all())


def test_projection_is_an_unnormalised_mlp():
    model = small_model()
    f = torch.rand(3, 512) * 10
    lin1, lin2 = model.projection[0], model.projection[2]
    h = model.project(f)
    assert h.shape == (3, 128)
    assert torch.allclose(h, lin2(F.relu(lin1(f))), atol=1e-5)
    assert not torch.allclose(h.norm(dim=1), torch.ones(3))
    assert models.create("resnet18_rna", 10, projection="linear").projection.bias is None
    assert torch.equal(models.create("resnet18_rna", 10, projection="none").project(f), f)


# -- test-time score ------------------------------------------------------------------------------
def test_rn_confidence_is_the_feature_norm():
    method = Method(RnaConfig(), [4, 1], CPU)
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    conf = method.confidence(FeatureStub(), x)
    assert conf.tolist() == pytest.approx([5.0, 0.0, 10.0])
    # S_RN = -||f|| is higher for OOD; the confidence is its negation: large norms read as ID.
    assert metrics.auroc(np.array([5.0, 10.0]), np.array([0.0, 0.5])) == 1.0
    assert torch.allclose(representation_norm(x), -(-x.norm(dim=1)))


def test_generic_scores_fall_back_to_the_base_class():
    x = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    msp = Method(RnaConfig(ood_score="msp"), [4, 1], CPU).confidence(FeatureStub(), x)
    assert msp.tolist() == pytest.approx([math.e ** 2 / (math.e ** 2 + 1), 0.5], abs=1e-6)
    energy = Method(RnaConfig(ood_score="energy"), [4, 1], CPU).confidence(FeatureStub(), x)
    assert energy.tolist() == pytest.approx([math.log(math.e ** 2 + 1), 1 + math.log(2)], abs=1e-5)
    with pytest.raises(ValueError, match=r"ood_score='norm'.*rn"):
        RnaConfig(ood_score="norm")


# -- training ---------------------------------------------------------------------------------------
def test_a_few_sgd_steps_lower_the_loss():
    method = Method(RnaConfig(), CIFAR10_IR100, CPU)
    model = small_model()
    torch.manual_seed(4)
    batch = Batch(torch.rand(4, 3, 8, 8), torch.tensor([0, 2, 7, 9]), x_out=torch.rand(4, 3, 8, 8))
    rng = np.random.RandomState(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    before = float(method.loss(model, batch, rng)[0].detach())
    for _ in range(2):
        loss, _ = method.loss(model, batch, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(method.loss(model, batch, rng)[0].detach()) < before


def test_engine_shaped_batch_and_paper_recipe():
    cfg = RnaConfig()
    assert (cfg.epochs, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_schedule, cfg.warmup_epochs,
            cfg.batch_size, cfg.outlier_batch_size, cfg.ood_score, cfg.lambda_rna, cfg.tau_la) == (
        200, "adam", 1e-3, 5e-4, "cosine", 0, 128, None, "rn", 0.5, 1.0)
    assert [cfg.lr_at(e) for e in (0, 100, 199)] == pytest.approx(
        [1e-3, 5e-4, 1e-3 * 0.5 * (1 + math.cos(math.pi * 199 / 200))])
    method = Method(cfg, CIFAR10_IR100, CPU)
    assert Method.uses_outliers and not Method.uses_balanced_stream
    model = method.build_model()
    opt = method.build_optimizer(model)
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 5e-4
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    batch = Batch(method.train_transform(images[:2], gen), torch.tensor([0, 9]),
                  x_out=method.train_transform(images[2:], gen), index=torch.arange(2))
    model.train()
    loss, stats = method.loss(model, batch, np.random.RandomState(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(stats) == {"loss_la", "loss_rna", "feat_norm_id", "feat_norm_ood",
                          "active_ratio_id", "active_ratio_ood"}
    model.eval()
    x = method.eval_transform(images)
    assert torch.equal(x, images.float() / 255)
    assert method.confidence(model, x).shape == (4,) and method.logits(model, x).shape == (4, 10)


def test_search_space_holds_the_paper_point():
    space = spaces.get("rna")
    assert space.paper_point == {"lambda_rna": 0.5, "tau_la": 1.0, "lr": 1e-3}
    fields = set(RnaConfig().to_dict())
    for name, dist in space.distributions.items():
        value = space.paper_point[name]
        inside = value in dist.choices if hasattr(dist, "choices") else dist.low <= value <= dist.high
        assert name in fields and inside, name


# -- augmentation ---------------------------------------------------------------------------------------
def test_color_ops_match_torchvision_per_image():
    torch.manual_seed(5)
    x = torch.rand(6, 3, 8, 8)
    x[0] = 0.5                                  # grey: hue undefined, must stay put
    factor = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4, 0.0])
    shift = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5])
    pairs = ((augment.adjust_brightness, TF.adjust_brightness, factor),
             (augment.adjust_contrast, TF.adjust_contrast, factor),
             (augment.adjust_saturation, TF.adjust_saturation, factor),
             (augment.adjust_hue, TF.adjust_hue, shift))
    for ours, theirs, values in pairs:
        reference = torch.stack([theirs(x[i], float(values[i])) for i in range(6)])
        assert torch.allclose(ours(x, values), reference, atol=1e-5), ours.__name__
    assert torch.allclose(augment.grayscale(x), TF.rgb_to_grayscale(x))


def test_hue_rotation_hand_values():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    out = augment.adjust_hue(red, torch.tensor([1 / 3, -1 / 3]))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)   # green
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)   # blue


def test_jitter_and_grayscale_probabilities():
    x = torch.rand(64, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment.color_jitter(x, gen, p=0.0), x)
    assert torch.equal(augment.random_grayscale(x, gen, p=0.0), x)
    gray = augment.random_grayscale(x, gen, p=1.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    some = augment.random_grayscale(x, gen, p=0.5)
    is_gray = (some[:, 0] == some[:, 2]).flatten(1).all(1)
    assert 0 < int(is_gray.sum()) < 64
    jittered = augment.color_jitter(x, gen, p=1.0)
    assert bool(((jittered - x).abs().flatten(1).amax(1) > 0).all())


def test_training_view_shape_range_and_determinism():
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    one = augment.crop_flip_jitter_gray(images, torch.Generator().manual_seed(7))
    two = augment.crop_flip_jitter_gray(images, torch.Generator().manual_seed(7))
    other = augment.crop_flip_jitter_gray(images, torch.Generator().manual_seed(8))
    assert one.shape == (32, 3, 32, 32) and one.dtype == torch.float32
    assert float(one.min()) >= 0.0 and float(one.max()) <= 1.0
    assert torch.equal(one, two) and not torch.equal(one, other)
