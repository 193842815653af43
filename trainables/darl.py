"""DARL (Zhang et al., ACM MM 2025): mixed ID rows as pseudo-OOD + ambiguity-aware logit adjustment.

What is DARL's own: the batch composition (long-tailed stream, class-balanced stream, their Mixup
and CutMix rows with two-hot targets), the ALA margin (Eqs. 7-9) inside LGLA's per-expert soft
cross-entropy, and ODIN on the averaged expert logits at test time. Everything else (loop,
schedule, evaluation, reporting) is the shared engine. Spec: darl.md.

Run one trial without Ray:  python -m trainables.darl --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainables import augment, autoaugment, lgla, metrics, models
from trainables.config import FLAG, TrainConfig, integer, number, one_of, positive
from trainables.method import Batch, Method as BaseMethod


@dataclass
class DarlConfig(TrainConfig):
    num_experts: int = 3                 # K (LGLA MoE)
    expert_shortcut: str = "lgla_concat"  # replicate LGLA's cross-expert shortcut leak (spec §3.0)
    cos_scale: float = 30.0              # s, cosine classifier
    tau_gla: float | None = None         # τ_G; None -> 3.0 (CIFAR-10) / 2.5 (CIFAR-100)
    tau_energy: float = 8.0              # τ, energy temperature of ALA (Eq. 8)
    mixup_alpha: float = 1.0             # α of Beta(α, α), shared by Mixup and CutMix
    lambda_mix: float = 1.0              # λ, weight of mixed rows (not in the paper; 1 = paper)
    use_mixup: bool = True
    use_cutmix: bool = True
    use_ala: bool = True
    use_aaw: bool = True
    ala_detach: bool = True
    ala_energy_source: str = "expert"    # "expert" (per-expert logits) | "ensemble"
    autoaugment: bool = True             # LGLA's loader: AutoAugment CIFAR10Policy before cutout

    ACCEPTS = {"num_experts": integer(1), "expert_shortcut": one_of(*models.EXPERT_SHORTCUTS),
               "cos_scale": positive(), "tau_gla": positive(none=True), "tau_energy": positive(),
               "mixup_alpha": positive(), "lambda_mix": number(0), "use_mixup": FLAG, "use_cutmix": FLAG,
               "use_ala": FLAG, "use_aaw": FLAG, "ala_detach": FLAG,
               "ala_energy_source": one_of("expert", "ensemble"), "autoaugment": FLAG}


def energy(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Returns E(z) = -τ logsumexp(z / τ) over the last axis (Eq. 8)."""
    return -tau * torch.logsumexp(z / tau, dim=-1)


def ala_factor(z: torch.Tensor, tau: float, detach: bool = True) -> torch.Tensor:
    """Returns Ê = 1 + softmax over ROWS of E(z) for logits z [M, C] -> [M] (Eq. 9's weight).

    Ê ∈ (1, 2) and Σ(Ê - 1) = 1: the extra margin goes to the most ambiguous rows of the batch.
    """
    e = energy(z.detach() if detach else z, tau)
    return 1.0 + torch.softmax(e, dim=0)


