"""RICASSO (Zhang et al., arXiv 2410.10548): mixed ID images as self-supervised outliers on LGLA.

What is RICASSO's own, on top of what it shares with DARL (the same authors' follow-up):
- NOD (Eq. 3): clean long-tailed rows, clean re-balanced rows and their Mixup and CutMix rows all
  go through one classification loss, with one- or two-hot targets and no separate outlier term;
- AALA + AAW (Eqs. 4-7): LGLA's per-expert logit adjustment, each row's margin scaled by
  1 + softmax over the batch of its energy, the target re-weighted by LGLA's angular weight g;
- CBCL (Eqs. 8-11): per expert, a bounded contrast between DEC's pull of features toward learnable
  class centres (d+, weighted by the dual entropy ω) and VBL's push of the two source features
  away from the feature of their mixture (d-);
- RCL (Eq. 12): SimSiam-style agreement between the Mixup and CutMix views of the same pair.
The step minimises L_NOD + λ0 L_CBCL + λ1 L_RCL (Eq. 13); at test time the mean of the raw expert
logits is scored with ODIN. The stream composition is DARL's, and the bands, static margins and
AAW are LGLA's (imported, not copied). The class centres and RCL heads are training-only, so the
method owns them and the registered model is the plain LGLA network. Spec: ricasso.md.

Table 4's ablation columns map to flags: NOD = use_mix_in_cls (rows without it also set
use_hat_stream=False), RCL = use_rcl, AALA = use_aala, CBCL = use_cbcl. Row 1, all off, is LGLA.

Run one trial without Ray:  python -m trainables ricasso --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables import darl, lgla, models
from trainables.config import FLAG, TrainConfig, integer, number, one_of, positive
from trainables.darl import ala_factor, soft_cross_entropy
from trainables.method import Batch, TrainData

FEATURE_DIM = 64           # d, the GAP width of one LGLA ResNet-32 expert
DEC_ROWS = ("all", "clean")


@dataclass
class RicassoConfig(TrainConfig):
    """RICASSO on CIFAR-LT. The shared TrainConfig defaults are the paper's recipe (400 epochs, SGD
    0.1 with Nesterov momentum 0.9, 5 warm-up epochs at ×0.1, B = 128 per stream, ODIN)."""
    num_experts: int = 3                  # K (LGLA MoE: K-1 local experts + 1 global)
    expert_shortcut: str = "lgla_concat"  # LGLA's cross-expert shortcut, as DARL
    cos_scale: float = 30.0               # s, cosine classifier
    tau_gla: float | None = None          # τ of Eq. 1 as τ log φ (LGLA code); None -> 3.0 / 2.5
    tau_energy: float | None = None       # τ of Eq. 6; None -> tau_gla (the paper writes one τ)
    mixup_alpha: float = 1.0              # α of Beta(α, α) for the mixing λ (not in the paper)
    hat_sampler_rho: float = 1.0          # ρ: D̂_in draws row i ∝ n_{y_i}^-ρ; 1 = balanced
    lambda_cbcl: float = 1.0              # λ0, Eq. 13
    lambda_rcl: float = 1.0               # λ1, Eq. 13
    cbcl_gamma_pos: float = 1.0           # γ0, scale of d+ in Eq. 11
    cbcl_gamma_neg: float = 1.0           # γ1, scale of d- in Eq. 11
    cbcl_eps_num: float = 0.0             # ε0, Eq. 11 numerator offset
    cbcl_eps_den: float = 1e-8            # ε1, Eq. 11 denominator offset
    cbcl_normalize: bool = True           # L2-normalise features and centres before d±
    dec_rows: str = "all"                 # rows in d+: "all" of D_train (Eq. 10) | "clean"
    rcl_proj_dim: int = 128               # RCL projection width (predictor bottleneck = half)
    use_mix_in_cls: bool = True           # NOD: mixed rows in L_cls
    use_hat_stream: bool = True           # clean re-balanced rows in L_cls (D_train holds D̂_in)
    use_aala: bool = True                 # Eq. 5; off = LGLA's static margins
    use_aaw: bool = True                  # LGLA's g in Eq. 7
    use_cbcl: bool = True
    use_rcl: bool = True
    autoaugment: bool = True              # LGLA's loader: AutoAugment CIFAR10Policy before cutout
    # Read by DARL's stream composition, which RICASSO shares. RICASSO always makes both mixes
    # (Fig. 2a) and weights every row of D_train equally (Eq. 3), so these are not settable.
    use_mixup: ClassVar[bool] = True
    use_cutmix: ClassVar[bool] = True
    lambda_mix: ClassVar[float] = 1.0
    ACCEPTS = {"num_experts": integer(1), "expert_shortcut": one_of(*models.EXPERT_SHORTCUTS),
               "cos_scale": positive(), "tau_gla": positive(none=True), "tau_energy": positive(none=True),
               "mixup_alpha": positive(), "hat_sampler_rho": number(0), "lambda_cbcl": number(0),
               "lambda_rcl": number(0), "cbcl_gamma_pos": number(0), "cbcl_gamma_neg": number(0),
               "cbcl_eps_num": number(0), "cbcl_eps_den": number(0), "cbcl_normalize": FLAG,
               "dec_rows": one_of(*DEC_ROWS), "rcl_proj_dim": integer(2), "use_mix_in_cls": FLAG,
               "use_hat_stream": FLAG, "use_aala": FLAG, "use_aaw": FLAG, "use_cbcl": FLAG, "use_rcl": FLAG,
               "autoaugment": FLAG}


def hat_sampler_weights(labels: torch.Tensor, counts: list[int], rho: float) -> torch.Tensor:
    """Returns per-row draw weights n_{y_i}^-ρ, float64 [N]: class c is drawn ∝ n_c^(1-ρ)."""
    n = torch.as_tensor(counts, dtype=torch.float64, device=labels.device)
    return n[labels] ** -rho


def adjusted_logits(logits: torch.Tensor, margins: torch.Tensor, tau_energy: float,
                    use_aala: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (v_k + Ê_k T_k [K, M, C], Ê [K, M]) for raw expert logits [K, M, C].

    Eq. 5 in Eq. 4: Ê = 1 + softmax over the M rows of E(v_k) (Eq. 6, on the raw logits, no
    grad), the batch standing in for the N training samples. Ê ≡ 1 without AALA (LGLA's margin).
    """
    if use_aala:
        ehat = torch.stack([ala_factor(z, tau_energy) for z in logits])
    else:
        ehat = torch.ones(logits.shape[:2], device=logits.device, dtype=logits.dtype)
    return logits + ehat[..., None] * margins[:, None, :], ehat


