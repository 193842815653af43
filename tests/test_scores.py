"""OOD scores against hand values (DARL spec §9 item 17) and their uniform call."""
import math

import pytest
import torch

from trainables import scores


def test_odin_toy_hand_value():
    # 1-pixel input x = 0.5, z = [x, -x], T = 1, eps = 0.1, std = 1: x_hat = 0.6, score = log σ(1.2).
    x = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    logit_fn = lambda t: torch.cat([t.flatten(1), -t.flatten(1)], 1)  # noqa: E731
    s = scores.odin(logit_fn, x, temperature=1.0, eps=0.1, std=(1.0,))
    assert float(s.exp()) == pytest.approx(0.768525, abs=1e-6)
    assert abs(float(s) - math.log(1 / (1 + math.exp(-1.2)))) < 1e-12


def test_odin_perturbation_raises_confidence_of_the_predicted_class():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.randn(4, 3, 2, 2)
    plain = scores.odin(net, x, temperature=1000.0, eps=0.0)
    moved = scores.odin(net, x, temperature=1000.0, eps=0.01)
    assert torch.all(moved >= plain)


def test_logit_scores_hand_values():
    z = torch.tensor([[2.0, 0.0, 0.0]])
    assert float(scores.msp(z)) == pytest.approx(math.exp(2) / (math.exp(2) + 2))
    assert float(scores.energy(z)) == pytest.approx(math.log(math.exp(2) + 2))
    assert float(scores.energy(z, temperature=2.0)) == pytest.approx(3.102889, abs=1e-6)
    assert float(scores.max_logit(z)) == 2.0


def test_confidence_dispatch_and_unknown_name():
    fn = lambda t: t.flatten(1)  # noqa: E731
    x = torch.tensor([[[[1.0]], [[3.0]]]])
    assert float(scores.confidence("max_logit", fn, x)) == 3.0
    with pytest.raises(ValueError, match="unknown OOD score 'gram'"):
        scores.confidence("gram", fn, x)
    with pytest.raises(ValueError, match="OOD score 'mahalanobis' needs features and fitted training"):
        scores.confidence("mahalanobis", fn, x)


def test_odin_grid_matches_odin_point_by_point():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.randn(5, 3, 2, 2)
    grid = scores.odin_grid(net, x, [1.0, 1000.0], [0.0, 0.0014, 0.01], std=(0.5, 0.25, 1.0))
    assert sorted(grid) == [(1.0, 0.0), (1.0, 0.0014), (1.0, 0.01), (1000.0, 0.0), (1000.0, 0.0014),
                            (1000.0, 0.01)]
    for (t, eps), conf in grid.items():
        assert torch.equal(conf, scores.odin(net, x, temperature=t, eps=eps, std=(0.5, 0.25, 1.0)))
    # eps = 0 is temperature-scaled log max-softmax of the clean logits.
    z = net(x).double()
    assert torch.allclose(grid[(1.0, 0.0)], torch.log_softmax(z, -1).max(-1).values)
