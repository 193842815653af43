"""The baselines of our comparison table: CE, LA, OE (and LA+OE) and Energy-OE.

All four are a CIFAR ResNet-32 trained from scratch with one recipe, `BaselineConfig`: the main
CIFAR recipe of Open-sampling (Wei et al., ICML 2022; its spec §5.2), which Open-sampling's own
config also subclasses, so every row of the table is trained alike. The baselines' original
recipes differ, and we deliberately do not follow them:
- RNA's paper trains CE, LA and OE from scratch on ResNet-18 with Adam (lr 1e-3, wd 5e-4) and a
  cosine schedule, with one outlier per ID image;
- the OE and Energy-OE codes (Hendrycks et al. 2019; Liu et al. 2020) draw two outliers per ID
  image, and Energy-OE is usually a short fine-tune (lr 1e-3) of a CE-trained model.
Test-time scores: MSP for CE, LA and OE, the free energy for Energy-OE (cfg.ood_score).

Run one trial without Ray:  python -m trainables ce --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainables import augment, losses
from trainables.config import TrainConfig, integer, number, one_of, positive
from trainables.method import Batch, Method

IMBALANCE_LOSSES = ("ce", "la")
OE_TARGETS = ("uniform", "prior")
# Energy-OE's ID margin m_in by dataset (Liu et al. 2020, their CIFAR scripts); m_out is -5 for both.
ENERGY_M_IN = {"cifar10": -23.0, "cifar100": -27.0}


@dataclass
class BaselineConfig(TrainConfig):
    """Open-sampling's main CIFAR recipe (its spec §5.2, the official code's values): SGD with
    momentum 0.9 (not Nesterov), wd 2e-4, batch 128, lr 0.1 for 200 epochs with a 5-epoch linear
    warm-up and ×0.01 decays at epochs 160 and 180; crop + flip, no cutout; 512 outliers per
    step (4 per ID image) for the methods that train with them; MSP at test time."""

    epochs: int = 200
    optimizer: str = "sgd"
    lr_schedule: str = "step"
    batch_size: int = 128
    lr: float = 0.1                      # learning rate (η is Open-sampling's regulariser weight)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    warmup_epochs: int = 5
    warmup_method: str = "ldam"          # the LDAM-DRW / Open-sampling ramp lr·(e+1)/W: 0.02, …, 0.1
    # The engine applies ×0.1 per milestone, so each fraction is listed twice: ×0.01 from epoch
    # 160 and another ×0.01 from epoch 180 of 200 (0.1 → 1e-3 → 1e-5), as in the code.
    lr_milestones: tuple[float, ...] = (0.8, 0.8, 0.9, 0.9)
    ood_score: str = "msp"
    cutout: int = 0                      # px; the recipe has none (the engine's default is 16)
    # Outliers per ID image (m / B) when outlier_batch_size is not set: 512 : 128 in the code.
    outlier_ratio: float = 4.0
    ACCEPTS = {"cutout": integer(0, 32), "outlier_ratio": positive()}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outlier_batch_size is None:
            self.outlier_batch_size = max(1, round(self.outlier_ratio * self.batch_size))


@dataclass
class LaConfig(BaselineConfig):
    tau: float = 1.0                     # τ of the adjustment τ·log π (Menon et al. 2021, Eq. 10)
    ACCEPTS = {"tau": number(0)}


@dataclass
class OeConfig(BaselineConfig):
    lambda_oe: float = 0.5               # λ, weight of the outlier term (OE's default)
    # L_ID: "ce" is OE; "la" is RNA's LA+OE row (rna spec §8, item 4), adjusted by τ.
    imbalance_loss: str = "ce"
    tau: float = 1.0                     # τ, used only when imbalance_loss = "la"
    # OE's target on outliers: "uniform" (Hendrycks et al. 2019; RNA's row) or "prior", the
    # training label prior π (the OE row of Open-sampling's Table 5).
    oe_target: str = "uniform"
    ACCEPTS = {"lambda_oe": number(0), "imbalance_loss": one_of(*IMBALANCE_LOSSES), "tau": number(0),
               "oe_target": one_of(*OE_TARGETS)}


@dataclass
class EnergyOeConfig(BaselineConfig):
    lambda_energy: float = 0.1           # λ_E, weight of the margin regulariser
    m_in: float | None = None            # ID energies pushed below m_in; None -> -23 / -27 (CIFAR-10 / -100)
    m_out: float = -5.0                  # outlier energies pushed above m_out
    ood_score: str = "energy"
    ACCEPTS = {"lambda_energy": number(0), "m_in": number(none=True), "m_out": number()}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.m_in is not None and self.m_in >= self.m_out:
            raise ValueError(f"m_in={self.m_in} with m_out={self.m_out}; accepted: m_in < m_out "
                             f"(ID energies are pushed below m_in, outliers above m_out)")


def imbalance_loss(kind: str, logits: torch.Tensor, y: torch.Tensor, prior_log: torch.Tensor,
                   tau: float) -> torch.Tensor:
    """Returns the mean ID loss: plain CE ("ce") or CE on z + τ log π ("la"; at τ = 1 this is
    Balanced Softmax, since log n_j and log π_j differ by a constant)."""
    return losses.logit_adjusted_cross_entropy(logits, y, prior_log, tau if kind == "la" else 0.0)


def prior_outlier_loss(logits_out: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Returns E_x'[H(π; f(x'))] = mean over rows of -Σ_c π_c log softmax(z)_c: OE with the label
    prior as the outliers' target (Open-sampling, §3.2 of its paper). π uniform gives OE's loss."""
    return -(prior.to(logits_out.dtype)[None, :] * F.log_softmax(logits_out, -1)).sum(-1).mean()