def soft_cross_entropy(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Returns -Σ_c q_c log softmax(logits)_c per row [M]."""
    return -(q * F.log_softmax(logits, dim=-1)).sum(-1)


def darl_loss(logits: torch.Tensor, q: torch.Tensor, margins: torch.Tensor, bands: list[torch.Tensor],
              cfg: DarlConfig, row_weight: torch.Tensor,
              clean: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, stats): Σ_k over experts of the row-weighted mean soft CE on ALA-adjusted logits.

    logits [K, M, C] raw expert logits; q [M, C] one- or two-hot targets; margins [K, C] are the
    static group-wise priors T_k(c); row_weight [M] (λ on mixed rows); clean [M] marks the
    unmixed rows whose angles set AAW's group means. Spec §3.5.
    """
    num_experts = logits.shape[0]
    ensemble = logits.mean(0)
    loss = logits.new_zeros(())
    ehat_sum = logits.new_zeros(logits.shape[1])
    for k in range(num_experts):
        z = logits[k]
        if cfg.use_ala:
            source = ensemble if cfg.ala_energy_source == "ensemble" else z
            ehat = ala_factor(source, cfg.tau_energy, cfg.ala_detach)
        else:
            ehat = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
        adjusted = z + ehat[:, None] * margins[k][None, :]          # Eq. 9 inside Eq. 7
        target = q
        if cfg.use_aaw:
            target = q * lgla.aaw_weights(z.detach(), q, bands, cfg.cos_scale, clean)
        loss = loss + (soft_cross_entropy(adjusted, target) * row_weight).mean()
        ehat_sum = ehat_sum + ehat.detach()
    return loss, {"ehat": ehat_sum / num_experts}


def ambiguity_stats(ehat: torch.Tensor, labels_group: torch.Tensor, clean: torch.Tensor) -> dict[str, torch.Tensor]:
    """Returns the per-epoch diagnostics of spec §3.3 (Figs. 3 and 5), as device tensors.

    ehat [M] (mean over experts); labels_group [M] group index (0 head, 1 middle, 2 tail) of each
    row's (argmax) label; clean [M]. `ehat_share_<rows>_<group>` is the mean of M·(Ê − 1), the
    row's share of ALA's extra margin relative to an even split (1 = average).
    """
    share = (ehat - 1) * ehat.shape[0]
    stats = {"ehat_max": ehat.max()}
    for rows, mask in (("clean", clean), ("mixed", ~clean)):
        for index, group in enumerate(("head", "middle", "tail")):
            chosen = (mask & (labels_group == index)).float()
            # masked mean without a host sync; an empty group reports 0
            stats[f"ehat_share_{rows}_{group}"] = (share * chosen).sum() / chosen.sum().clamp(min=1)
    return stats


class Method(BaseMethod):
    """DARL for the shared engine: model, streams, loss; ODIN (cfg.ood_score) at test time."""

    config_cls = DarlConfig
    name = "darl"
    large_scale = True   # ImageNet-LT: LGLA's 3-expert ResNet-50 (DARL supplement, RICASSO)
    summary = ("DARL (ACM MM 2025): mixed ID rows as pseudo-OOD + ambiguity-aware logit "
               "adjustment, LGLA 3-expert ResNet-32, ODIN")

    augment_rule = augment.LGLA_RULE

    def __init__(self, cfg: DarlConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        tau_gla = cfg.tau_gla if cfg.tau_gla is not None else lgla.default_tau_gla(self.num_classes)
        self.bands = [b.to(device) for b in lgla.class_bands(counts, cfg.num_experts)]
        self.margins = lgla.static_margins(counts, cfg.num_experts, tau_gla).to(device)
        self.uses_balanced_stream = cfg.use_mixup or cfg.use_cutmix  # spec §8.10: row 1 = LGLA
        self.class_group = torch.zeros(self.num_classes, dtype=torch.long)
        for index, classes in enumerate(metrics.class_groups(counts).values()):
            self.class_group[torch.as_tensor(classes, dtype=torch.long)] = index
        self.class_group = self.class_group.to(device)

    def build_model(self) -> torch.nn.Module:
        arch = self.backbone_name()
        if arch is not None:   # ImageNet-LT: LGLA's 3-expert ResNet-50 (or the backbone asked for)
            return models.create("lgla_resnet50", self.num_classes, num_experts=self.cfg.num_experts,
                                 cos_scale=self.cfg.cos_scale, arch=arch, pretrained=self.cfg.pretrained)
        return models.create("lgla_resnet32", self.num_classes, num_experts=self.cfg.num_experts,
                             expert_shortcut=self.cfg.expert_shortcut, cos_scale=self.cfg.cos_scale)

    def train_transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """LGLA's CIFAR view: crop, flip, AutoAugment (cfg.autoaugment), cutout 16, normalised."""
        if not self.cfg.autoaugment:
            return super().train_transform(x_uint8, gen)
        x = autoaugment.autoaugment(augment.crop_flip_cutout(x_uint8, gen, cutout=0), gen)
        return augment.normalize(augment.cut_out(x, gen))

    def compose(self, batch: Batch, rng: np.random.RandomState) -> tuple[torch.Tensor, ...]:
        """Returns (x [R,3,H,W], q [R,C], row_weight [R], clean [R]): clean LT rows, clean
        balanced rows, Mixup rows, CutMix rows (row r of one stream mixed with row r of the other)."""
        cfg, c = self.cfg, self.num_classes
        xs, qs, ws = [batch.x], [F.one_hot(batch.y, c).float()], [1.0]
        if self.uses_balanced_stream:
            qa, qb = qs[0], F.one_hot(batch.y_bal, c).float()
            xs.append(batch.x_bal), qs.append(qb), ws.append(1.0)
            if cfg.use_mixup:
                lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
                x_mu, q_mu = augment.mixup(batch.x, batch.x_bal, qa, qb, lam)
                xs.append(x_mu), qs.append(q_mu), ws.append(cfg.lambda_mix)
            if cfg.use_cutmix:
                lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
                box = augment.cutmix_box(*batch.x.shape[-2:], lam, rng)
                x_cm, q_cm, _ = augment.cutmix(batch.x, batch.x_bal, qa, qb, box)
                xs.append(x_cm), qs.append(q_cm), ws.append(cfg.lambda_mix)
        weight = torch.cat([torch.full((x.shape[0],), w, device=x.device) for x, w in zip(xs, ws)])
        clean = torch.zeros(len(weight), dtype=torch.bool, device=weight.device)
        clean[:sum(x.shape[0] for x in xs[:2])] = True       # the two unmixed streams
        return torch.cat(xs), torch.cat(qs), weight, clean

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, q, weight, clean = self.compose(batch, rng)
        logits, _ = model(x)
        loss, rows = darl_loss(logits, q, self.margins, self.bands, self.cfg, weight, clean)
        return loss, ambiguity_stats(rows["ehat"], self.class_group[q.argmax(1)], clean)


if __name__ == "__main__":
    from trainables.engine import main

    main(Method)
