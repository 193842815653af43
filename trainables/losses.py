"""Loss pieces several methods share (each method file imports them; none re-implements them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def log_prior(counts: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Returns log π_c = log(n_c / Σ n) [C] for the training class counts (Menon et al. 2021)."""
    n = torch.as_tensor(counts, dtype=torch.float32, device=device)
    return torch.log(n / n.sum())


def logit_adjusted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, prior_log: torch.Tensor,
                                 tau: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Returns CE(z + τ log π, y): the logit-adjusted loss (Menon et al. 2021, Eq. 10).

    logits [B, C] raw; y [B] int64 (or [B, C] soft targets); prior_log [C] from `log_prior`.
    τ = 0 is plain cross-entropy. At test time the raw logits are used (no adjustment).
    """
    adjusted = logits + tau * prior_log.to(logits.dtype)[None, :]
    if y.dim() == 2:
        loss = -(y * F.log_softmax(adjusted, -1)).sum(-1)
        return loss.mean() if reduction == "mean" else loss
    return F.cross_entropy(adjusted, y, reduction=reduction)
