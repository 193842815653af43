"""Hand-checkable tests for LGLA bands, margins and AAW (DARL spec §9, tests 2 and 3)."""
import math

import pytest
import torch

from trainables import lgla


def lt_counts(num_classes: int, n_max: int, imbalance: int) -> list[int]:
    """LDAM's exponential profile: n_c = floor(n_max * IR^(-c / (C-1)))."""
    return [int(n_max * (1 / imbalance) ** (c / (num_classes - 1))) for c in range(num_classes)]


def members(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


# ---- class bands -------------------------------------------------------------------------------

def test_lt_counts_match_spec():
    assert lt_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert [sum(lt_counts(10, 5000, ir)) for ir in (10, 50, 100)] == [20431, 13996, 12406]
    assert [sum(lt_counts(100, 500, ir)) for ir in (10, 50, 100)] == [19573, 12608, 10847]


@pytest.mark.parametrize("imbalance, head", [(100, [0]), (50, [0]), (10, [0, 1])])
def test_bands_cifar10(imbalance, head):
    bands = lgla.class_bands(lt_counts(10, 5000, imbalance), 3)
    assert len(bands) == 2
    assert all(b.dtype == torch.bool and b.shape == (10,) for b in bands)
    assert members(bands[0]) == head
    assert members(bands[1]) == [c for c in range(10) if c not in head]


@pytest.mark.parametrize("imbalance, head_size", [(10, 25), (50, 16), (100, 14)])
def test_bands_cifar100_head_sizes(imbalance, head_size):
    bands = lgla.class_bands(lt_counts(100, 500, imbalance), 3)
    assert members(bands[0]) == list(range(head_size))
    assert members(bands[1]) == list(range(head_size, 100))


def test_bands_follow_counts_not_class_order():
    counts = lt_counts(10, 5000, 10)[::-1]  # head classes last
    bands = lgla.class_bands(counts, 3)
    assert members(bands[0]) == [8, 9]


def test_bands_k1_is_empty():
    assert lgla.class_bands(lt_counts(10, 5000, 100), 1) == []


def test_bands_k4_cifar10_ir100_empty_head_band_raises():
    with pytest.raises(ValueError, match=r"band 0 .*\(5000, 5000\].* empty"):
        lgla.class_bands(lt_counts(10, 5000, 100), 4)


def test_bands_k5_too_few_bands_raises():
    with pytest.raises(ValueError, match="needs 4 class bands .* gives 3"):
        lgla.class_bands(lt_counts(10, 5000, 100), 5)


def test_bands_k2_raises():
    with pytest.raises(ValueError, match="num_experts=2"):
        lgla.class_bands(lt_counts(10, 5000, 100), 2)


# ---- static margins ----------------------------------------------------------------------------

def test_static_margins_cifar10_ir100():
    T = lgla.static_margins(lt_counts(10, 5000, 100), 3, tau_gla=3.0)
    assert T.shape == (3, 10) and T.dtype == torch.float32
    assert torch.allclose(T[0], torch.full((10,), -0.908742), atol=1e-5)
    assert T[1][0].item() == pytest.approx(-0.908742, abs=1e-5)
    assert T[1][1].item() == pytest.approx(-1.420568, abs=1e-5)
    assert T[2][0].item() == pytest.approx(-2.726227, abs=1e-5)
    assert T[1][9].item() == pytest.approx(math.log(50 / 12406), abs=1e-5)


def test_static_margins_cifar100_ir100_global():
    T = lgla.static_margins(lt_counts(100, 500, 100), 3, tau_gla=2.5)
    assert T[2][0].item() == pytest.approx(-7.692589, abs=1e-5)


def test_static_margins_local_expert_constant_outside_band():
    counts = lt_counts(100, 500, 10)
    T = lgla.static_margins(counts, 3, tau_gla=2.5)
    log_max = math.log(500 / sum(counts))
    assert torch.allclose(T[0][25:], torch.full((75,), log_max), atol=1e-5)  # outside C_0
    assert torch.allclose(T[1][:25], torch.full((25,), log_max), atol=1e-5)  # outside C_1


def test_static_margins_k1_is_plain_log_prior():
    counts = [75, 25]
    T = lgla.static_margins(counts, 1, tau_gla=3.0)
    assert T.shape == (1, 2)
    assert torch.allclose(T[0], torch.tensor([math.log(0.75), math.log(0.25)]), atol=1e-6)


def test_default_tau_gla():
    assert lgla.default_tau_gla(10) == 3.0
    assert lgla.default_tau_gla(100) == 2.5
    assert (lgla.default_tau_gla(1000), lgla.default_tau_gla(365)) == (2.8, 2.4)   # ImageNet-LT, Places-LT


# ---- adaptive angular weight -------------------------------------------------------------------

S = 2.0
TWO_BANDS = [torch.tensor([True, False]), torch.tensor([False, True])]


def z_of(*angles: float) -> list[float]:
    """Logits whose angles to the class weights are `angles`: z = s * cos(theta)."""
    return [S * math.cos(a) for a in angles]


def test_aaw_hand_example():
    # Clean rows: class 0 at angles 0.5 and 0.9 (band mean 0.7), class 1 at 1.2 (mean 1.2).
    # Row 3 is two-hot; its angles (1.0, 1.0) are compared with each column's band mean.
    logits = torch.tensor([z_of(0.5, 1.0), z_of(0.9, 1.5), z_of(0.3, 1.2), z_of(1.0, 1.0)])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    G = lgla.aaw_weights(logits, q, TWO_BANDS, cos_scale=S)
    expected = torch.tensor([[1.0, 1.0],    # 0.5 < 0.7; 1.0 < 1.2
                             [1.2, 1.3],    # 0.9 - 0.7; 1.5 - 1.2
                             [1.0, 1.0],    # 0.3 < 0.7; 1.2 = 1.2
                             [1.3, 1.0]])   # 1.0 - 0.7; 1.0 < 1.2
    assert torch.allclose(G, expected, atol=1e-5)


def test_aaw_two_hot_rows_do_not_move_the_means():
    logits = torch.tensor([z_of(0.5, 1.0), z_of(0.9, 1.5), z_of(0.3, 1.2)])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    base = lgla.aaw_weights(logits, q, TWO_BANDS, cos_scale=S)
    mixed_logits = torch.cat([logits, torch.tensor([z_of(3.0, 0.01)])])
    mixed_q = torch.cat([q, torch.tensor([[0.5, 0.5]])])
    with_mixed = lgla.aaw_weights(mixed_logits, mixed_q, TWO_BANDS, cos_scale=S)
    assert torch.allclose(with_mixed[:3], base, atol=1e-6)


def test_aaw_column_without_clean_rows_gets_weight_one():
    # Only band 0 has clean rows, so column 1 stays at 1 even for a two-hot row far out.
    logits = torch.tensor([z_of(0.5, 2.0), z_of(0.9, 2.5), z_of(1.5, 3.0)])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.4, 0.6]])
    G = lgla.aaw_weights(logits, q, TWO_BANDS, cos_scale=S)
    assert torch.all(G[:, 1] == 1.0)
    assert G[2, 0].item() == pytest.approx(1.8, abs=1e-5)  # 1.5 - mean(0.5, 0.9)