def nod_loss(logits: torch.Tensor, adjusted: torch.Tensor, q: torch.Tensor,
             bands: list[torch.Tensor], cos_scale: float, clean: torch.Tensor,
             use_aaw: bool = True) -> torch.Tensor:
    """Returns L_NOD (Eq. 3 over Eq. 7): Σ_k mean_rows -Σ_c g_kc q_c log softmax(adjusted_k)_c.

    logits [K, M, C] raw (AAW's angles); adjusted [K, M, C]; q [M, C] one- or two-hot; clean [M]
    marks the rows whose angles set AAW's group means. As no margin depends on the target, a
    two-hot row gives λ g_i L(y_i) + (1-λ) g_j L(y_j).
    """
    loss = logits.new_zeros(())
    for z, a in zip(logits, adjusted):
        target = q * lgla.aaw_weights(z, q, bands, cos_scale, clean) if use_aaw else q
        loss = loss + soft_cross_entropy(a, target).mean()
    return loss


def vbl_push(z: torch.Tensor, b: int) -> torch.Tensor:
    """Returns d- (Eq. 8): mean of ||z_i - z_mix||² + ||z_j - z_mix||² over Mixup and CutMix rows.

    z [4b, d] holds the rows [clean LT | clean re-balanced | Mixup | CutMix]; row r of each
    mixed block is the mixture of row r of the two clean blocks.
    """
    za, zb = z[:b], z[b:2 * b]
    mixed = z[2 * b:].view(-1, b, z.shape[1])                        # [2, b, d]
    return (((za - mixed) ** 2).sum(-1) + ((zb - mixed) ** 2).sum(-1)).mean()


