"""EAT stage 1: the abstention assignment, the tail paste composition, each loss term and the
test-time score against hand values; the method on an engine-shaped batch and a gradient check."""
import math

import numpy as np
import pytest
import torch

import spaces
from trainables import augment, models
from trainables.eat import (EatConfig, Method, abstention_mass, abstention_targets, cycled_sources,
                            eat_head_loss, num_abstention_classes, paste_box)
from trainables.engine import Batch
from trainables.method import TrainData

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CPU = torch.device("cpu")
LN2, LN3 = math.log(2), math.log(3)


def bools(text):
    return torch.tensor([c == "1" for c in text])


def test_abstention_targets_take_the_highest_abstention_logit():
    # C = 2, A = 3. Row 1: abstention logits (1, 3, 2) -> class 2 + 1 = 3, although the ID logit 5
    # is the largest overall. Row 2: (0, 0, 4) -> class 4.
    logits = torch.tensor([[5.0, 0.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0, 4.0]])
    assert abstention_targets(logits, num_classes=2).tolist() == [3, 4]


def test_num_abstention_classes():
    assert num_abstention_classes(10, 0.3) == 3 and num_abstention_classes(100, 0.3) == 30
    with pytest.raises(ValueError, match="abstention_ratio=0.01 gives 0 abstention classes"):
        num_abstention_classes(10, 0.01)


def test_cycled_sources_repeat_tail_rows_over_head_rows():
    # Head rows at 0, 1, 3, 4, 6 (c = 5), tail rows at 2, 5 (s = 2): floor(5/2) * 2 = 4 head rows
    # are used (ranks 0-3), paired with tail ranks 0, 1, 0, 1 = rows 2, 5, 2, 5; row 6 is unused.
    src, used = cycled_sources(bools("1101101"), bools("0010010"))
    assert used.tolist() == [True, True, False, True, True, False, False]
    assert src[used].tolist() == [2, 5, 2, 5]
    # Every context (the outliers): 5 rows, floor(5/2) * 2 = 4 used, sources cycle 2, 5, 2, 5.
    src, used = cycled_sources(torch.ones(5, dtype=torch.bool), bools("0010010"))
    assert used.tolist() == [True, True, True, True, False] and src[:4].tolist() == [2, 5, 2, 5]
    # No tail rows, or fewer head rows than tail rows (floor(1/2) = 0): nothing is pasted.
    assert not cycled_sources(bools("1101101"), bools("0000000"))[1].any()
    assert not cycled_sources(bools("1000000"), bools("0010010"))[1].any()


def test_paste_box_copies_exactly_the_box():
    context, source = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    out = paste_box(context, source, (1, 3, 0, 2))      # rows 1-2, columns 0-1: 4 of 16 pixels
    assert float(out.sum()) == 3 * 4
    assert out[0, :, 1:3, 0:2].eq(1).all() and float(context.sum()) == 0   # context untouched


