"""OOD detectors behind one call: `confidence(name, logit_fn, x, **params) -> [B]`.

Every detector returns a confidence (higher = more in-distribution). `logit_fn` maps a batch of
normalised images [B, 3, H, W] to ensemble logits [B, C]; detectors that need gradients (ODIN)
call it again on perturbed inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LogitFn = Callable[[torch.Tensor], torch.Tensor]


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Returns the maximum softmax probability per row."""
    return logits.float().softmax(-1).max(-1).values


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Returns -E(z) = T * logsumexp(z / T) (Liu et al. 2020); higher = more ID."""
    return temperature * torch.logsumexp(logits.float() / temperature, -1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Returns the largest logit per row."""
    return logits.float().max(-1).values


def odin(logit_fn: LogitFn, x: torch.Tensor, temperature: float = 1000.0, eps: float = 0.0014,
         std: tuple[float, ...] = (0.2023, 0.1994, 0.2010)) -> torch.Tensor:
    """Returns ODIN's log max-softmax at temperature T on the perturbed input (Liang et al. 2018).

    x_hat = x + eps * sign(grad_x log S_yhat(x; T)) / std: eps is in [0, 1] pixel units and the
    network sees normalised inputs, hence the division by the per-channel std. The score is
    max(z/T) - logsumexp(z/T) in float64, the log of max-softmax: same ranking, and no float32
    saturation at T = 1000 (DARL spec §3.6; Eq. 13's printed sign is wrong, this is the standard form).
    """
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        z = logit_fn(x).float() / temperature
        log_s = F.log_softmax(z, -1).gather(1, z.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(log_s, x)
    step = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x_hat = x.detach() + eps * grad.sign() / step
    with torch.no_grad():
        zh = logit_fn(x_hat).double() / temperature
        return zh.max(-1).values - torch.logsumexp(zh, -1)


_LOGIT_SCORES = {"msp": msp, "energy": energy, "max_logit": max_logit}
NAMES = [*_LOGIT_SCORES, "odin"]


def confidence(name: str, logit_fn: LogitFn, x: torch.Tensor, **params) -> torch.Tensor:
    """Returns the named detector's confidence [B] for normalised images x [B, 3, H, W]."""
    if name == "odin":
        return odin(logit_fn, x, **params)
    if name not in _LOGIT_SCORES:
        raise ValueError(f"unknown OOD score {name!r}; expected one of {', '.join(NAMES)}")
    with torch.no_grad():
        return _LOGIT_SCORES[name](logit_fn(x), **params)