def dual_entropy(adjusted: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Returns ω = -Σ_c (p_c + q_c) log p_c per row [M] (Eq. 9), p = softmax of adjusted logits.

    Self-entropy plus cross-entropy: large for unsure or wrong rows (DEC's hard-sample weight).
    """
    log_p = F.log_softmax(adjusted.float(), dim=-1)
    return -((log_p.exp() + q) * log_p).sum(-1)


def dec_pull(z: torch.Tensor, centers: torch.Tensor, adjusted: torch.Tensor,
             q: torch.Tensor) -> torch.Tensor:
    """Returns d+ (Eq. 10): ½ mean over rows of ω Σ_c q_c ||z - c_c||², ω held constant.

    z [M, d]; centers [C, d]; the label-weighted sum puts a two-hot row between its two centres.
    """
    with torch.no_grad():
        omega = dual_entropy(adjusted, q)
    dist = ((z[:, None, :] - centers[None]) ** 2).sum(-1)            # [M, C]
    return 0.5 * (omega * (q * dist).sum(-1)).mean()


def cbcl_loss(d_plus: torch.Tensor, d_minus: torch.Tensor, gamma_pos: float, gamma_neg: float,
              eps_num: float, eps_den: float) -> torch.Tensor:
    """Returns Eq. 11: (e^{γ0 d+} - e^{γ1 d-} + ε0) / (e^{γ0 d+} + e^{γ1 d-} + ε1), in (-1, 1].

    Both exponents are shifted by their maximum, so squared distances in the hundreds do not
    overflow float32; with ε0 = ε1 = 0 it is tanh((γ0 d+ - γ1 d-) / 2).
    """
    a, b = gamma_pos * d_plus, gamma_neg * d_minus
    m = torch.maximum(a, b).detach()
    ea, eb, shift = torch.exp(a - m), torch.exp(b - m), torch.exp(-m)
    return (ea - eb + eps_num * shift) / (ea + eb + eps_den * shift)


class ConsistencyHeads(nn.Module):
    """RCL's SimSiam heads on the concatenated expert features (training only).

    projector: Linear(in, 512)-BN-ReLU-Linear(512, p)-BN;
    predictor: Linear(p, p/2)-BN-ReLU-Linear(p/2, p) (spec §3.7; SimSiam's shape, scaled down).
    """

    def __init__(self, in_features: int, proj_dim: int = 128, hidden: int = 512):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))
        bottleneck = proj_dim // 2
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, bottleneck, bias=False), nn.BatchNorm1d(bottleneck),
            nn.ReLU(inplace=True), nn.Linear(bottleneck, proj_dim))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (h, u): the projection [B, p] and its prediction [B, p]."""
        h = self.projector(f)
        return h, self.predictor(h)


def rcl_loss(u_m: torch.Tensor, u_c: torch.Tensor, h_m: torch.Tensor,
             h_c: torch.Tensor) -> torch.Tensor:
    """Returns Eq. 12, -û_m·ĥ_c - û_c·ĥ_m, mean over rows, in [-2, 2]; h is stop-gradient.

    No ½ factor, unlike SimSiam: Eq. 12 as printed.
    """
    return -(_cosine_to_target(u_m, h_c) + _cosine_to_target(u_c, h_m)).mean()


def _cosine_to_target(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Returns cos(u, stop_grad(h)) per row [B]."""
    return (F.normalize(u, dim=-1) * F.normalize(h.detach(), dim=-1)).sum(-1)


class Method(darl.Method):
    """RICASSO for the shared engine: DARL's streams, model and bands plus CBCL and RCL."""

    config_cls = RicassoConfig
    name = "ricasso"
    summary = ("RICASSO: NOD outlier exposure on mixed data + AALA/AAW + contrastive "
               "boundary-centre learning + RCL, LGLA 3-expert ResNet-32, ODIN")

    def __init__(self, cfg: RicassoConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)          # bands, static margins T (Eq. 1), groups
        tau_gla = cfg.tau_gla if cfg.tau_gla is not None else lgla.default_tau_gla(self.num_classes)
        self.tau_energy = cfg.tau_energy if cfg.tau_energy is not None else tau_gla
        # Row 1 of Table 4 (LGLA) draws no re-balanced stream; CBCL and RCL need its mixes.
        self.uses_balanced_stream = (cfg.use_mix_in_cls or cfg.use_hat_stream or cfg.use_cbcl
                                     or cfg.use_rcl)
        k = cfg.num_experts
        arch = self.backbone_name()   # ImageNet-LT: LGLA's ResNet-50 experts, 2048-d each
        d = FEATURE_DIM if arch is None else models.FEATURE_DIMS[arch]
        self.centers = nn.Parameter(torch.randn(k, self.num_classes, d, device=device))
        self.rcl_heads = ConsistencyHeads(k * d, cfg.rcl_proj_dim).to(device)
        self.train_images: torch.Tensor | None = None
        self.train_labels: torch.Tensor | None = None
        self.hat_weights: torch.Tensor | None = None

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Returns cfg.optimizer over the network and RCL heads, plus the DEC centres without weight
        decay (decay would pull every centre toward the origin)."""
        return self.make_optimizer([{"params": [*model.parameters(), *self.rcl_heads.parameters()]},
                                    {"params": [self.centers], "weight_decay": 0.0}])

    def begin_training(self, data: TrainData) -> None:
        if self.cfg.hat_sampler_rho != 1:   # the engine's balanced stream is ρ = 1 only
            self.train_images, self.train_labels = data.x, data.y
            self.hat_weights = hat_sampler_weights(data.y, self.counts, self.cfg.hat_sampler_rho)

    def draw_hat_stream(self, batch: Batch, rng: np.random.RandomState) -> Batch:
        """Returns `batch` with x_bal / y_bal redrawn with weights n_y^-ρ (spec §3.1)."""
        if self.hat_weights is None:
            raise RuntimeError("hat_sampler_rho != 1 draws from the training set given to "
                               "begin_training(); call it first")
        gen = self.step_generator(rng)       # from the engine's per-epoch rng: resumable
        idx = torch.multinomial(self.hat_weights, batch.x.shape[0], replacement=True, generator=gen)
        return dataclasses.replace(batch, x_bal=self.train_transform(self.train_images[idx], gen),
                                   y_bal=self.train_labels[idx])

    def cls_rows(self, total: int, b: int) -> torch.Tensor:
        """Returns the bool mask [total] of rows in L_cls: LT rows always, the re-balanced and the
        mixed ones as use_hat_stream and use_mix_in_cls say."""
        rows = torch.ones(total, dtype=torch.bool, device=self.device)
        if total > b:
            rows[b:2 * b] = self.cfg.use_hat_stream
            rows[2 * b:] = self.cfg.use_mix_in_cls
        return rows

    def cbcl(self, feats: torch.Tensor, adjusted: torch.Tensor, q: torch.Tensor,
             clean: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (Σ_k L_CBCL^(k), mean_k d+, mean_k d-): Eq. 11 per expert, summed like Eq. 7."""
        cfg = self.cfg
        dec = clean if cfg.dec_rows == "clean" else torch.ones_like(clean)
        loss = feats.new_zeros(())
        d_plus_sum, d_minus_sum = feats.new_zeros(()), feats.new_zeros(())
        for z, centers, a in zip(feats, self.centers, adjusted):
            if cfg.cbcl_normalize:
                z, centers = F.normalize(z, dim=-1), F.normalize(centers, dim=-1)
            d_plus = dec_pull(z[dec], centers, a[dec], q[dec])
            d_minus = vbl_push(z, b)
            loss = loss + cbcl_loss(d_plus, d_minus, cfg.cbcl_gamma_pos, cfg.cbcl_gamma_neg,
                                    cfg.cbcl_eps_num, cfg.cbcl_eps_den)
            d_plus_sum, d_minus_sum = d_plus_sum + d_plus.detach(), d_minus_sum + d_minus.detach()
        return loss, d_plus_sum / len(feats), d_minus_sum / len(feats)

    def rcl(self, feats: torch.Tensor, b: int, training: bool) -> torch.Tensor:
        """Returns L_RCL (Eq. 12) on the concatenated expert features of the Mixup / CutMix rows."""
        f = feats.permute(1, 0, 2).reshape(feats.shape[1], -1)       # [4b, K·d]
        self.rcl_heads.train(training)
        h_m, u_m = self.rcl_heads(f[2 * b:3 * b])
        h_c, u_c = self.rcl_heads(f[3 * b:])
        return rcl_loss(u_m, u_c, h_m, h_c)

    def loss(self, model: nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, b = self.cfg, batch.x.shape[0]
        if self.uses_balanced_stream and cfg.hat_sampler_rho != 1:
            batch = self.draw_hat_stream(batch, rng)
        # DARL's composition, rows [LT | re-balanced | Mixup | CutMix]: one pair (i, j) for both
        # mixes, each with its own λ ~ Beta(α, α) (the paper is silent; the spec would share λ).
        x, q, _, clean = self.compose(batch, rng)
        logits, feats = model(x)
        adjusted, ehat = adjusted_logits(logits, self.margins, self.tau_energy, cfg.use_aala)
        rows = self.cls_rows(len(q), b)
        loss = nod_loss(logits[:, rows], adjusted[:, rows], q[rows], self.bands, cfg.cos_scale,
                        clean[rows], cfg.use_aaw)
        stats = {"loss_nod": loss.detach()}
        if cfg.use_cbcl:
            l_cbcl, d_plus, d_minus = self.cbcl(feats, adjusted.detach(), q, clean, b)
            loss = loss + cfg.lambda_cbcl * l_cbcl
            stats.update(loss_cbcl=l_cbcl.detach(), dec_d_plus=d_plus, vbl_d_minus=d_minus)
        if cfg.use_rcl:
            # BatchNorm in the heads needs two rows; a one-row last batch skips RCL.
            l_rcl = self.rcl(feats, b, model.training) if b > 1 else loss.new_zeros(())
            loss = loss + cfg.lambda_rcl * l_rcl
            stats["loss_rcl"] = l_rcl.detach()
        stats.update(darl.ambiguity_stats(ehat.mean(0), self.class_group[q.argmax(1)], clean))
        return loss, stats

    def state_dict(self) -> dict:
        return {"centers": self.centers.detach().clone(), "rcl_heads": self.rcl_heads.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        with torch.no_grad():
            self.centers.copy_(state["centers"])
        self.rcl_heads.load_state_dict(state["rcl_heads"])


if __name__ == "__main__":
    from trainables.engine import main

    main(Method)
