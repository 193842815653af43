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


def outlier_exposure_loss(logits_out: torch.Tensor) -> torch.Tensor:
    """Returns OE's cross-entropy to the uniform distribution, mean over outlier rows:
    E[logsumexp_c z_c - (1/C) Σ_c z_c] (Hendrycks et al. 2019) for logits_out [B', C]."""
    return (torch.logsumexp(logits_out, -1) - logits_out.mean(-1)).mean()


def free_energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Returns E(x) = -T logsumexp(z / T) per row [B] (Liu et al. 2020); low = in-distribution."""
    return -temperature * torch.logsumexp(logits / temperature, -1)


def energy_margin_loss(logits_in: torch.Tensor, logits_out: torch.Tensor, m_in: float,
                       m_out: float) -> torch.Tensor:
    """Returns Energy-OE's regulariser E_in[max(0, E(x) - m_in)^2] + E_out[max(0, m_out - E(x'))^2]
    (Liu et al. 2020, Eq. 9; T = 1): ID energies pushed below m_in, outliers' above m_out."""
    return (F.relu(free_energy(logits_in) - m_in).pow(2).mean()
            + F.relu(m_out - free_energy(logits_out)).pow(2).mean())