def joint_logits(model: torch.nn.Module, x: torch.Tensor,
                 x_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ID logits [B, C], outlier logits [m, C]) from ONE forward pass over cat(x, x_out):
    BatchNorm's batch statistics then mix ID and outliers, as in the OE, Energy-OE and
    Open-sampling codes (spec §3.7)."""
    logits = model(torch.cat([x, x_out]))[0][0]
    return logits[:len(x)], logits[len(x):]


class CrossEntropy(Method):
    """Standard training: CE on the long-tailed stream, MSP at test time (rna spec §8, item 1)."""

    config_cls = BaselineConfig
    name = "ce"
    summary = "baseline: cross-entropy, ResNet-32, MSP"
    large_scale = True
    augment_rule = ("random crop 32 with 4-px zero padding, horizontal flip p=0.5, cutout of `cutout` "
                    "px (param; 0 = none, the recipe)")

    def __init__(self, cfg: BaselineConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        self.prior_log = losses.log_prior(counts, device)     # log π_c, from the training counts

    def build_model(self) -> torch.nn.Module:
        return self.backbone("resnet32")

    def train_transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return augment.normalize(augment.crop_flip_cutout(x_uint8, gen, cutout=self.cfg.cutout))

    def id_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Returns the mean loss on the ID rows (CE here; subclasses adjust it)."""
        return F.cross_entropy(logits, y)

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.id_loss(model(batch.x)[0][0], batch.y), {}


class LogitAdjustment(CrossEntropy):
    """Logit-adjusted CE (Menon et al. 2021; rna spec §2.2): CE on z + τ log π during training,
    raw logits at test time (the base class's default); MSP score."""

    config_cls = LaConfig
    name = "la"
    summary = "baseline: logit adjustment (Menon et al. 2021), ResNet-32, MSP"

    def id_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return imbalance_loss("la", logits, y, self.prior_log, self.cfg.tau)


class OutlierExposure(CrossEntropy):
    """Outlier Exposure (Hendrycks et al. 2019; rna spec §8, items 3-4): L_ID + λ·CE(uniform,
    f(x')) on the auxiliary outliers, trained from scratch here; MSP at test time."""

    config_cls = OeConfig
    name = "oe"
    summary = "baseline: outlier exposure (Hendrycks et al. 2019), ResNet-32, MSP"
    uses_outliers = True

    def id_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return imbalance_loss(self.cfg.imbalance_loss, logits, y, self.prior_log, self.cfg.tau)

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_in, z_out = joint_logits(model, batch.x, batch.x_out)
        l_id = self.id_loss(z_in, batch.y)
        if self.cfg.oe_target == "prior":
            l_oe = prior_outlier_loss(z_out, self.prior_log.exp())
        else:
            l_oe = losses.outlier_exposure_loss(z_out)
        return l_id + self.cfg.lambda_oe * l_oe, {"l_id": l_id.detach(), "l_oe": l_oe.detach()}


class EnergyOE(CrossEntropy):
    """Energy-bounded outlier exposure (Liu et al. 2020; rna spec §8, item 5): CE + λ_E·(squared
    hinges keeping ID energies below m_in and outlier energies above m_out), trained from
    scratch with the common recipe rather than fine-tuned; the energy score at test time."""

    config_cls = EnergyOeConfig
    name = "energy_oe"
    summary = "baseline: energy-bounded outlier exposure (Liu et al. 2020), ResNet-32, energy score"
    uses_outliers = True

    def __init__(self, cfg: EnergyOeConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        if cfg.m_in is None and cfg.dataset not in ENERGY_M_IN:
            raise ValueError(f"m_in=None has no default for dataset={cfg.dataset!r}; set m_in "
                             f"(defaults exist for {', '.join(ENERGY_M_IN)})")
        self.m_in = cfg.m_in if cfg.m_in is not None else ENERGY_M_IN[cfg.dataset]

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_in, z_out = joint_logits(model, batch.x, batch.x_out)
        l_id = self.id_loss(z_in, batch.y)
        l_energy = losses.energy_margin_loss(z_in, z_out, self.m_in, self.cfg.m_out)
        stats = {"l_id": l_id.detach(), "l_energy": l_energy.detach(),
                 "energy_in": losses.free_energy(z_in.detach()).mean(),
                 "energy_out": losses.free_energy(z_out.detach()).mean()}
        return l_id + self.cfg.lambda_energy * l_energy, stats
