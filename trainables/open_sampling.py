"""Open-sampling (Wei et al., ICML 2022): auxiliary outliers labelled at random from a
complementary, tail-favouring distribution Γ re-balance the class prior of a long-tailed set.

What is Open-sampling's own: the class prior β and the complementary distribution Γ (Prop. 2.3),
computed once from the training counts; fresh open-set labels ỹ ~ Γ for every outlier batch; the
class weight ω = K·Γ; the objective L_imb + η·L_reg (Eqs. 2-3), with L_imb plain CE or logit
adjusted. Nothing changes at test time (raw logits, MSP). The backbone and recipe are the
baselines' (`trainables.baselines.BaselineConfig`, spec §5.2). Spec: open_sampling.md.

Symbols as in the paper: K classes, β_j = n_j / N, α the trade-off between the minimum
complementary distribution (α = max β) and uniform (α → ∞), η the weight of L_reg (the learning
rate is `lr`).

Run one trial without Ray:  python -m trainables open_sampling --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainables.baselines import (IMBALANCE_LOSSES, BaselineConfig, CrossEntropy, imbalance_loss,
                                  joint_logits)
from trainables.config import FLAG, TEXT, integer, number, one_of, positive
from trainables.method import Batch

LABEL_DISTRIBUTIONS = ("complementary", "mcd", "uniform", "cb", "original", "single:<class>")
REG_NORMS = ("weight_sum", "batch_mean")


@dataclass
class OpenSamplingConfig(BaselineConfig):
    eta: float = 1.0                     # η, weight of L_reg (Eq. 2); the official script's value
    # Γ (§3.4): complementary (Prop. 2.3) | mcd (α = max β) | uniform (ODNL) | cb | original (Γ = β)
    # | single:<class> (every outlier in one class, Fig. 1's toxic case).
    label_dist: str = "complementary"
    alpha: float | None = None           # α of Prop. 2.3, ≥ max_j β_j; None -> max β + min β (App. E)
    # α = alpha_scale · max_j β_j (≥ 1): the dataset-free form the search uses. The paper's
    # default is 1 + n_min/n_max = 1 + 1/IR (1.01 at IR 100); Table 5's α = 5 is about 12.4.
    alpha_scale: float | None = None
    cb_beta: float = 0.9999              # β_CB of the "cb" ablation (not the class prior β)
    use_weight: bool = True              # ω_ỹ = K·Γ_ỹ on L_reg; False = Table 6's "w/o w_j"
    # "weight_sum": Σ ω ℓ / Σ ω, the code's F.cross_entropy(weight=ω); "batch_mean": Eq. 2 read
    # literally, (1/m) Σ ω ℓ, about 1.16× larger on CIFAR-10-LT (spec §3.6).
    reg_norm: str = "weight_sum"
    # L_imb (Eq. 3): "ce" (Table 1's CE + Open-sampling) | "la", CE on z + τ log π (τ = 1 is
    # Balanced Softmax + Open-sampling). L_reg always uses the raw logits (spec A8).
    imbalance_loss: str = "ce"
    tau: float = 1.0                     # τ of imbalance_loss = "la"; Open-sampling itself has no τ
    os_start_epoch: int = 0              # L_reg from this 0-based epoch on; 0 = paper (§3.8)
    ACCEPTS = {"eta": number(0), "label_dist": TEXT, "alpha": positive(none=True),
               "alpha_scale": number(1, none=True), "cb_beta": number(0, 1, high_open=True),
               "use_weight": FLAG, "reg_norm": one_of(*REG_NORMS),
               "imbalance_loss": one_of(*IMBALANCE_LOSSES), "tau": number(0), "os_start_epoch": integer(0)}

    def __post_init__(self) -> None:
        super().__post_init__()
        kind, _, cls = self.label_dist.partition(":")
        if self.label_dist not in LABEL_DISTRIBUTIONS[:-1] and not (kind == "single" and cls.isdigit()):
            raise ValueError(f"label_dist={self.label_dist!r}; accepted: {', '.join(LABEL_DISTRIBUTIONS)}")
        if self.alpha is not None and self.alpha_scale is not None:
            raise ValueError(f"alpha={self.alpha} and alpha_scale={self.alpha_scale}; set at most one")
        if (self.alpha is not None or self.alpha_scale is not None) and kind != "complementary":
            raise ValueError(f"alpha / alpha_scale apply to label_dist='complementary' only, "
                             f"not {self.label_dist!r}")
        if self.eta < 0:
            raise ValueError(f"eta={self.eta}; accepted: a number >= 0")


def class_prior(counts: list[int]) -> np.ndarray:
    """Returns β_j = n_j / Σ_i n_i [K] (float64) from the long-tailed training counts (§3.2)."""
    n = np.asarray(counts, dtype=np.float64)
    return n / n.sum()


def complementary_distribution(counts: list[int], alpha: float | None = None) -> np.ndarray:
    """Returns Γ_j = (α − β_j) / (K·α − 1) [K] (Prop. 2.3), float64, summing to 1.

    alpha None takes the paper's default α = max β + min β; α = max β gives the minimum
    complementary distribution (zero mass on the head class); α → ∞ tends to uniform. ValueError
    if α < max β. Balanced counts with α = max β = 1/K (a 0/0) give uniform (spec A14).
    """
    beta = class_prior(counts)
    k = len(beta)
    if alpha is None:
        alpha = float(beta.max() + beta.min())
    if alpha < beta.max() - 1e-12:
        raise ValueError(f"alpha={alpha:g} is below max_j beta_j = {beta.max():.6g}; accepted: "
                         f"alpha >= max beta (Prop. 2.3)")
    denominator = k * alpha - 1.0
    if abs(denominator) < 1e-12:
        return np.full(k, 1.0 / k)
    gamma = np.clip((alpha - beta) / denominator, 0.0, None)   # clip: α = max β up to rounding
    return gamma / gamma.sum()


def label_distribution(counts: list[int], kind: str = "complementary", alpha: float | None = None,
                       cb_beta: float = 0.9999) -> np.ndarray:
    """Returns the open-set label distribution Γ [K] (float64) named by `kind` (spec §3.4).

    "complementary" (Prop. 2.3 at `alpha`), "mcd" (α = max β), "uniform", "cb" (∝ the inverse
    effective number (1 − β_CB) / (1 − β_CB^n_j)), "original" (Γ = β), "single:<c>" (all on c).
    """
    beta = class_prior(counts)
    k = len(beta)
    if kind == "complementary":
        return complementary_distribution(counts, alpha)
    if kind == "mcd":
        return complementary_distribution(counts, float(beta.max()))
    if kind == "uniform":
        return np.full(k, 1.0 / k)
    if kind == "cb":
        w = (1.0 - cb_beta) / (1.0 - cb_beta ** np.asarray(counts, dtype=np.float64))
        return w / w.sum()
    if kind == "original":
        return beta
    if kind.startswith("single:") and kind[7:].isdigit() and int(kind[7:]) < k:
        return np.eye(k)[int(kind[7:])]
    raise ValueError(f"label_dist={kind!r} for {k} classes; accepted: {', '.join(LABEL_DISTRIBUTIONS)} "
                     f"(class < {k})")


def class_weights(gamma: np.ndarray) -> np.ndarray:
    """Returns ω_j = K·Γ_j [K] (§3.5): Σ ω = K, larger for the classes Γ favours (the tail)."""
    return len(gamma) * gamma


def sample_open_labels(gamma: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """Returns m i.i.d. labels ỹ ~ Γ (int64 [m], on Γ's device): drawn afresh for every outlier
    batch (§3.4)."""
    return torch.multinomial(gamma, m, replacement=True, generator=gen)


def open_sampling_regulariser(logits_out: torch.Tensor, labels: torch.Tensor, omega: torch.Tensor,
                              reg_norm: str = "weight_sum") -> torch.Tensor:
    """Returns L_reg: the ω-weighted CE of outlier logits [m, K] on open-set labels [m] (Eq. 2).

    "weight_sum" divides by Σ_i ω_ỹi, i.e. F.cross_entropy(logits, labels, weight=ω) as in the
    official code; "batch_mean" divides by m, the literal Eq. 2.
    """
    w = omega.to(logits_out.dtype)[labels]
    weighted = w * F.cross_entropy(logits_out, labels, reduction="none")
    return weighted.sum() / w.sum() if reg_norm == "weight_sum" else weighted.mean()


class Method(CrossEntropy):
    """Open-sampling for the shared engine: ResNet-32, the ID batch plus an outlier batch in one
    forward pass, L_imb + η·L_reg; MSP (cfg.ood_score) on the raw logits at test time."""

    config_cls = OpenSamplingConfig
    name = "open_sampling"
    summary = "Open-sampling: outliers labelled from the complementary distribution, ResNet-32, MSP"
    uses_outliers = True

    def __init__(self, cfg: OpenSamplingConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        alpha = cfg.alpha
        if cfg.alpha_scale is not None:
            alpha = cfg.alpha_scale * float(class_prior(counts).max())
        self.gamma = label_distribution(counts, cfg.label_dist, alpha, cfg.cb_beta)   # Γ, fixed
        self.gamma_device = torch.as_tensor(self.gamma, dtype=torch.float32, device=device)
        omega = class_weights(self.gamma) if cfg.use_weight else np.ones(self.num_classes)
        self.omega = torch.as_tensor(omega, dtype=torch.float32, device=device)      # ω, fixed
        self.active = cfg.os_start_epoch <= 0

    def begin_epoch(self, epoch: int, model: torch.nn.Module) -> None:
        self.active = epoch >= self.cfg.os_start_epoch

    def id_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return imbalance_loss(self.cfg.imbalance_loss, logits, y, self.prior_log, self.cfg.tau)

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.active:   # before os_start_epoch: L_imb alone, the outlier batch unused
            l_imb = self.id_loss(model(batch.x)[0][0], batch.y)
            return l_imb, {"l_imb": l_imb.detach(), "l_reg": torch.zeros_like(l_imb)}
        z_in, z_out = joint_logits(model, batch.x, batch.x_out)
        l_imb = self.id_loss(z_in, batch.y)
        # ỹ from the engine's per-epoch seeded rng: a resumed trial draws the same labels.
        labels = sample_open_labels(self.gamma_device, len(z_out), self.step_generator(rng))
        l_reg = open_sampling_regulariser(z_out, labels, self.omega, self.cfg.reg_norm)
        return l_imb + self.cfg.eta * l_reg, {"l_imb": l_imb.detach(), "l_reg": l_reg.detach()}


if __name__ == "__main__":
    from trainables.engine import main

    main(Method)