def test_aaw_matches_lgla_on_clean_batch():
    # LGLA's cal_one_hot: g_i = 1 + max(0, theta_{i,y_i} - mean over the band of y_i).
    gen = torch.Generator().manual_seed(0)
    counts = lt_counts(10, 5000, 100)
    bands = lgla.class_bands(counts, 3)
    logits = 30 * (2 * torch.rand(64, 10, generator=gen) - 1)
    y = torch.randint(0, 10, (64,), generator=gen)
    G = lgla.aaw_weights(logits, torch.eye(10)[y], bands, cos_scale=30.0)
    theta_y = torch.acos(logits[torch.arange(64), y] / 30)
    expected = torch.ones(64)
    for band in bands:
        rows = band[y]
        expected[rows] = 1 + (theta_y[rows] - theta_y[rows].mean()).clamp_min(0)
    assert torch.allclose(G[torch.arange(64), y], expected, atol=1e-5)


def test_aaw_at_least_one_and_no_grad():
    logits = (30 * torch.rand(16, 10) - 15).requires_grad_(True)
    q = torch.eye(10)[torch.randint(0, 10, (16,))]
    q[8:] = 0.5 * q[8:] + 0.5 * q[:8]
    G = lgla.aaw_weights(logits, q, lgla.class_bands(lt_counts(10, 5000, 100), 3), 30.0)
    assert G.shape == (16, 10)
    assert not G.requires_grad and G.grad_fn is None
    assert torch.all(G >= 1.0) and torch.isfinite(G).all()


def test_aaw_survives_saturated_cosines():
    logits = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])  # |cos| = 1 exactly
    G = lgla.aaw_weights(logits, torch.eye(2), TWO_BANDS, cos_scale=30.0)
    assert torch.isfinite(G).all()


def test_aaw_k1_is_ones():
    G = lgla.aaw_weights(torch.randn(4, 3), torch.eye(3)[[0, 1, 2, 0]], [], cos_scale=30.0)
    assert torch.equal(G, torch.ones(4, 3))


def test_aaw_explicit_clean_mask():
    # A same-class mixed row is one-hot; `clean` can still keep it out of the means.
    logits = torch.tensor([z_of(0.5, 1.0), z_of(0.9, 1.0), z_of(0.3, 1.0)])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    clean = torch.tensor([True, True, False])
    G = lgla.aaw_weights(logits, q, TWO_BANDS, cos_scale=S, clean=clean)
    assert G[1, 0].item() == pytest.approx(1.2, abs=1e-5)
