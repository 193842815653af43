"""OOD detectors behind one call: `confidence(name, logit_fn, x, **params) -> [B]`.

Every detector returns a confidence (higher = more in-distribution). `logit_fn` maps a batch of
normalised images [B, 3, H, W] to ensemble logits [B, C]; detectors that need gradients (ODIN)
call it again on perturbed inputs. The feature-based detectors (`FEATURE_NAMES`: kNN, Mahalanobis,
Mahalanobis++, ReAct) need statistics of the ID training set and live in `trainables.detectors`;
`trainables.method.Method.confidence` dispatches to either.
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
    x_hat = x.detach() + eps * _odin_direction(logit_fn, x, temperature, std)
    with torch.no_grad():
        return _log_max_softmax(logit_fn(x_hat), temperature)


def odin_grid(logit_fn: LogitFn, x: torch.Tensor, temperatures, epsilons,
              std: tuple[float, ...] = (0.2023, 0.1994, 0.2010)) -> dict[tuple[float, float], torch.Tensor]:
    """Returns {(T, eps): odin(logit_fn, x, T, eps, std)} for every pair of the grid, computing one
    input gradient per T and one forward per non-zero eps (eps = 0 reuses the clean logits)."""
    with torch.no_grad():
        clean = logit_fn(x)
    out = {}
    for t in temperatures:
        direction = _odin_direction(logit_fn, x, t, std) if any(e != 0 for e in epsilons) else None
        for e in epsilons:
            with torch.no_grad():
                z = clean if e == 0 else logit_fn(x.detach() + e * direction)
                out[(t, e)] = _log_max_softmax(z, t)
    return out


def _odin_direction(logit_fn: LogitFn, x: torch.Tensor, temperature: float,
                    std: tuple[float, ...]) -> torch.Tensor:
    """Returns sign(grad_x log S_yhat(x; T)) / std, the direction ODIN moves the input."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        z = logit_fn(x).float() / temperature
        log_s = F.log_softmax(z, -1).gather(1, z.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(log_s, x)
    return grad.sign() / torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


def _log_max_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.double() / temperature
    return z.max(-1).values - torch.logsumexp(z, -1)


_LOGIT_SCORES = {"msp": msp, "energy": energy, "max_logit": max_logit}
# Scored on penultimate features with statistics of the ID training set: trainables.detectors.
FEATURE_NAMES = ("knn", "mahalanobis", "mahalanobis_pp", "react")
NAMES = [*_LOGIT_SCORES, "odin", *FEATURE_NAMES]


def confidence(name: str, logit_fn: LogitFn, x: torch.Tensor, **params) -> torch.Tensor:
    """Returns the named logit-based detector's confidence [B] for normalised images x [B, 3, H, W]."""
    if name == "odin":
        return odin(logit_fn, x, **params)
    if name in FEATURE_NAMES:
        raise ValueError(f"OOD score {name!r} needs features and fitted training statistics "
                         f"(trainables.detectors), not only logits")
    if name not in _LOGIT_SCORES:
        raise ValueError(f"unknown OOD score {name!r}; expected one of {', '.join(NAMES)}")
    with torch.no_grad():
        return _LOGIT_SCORES[name](logit_fn(x), **params)