def marked(values):
    """Images [N, 3, 32, 32] whose every pixel holds the row's marker value."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 32, 32).clone()


def test_paste_rows_composition_areas_and_labels():
    # Classes 0-3 are head, 6-9 tail. y = (0, 1, 6, 2, 3, 9, 0): head rows 0, 1, 3, 4, 6; tail 2, 5.
    method = Method(EatConfig(), CIFAR10_IR100, CPU)
    y = torch.tensor([0, 1, 6, 2, 3, 9, 0])
    v1, v2, out = marked(range(10, 17)), marked(range(100, 107)), marked(range(200, 205))
    seed = 4
    images, labels, used = method.paste_rows(v1, v2, y, out, np.random.RandomState(seed))
    assert images.shape == (7 + 7 + 5, 3, 32, 32)
    # Used rows: head ranks 0-3 in each view (rows 0, 1, 3, 4), outliers 0-3 of 5.
    assert used.tolist() == [1, 1, 0, 1, 1, 0, 0] * 2 + [1, 1, 1, 1, 0]
    assert labels[used].tolist() == [6, 9, 6, 9] * 3        # the pasted tail rows' own labels
    # The two groups' boxes, from the same draws as the method: λ ~ Beta(0.9999, 0.9999) each.
    rng = np.random.RandomState(seed)
    boxes = [augment.cutmix_box(32, 32, rng.beta(0.9999, 0.9999), rng) for _ in range(2)]
    for row, context, source, box in ((0, 10, 12, boxes[0]), (1, 11, 15, boxes[0]),
                                      (7 + 3, 103, 102, boxes[0]), (14, 200, 12, boxes[1]),
                                      (17, 203, 15, boxes[1])):
        y1, y2, x1, x2 = box
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        img = images[row, 0]
        assert img[inside].eq(source).all() and img[~inside].eq(context).all(), row
        assert int((img == source).sum()) == (y2 - y1) * (x2 - x1)   # the pasted area


def test_head_loss_hand_values():
    # C = 2, A = 2. Rows: one ID row (label 0), one outlier, two pasted rows (the second unused).
    # ID: (ln 3, 0, 0, 0) -> P(0) = 3 / 6 -> CE = ln 2.
    # Outlier: (0, 0, 0, ln 2) -> target 2 + argmax(0, ln 2) = 3; P(3) = 2 / 5 -> CE = ln 5/2.
    # Pasted, used, label 1: (0, ln 3, 0, 0) -> ln 2. The unused row (9, 0, 0, 0), label 0, is ignored.
    logits = torch.tensor([[LN3, 0, 0, 0], [0, 0, 0, LN2], [0, LN3, 0, 0], [9.0, 0, 0, 0]])
    loss, terms = eat_head_loss(logits, torch.tensor([0]), 1, torch.tensor([1, 0]), bools("10"),
                                num_classes=2, lambda_cutmix=0.5, lambda_ood=2.0)
    assert float(terms["loss_id"]) == pytest.approx(LN2, abs=1e-6)
    assert float(terms["loss_ood"]) == pytest.approx(math.log(2.5), abs=1e-6)
    assert float(terms["loss_cutmix"]) == pytest.approx(LN2, abs=1e-6)
    assert float(loss) == pytest.approx(LN2 + 0.5 * LN2 + 2.0 * math.log(2.5), abs=1e-6)
    # No used pasted row: the paste term is 0.
    _, terms = eat_head_loss(logits, torch.tensor([0]), 1, torch.tensor([1, 0]), bools("00"), 2, 0.5, 2.0)
    assert float(terms["loss_cutmix"]) == 0.0


def test_test_time_score_and_prediction_hand_values():
    # Two heads, C = 1 ID class, A = 1. Head 0 logits (0, 0): P(abstain) = 1/2; head 1 (0, ln 3):
    # P(abstain) = 3/4. Abstention mass 1/2 + 3/4 = 5/4. ID probability: mean of 1/2 and 1/4 = 3/8.
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, LN3]]])
    assert abstention_mass(logits, 1).tolist() == pytest.approx([1.25])

    class Stub(torch.nn.Module):
        def forward(self, x):
            return logits, logits[..., :1]
    method = Method(EatConfig(abstention_ratio=1.0), [5], CPU)
    assert method.num_abstention == 1
    assert method.confidence(Stub(), torch.zeros(1, 3, 32, 32)).tolist() == pytest.approx([-1.25])
    assert method.logits(Stub(), torch.zeros(1, 3, 32, 32))[0].tolist() == pytest.approx([math.log(3 / 8)])


def test_prediction_ignores_the_abstention_columns():
    # One head, C = 2, A = 1: (0, 1, 5). The abstention class dominates, the ID argmax is class 1.
    logits = torch.tensor([[[0.0, 1.0, 5.0]]])

    class Stub(torch.nn.Module):
        def forward(self, x):
            return logits, logits
    method = Method(EatConfig(abstention_ratio=0.5, num_heads=1), [5, 1], CPU)
    assert method.logits(Stub(), torch.zeros(1, 3, 32, 32)).argmax(1).tolist() == [1]


def test_config_defaults_follow_the_code():
    cfg = EatConfig()
    assert (cfg.optimizer, cfg.lr_schedule, cfg.lr, cfg.weight_decay) == ("adam", "cosine", 1e-3, 5e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.outlier_batch_size, cfg.warmup_epochs) == (180, 128, None, 0)
    assert (cfg.lambda_cutmix, cfg.lambda_ood, cfg.num_heads, cfg.ood_score) == (0.05, 0.05, 3, "abstention")
    c10 = Method(cfg, CIFAR10_IR100, CPU)
    assert c10.num_abstention == 3
    assert c10.is_head.tolist() == [True] * 4 + [False] * 6
    assert c10.is_tail.tolist() == [False] * 6 + [True] * 4
    assert Method(cfg, list(range(500, 0, -5)), CPU).num_abstention == 30
    with pytest.raises(ValueError, match="ood_score='odin'; accepted: abstention, msp"):
        EatConfig(ood_score="odin")


def test_space_paper_point_is_inside_and_configurable():
    space = spaces.get("eat")
    for name, value in space.paper_point.items():
        dist = space.distributions[name]
        assert dist.low <= value <= dist.high
    assert EatConfig.from_dict(space.paper_point).abstention_ratio == 0.3


def test_multihead_model_shapes():
    model = models.create("resnet32_multihead", 13, num_heads=3)
    logits, feats = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (3, 2, 13) and feats.shape == (3, 2, 64)
    assert not torch.equal(model.heads[0].weight, model.heads[1].weight)   # independent heads


def engine_batch(method, n_id=12, n_out=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n_id + n_out, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.arange(n_id) % 10
    method.begin_training(TrainData(x[:n_id], y, x[:0], y[:0]))
    return Batch(method.train_transform(x[:n_id], gen), y, x_out=method.train_transform(x[n_id:], gen),
                 index=torch.arange(n_id)), x


def test_model_contract_and_method_loss_on_an_engine_batch():
    torch.manual_seed(0)
    method = Method(EatConfig(), CIFAR10_IR100, CPU)
    model = method.build_model()
    batch, x = engine_batch(method)
    loss, stats = method.loss(model, batch, np.random.RandomState(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss_id", "loss_cutmix", "loss_ood", "pasted_rows"} <= set(stats)
    # y = 0..9, 0, 1: head rows 0-3, 10, 11 (6), tail rows 6-9 (4): floor(6/4) * 4 = 4 per view;
    # 8 outliers: floor(8/4) * 4 = 8. 4 + 4 + 8 = 16.
    assert float(stats["pasted_rows"]) == 16
    model.eval()
    images = method.eval_transform(x[:3])
    assert method.logits(model, images).shape == (3, 10)
    conf = method.confidence(model, images)
    assert conf.shape == (3,) and bool(((conf <= 0) & (conf >= -3)).all())


def test_total_sums_the_heads():
    # Three identical heads give three times the one-head loss on the same rows.
    torch.manual_seed(0)
    one = Method(EatConfig(num_heads=1), CIFAR10_IR100, CPU)
    three = Method(EatConfig(num_heads=3), CIFAR10_IR100, CPU)
    model1, model3 = one.build_model().eval(), three.build_model().eval()
    trunk = {k: v for k, v in model1.state_dict().items() if not k.startswith("heads")}
    model3.load_state_dict(trunk, strict=False)
    for head in model3.heads:
        head.load_state_dict(model1.heads[0].state_dict())
    batch, x = engine_batch(one)
    three.begin_training(TrainData(x[:12], batch.y, x[:0], batch.y[:0]))
    loss1, _ = one.loss(model1, batch, np.random.RandomState(2))
    loss3, _ = three.loss(model3, batch, np.random.RandomState(2))
    assert float(loss3.detach()) == pytest.approx(3 * float(loss1.detach()), rel=1e-5)


def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    method = Method(EatConfig(), CIFAR10_IR100, CPU)
    model = method.build_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    batch, _ = engine_batch(method, n_id=10, n_out=4)

    def loss_now():
        return method.loss(model, batch, np.random.RandomState(0))[0]   # same views and boxes
    before = float(loss_now().detach())
    for _ in range(3):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
    assert float(loss_now().detach()) < before
