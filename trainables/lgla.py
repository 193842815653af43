"""LGLA's class bands, group-wise static margins and adaptive angular weight (AAW).

Shared by DARL and RICASSO (DARL spec §3.0, §3.5; Tao et al., ICCV 2023, `Tao0-0/LGLA`).
With K experts, experts 0..K-2 are "local": expert k adjusts logits only inside its class band
C_k, a contiguous range of class counts holding about N/(K-1) samples. Expert K-1 is "global"
and over-compensates with tau_G * log(phi) (an inverse long-tailed expert). K == 1 is a single
model with plain logit adjustment and no bands.

    bands = class_bands(counts, K)                 # K-1 bool masks [C], head band first
    T = static_margins(counts, K, tau_gla)          # [K, C], T_k(c)
    G = aaw_weights(logits[k], q, bands, s)         # [M, C], no grad, multiplies the target q
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

LOG_EPS = 1e-9       # LGLA adds it inside every log of the prior
COS_CLAMP = 1e-7     # keeps arccos finite when |z / s| reaches 1 in low precision
ONE_HOT_TOL = 1e-6   # a target row is "clean" when its largest entry is 1 within this


def _check_counts(counts: Sequence[int]) -> list[int]:
    """Returns counts as a list of ints; ValueError if empty, negative or all zero."""
    counts = [int(n) for n in counts]
    if not counts or min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"class counts must be a non-empty list of counts >= 0 with a "
                         f"positive total, got {counts}")
    return counts


def _band_edges(counts: list[int], num_experts: int) -> list[tuple[int, int]]:
    """Returns LGLA's `get_region_points` intervals (lo, hi] of class counts, head band first.

    Sort counts ascending and accumulate; each time the running sum exceeds N // (K-1),
    the current count becomes a cut and the sum restarts. Cuts are then reversed, so the
    bands read (cut_0, max], (cut_1, cut_0], ..., (0, cut_last].
    """
    quota = sum(counts) // (num_experts - 1)
    cuts, running = [], 0
    for n in sorted(counts):
        running += n
        if running > quota:
            cuts.append(n)
            running = 0
    cuts.reverse()
    uppers = [max(counts)] + cuts
    lowers = cuts + [0]
    return list(zip(lowers, uppers))


def class_bands(counts: Sequence[int], num_experts: int) -> list[torch.Tensor]:
    """Returns the K-1 local class bands C_k as bool masks of shape [C], head band first.

    Class c is in band k when lo_k < n_c <= hi_k (LGLA's equal-sample split). K == 1 returns []
    (single model, no local experts). Raises ValueError where LGLA's split degenerates:
    K == 2 (LGLA's loss is undefined), fewer than K-1 bands, or an empty band.
    """
    counts = _check_counts(counts)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts == 1:
        return []
    if num_experts == 2:
        raise ValueError("num_experts=2 has no LGLA class bands (one local expert over all "
                         "classes; LGLA's loss crashes on it); use num_experts=1 or >= 3")
    if 0 in counts:
        raise ValueError(f"class {counts.index(0)} has 0 training samples, so it falls in no "
                         f"LGLA band (bands are (lo, hi] with lo >= 0)")
    edges = _band_edges(counts, num_experts)
    if len(edges) != num_experts - 1:
        raise ValueError(f"num_experts={num_experts} needs {num_experts - 1} class bands but "
                         f"LGLA's equal-sample split of counts {counts} gives {len(edges)}: "
                         f"{_describe(edges)}")
    n = torch.tensor(counts)
    bands = [(n > lo) & (n <= hi) for lo, hi in edges]
    for k, band in enumerate(bands):
        if not band.any():
            lo, hi = edges[k]
            raise ValueError(f"num_experts={num_experts}: band {k} (local expert {k}, counts in "
                             f"({lo}, {hi}]) is empty for counts {counts}; that expert would "
                             f"train as plain CE (constant margin). Bands: {_describe(edges)}")
    return bands


def _describe(edges: list[tuple[int, int]]) -> str:
    """Returns the bands as a short string, e.g. '(2997, 5000], (0, 2997]'."""
    return ", ".join(f"({lo}, {hi}]" for lo, hi in edges)


def static_margins(counts: Sequence[int], num_experts: int, tau_gla: float) -> torch.Tensor:
    """Returns the group-wise static margins T_k(c), float32 of shape [K, C].

    With phi_c = n_c / N (1e-9 added inside every log, as LGLA does):
    - local expert k < K-1: log phi_c inside its band C_k, log max_c' phi_c' outside (a constant
      there, so it cancels in the softmax);
    - global expert K-1: tau_G * log phi_c (tau_G = `tau_gla`);
    - K == 1: plain logit adjustment log phi_c; `tau_gla` is not used.
    """
    counts = _check_counts(counts)
    phi = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    log_phi = torch.log(phi + LOG_EPS)
    if num_experts == 1:
        return log_phi[None].float()
    bands = class_bands(counts, num_experts)
    log_phi_max = math.log(phi.max().item() + LOG_EPS)
    local = [torch.where(band, log_phi, torch.full_like(log_phi, log_phi_max)) for band in bands]
    return torch.stack(local + [tau_gla * log_phi]).float()


def default_tau_gla(num_classes: int) -> float:
    """Returns LGLA's global-expert exponent tau_G: 3.0 for CIFAR-10, 2.8 for ImageNet-LT (1000
    classes, ResNet-50), 2.4 for Places-LT (365 classes), 2.5 otherwise (LGLA's configs)."""
    return {10: 3.0, 1000: 2.8, 365: 2.4}.get(num_classes, 2.5)


def _band_index(bands: list[torch.Tensor], num_classes: int, device: torch.device) -> torch.Tensor:
    """Returns r(c), the band holding class c, as long [C]; -1 where no band holds c."""
    index = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    for r, band in enumerate(bands):
        if band.shape != (num_classes,):
            raise ValueError(f"band {r} has shape {tuple(band.shape)}, expected ({num_classes},)")
        index[band.to(device=device, dtype=torch.bool)] = r
    return index


@torch.no_grad()
def aaw_weights(logits_k: torch.Tensor, q: torch.Tensor, bands: list[torch.Tensor],
                cos_scale: float, clean: torch.Tensor | None = None) -> torch.Tensor:
    """Returns LGLA's adaptive angular weights g for one expert, float32 [M, C], no grad.

    logits_k: [M, C] raw logits s * cos of expert k (before any margin); q: [M, C] targets.
    The weight multiplies the target: loss_k = -sum_c g[i, c] q[i, c] log p_k(c | x_i).

    Rule (LGLA's `cal_one_hot`, generalised to two-hot targets per DARL spec §3.0):
    - theta[i, c] = arccos(z[i, c] / s), per class column (clamped to stay finite);
    - mean_theta[r] = batch mean of theta[i, y_i] over clean rows i whose label y_i lies in
      local band r (the K-1 local bands serve every expert, the global one included);
    - g[i, c] = 1 + max(0, theta[i, c] - mean_theta[r(c)]).
    Clean rows are the one-hot rows of q unless `clean` (bool [M]) says otherwise. Mixed rows
    never enter the means, so pseudo-OOD rows do not move the clean rows' reference angle.
    Columns whose band has no clean row in the batch (or that lie in no band) get weight 1,
    as a row of an absent band gets weight 1 in LGLA. With no bands (K == 1) all weights are 1.

    On a batch of clean rows, g[i, y_i] is exactly LGLA's weight; other entries meet q = 0.
    """
    m, c = logits_k.shape
    weights = torch.ones(m, c, dtype=torch.float32, device=logits_k.device)
    if not bands:
        return weights
    cos = (logits_k.detach().float() / cos_scale).clamp(-1 + COS_CLAMP, 1 - COS_CLAMP)
    theta = torch.arccos(cos)                                           # [M, C]

    band_of = _band_index(bands, c, logits_k.device)                    # r(c), [C]
    labels = q.argmax(dim=1)                                            # y_i, [M]
    if clean is None:
        clean = q.max(dim=1).values >= 1 - ONE_HOT_TOL
    rows = clean.to(logits_k.device).bool() & (band_of[labels] >= 0)
    row_band = band_of[labels[rows]]
    theta_y = theta[rows].gather(1, labels[rows, None]).squeeze(1)

    num_bands = len(bands)
    totals = torch.zeros(num_bands, device=theta.device).index_add(0, row_band, theta_y)
    sizes = torch.zeros(num_bands, device=theta.device).index_add(
        0, row_band, torch.ones_like(theta_y))
    mean_theta = totals / sizes.clamp_min(1)                            # bar theta_r, [K-1]

    in_band = band_of >= 0
    column_band = band_of.clamp_min(0)
    column_ok = in_band & (sizes[column_band] > 0)                      # [C]
    excess = (theta - mean_theta[column_band]).clamp_min(0)             # [M, C]
    return weights + torch.where(column_ok, excess, torch.zeros_like(excess))
