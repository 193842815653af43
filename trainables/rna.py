"""RNA (Shin & Chung, TMLR 2024): Representation Norm Amplification for LT OOD detection.

What is RNA's own:
- the model: a CIFAR ResNet-18 with BN affine off, a linear classifier W and a projection head
  h_φ used only by the loss (`models.RNAResNet18`, spec §2.1); on the large sets the ImageNet
  ResNet-50 of the same build (below);
- the batch: ID rows and auxiliary outliers concatenated into ONE train-mode forward, so every
  BN normalises with, and updates its running statistics from, the union of both (§2.5, §2.6).
  Outlier rows get no loss term, but they are not detached: the ID loss reaches them through
  the batch statistics, as in the official code (spec §7, A2);
- the loss: L = L_LA + λ · L_RNA, both batch means over the ID rows, with
  L_RNA = -mean log(1 + ||h_φ(f_θ(x))||_2) (Eqs. 2, 5, 8);
- the test-time score: the representation norm ||f_θ(x)||_2 of the backbone features (§2.7);
- the input pipeline on CIFAR: crop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p = 0.8, grayscale
  p = 0.2 for ID and outliers alike, and NO mean/std normalisation, at training and test time (§4.2).

Sign convention: the paper's S_RN(x) = -||f_θ(x)||_2 is an OOD score (higher = more OOD);
tailtune's confidences are higher for ID, so `confidence` returns +||f_θ(x)||_2. RNA makes ID
norms large and drives outlier features to zero, so the larger norm is the ID side.

Epoch length (spec A8): the official code zips the ID and outlier loaders, so an epoch has
min(|ID|, |OOD|) / b steps and a small outlier set shortens training. Here, as the spec
recommends, an epoch is one pass over the ID set (ceil(N / b) steps, the last one partial, where
the official code drops it) and the engine draws outliers without replacement, cycling the
outlier set when it is smaller than an epoch's need. Identical to the code whenever the outlier
set is at least as large as the ID set (300K Random Images on CIFAR-LT).

Large-scale setup (ImageNet-LT, Places-LT; spec §2.1, §4.1, A6), the official ImageNet code's:
- the network is `models.RNAImageNetResNet` on torchvision's ResNet-50 (`backbone=auto`; the
  dataset's papers' trunk, ResNet-152 on Places-LT, or `backbone=...`): every BatchNorm, stem and
  downsample included, without γ, β (bn_affine_shortcut resolves to False there); f_θ(x) is the
  2048-d GAP of layer4 after its last ReLU; W = Linear(2048, C); h_φ = Linear(2048, 2048)-ReLU-
  Linear(2048, 128) on f_θ; the RN score is ||f_θ(x)||_2 of those GAP features, as on CIFAR;
- inputs are the dataset's views (`large_lt.View`, ImageNet mean/std, as the code), the random
  crops at scale (0.2, 1) like the code's RandomResizedCrop(224, scale=(0.2, 1.0)); the code's
  ColorJitter and RandomGrayscale are not applied there (the views are the dataset's, for every
  method);
- outliers: the run's outlier_set, forwarded with the ID rows as on CIFAR (ImageNet-Extra in the
  paper);
- BatchNorm: one trial trains on one device, so every BN normalises over the whole joint batch
  (256 ID + 256 outliers at the paper's batch): the spec's single-GPU resolution of A6, where the
  official code's DDP kept per-GPU statistics over each GPU's slice of the batch;
- the paper's ImageNet recipe (SGD, Nesterov, momentum 0.9, lr 0.1, weight decay 5e-4, cosine
  over 100 epochs, batch 256 + 256, no warm-up) is not this config's default, which stays the
  CIFAR one: it is the rna/imagenet-lt recipe (trainables.recipes), which `--preset small|paper`
  trains.

Run one trial without Ray:  python -m trainables rna --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainables import augment, losses, models, scores
from trainables.config import Accepts, TrainConfig, fill_dataset_defaults, integer, number, one_of
from trainables.method import Batch, Method as BaseMethod

OOD_SCORES = ("rn", *scores.NAMES)


@dataclass
class RnaConfig(TrainConfig):
    # CIFAR-LT recipe of the paper (§4.1): Adam, L2 weight decay, cosine per epoch, no warm-up,
    # 128 ID + 128 outliers per step (outlier_batch_size None = batch_size).
    epochs: int = 200
    optimizer: str = "adam"
    lr: float = 1e-3                     # η
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0
    batch_size: int = 128
    ood_score: str = "rn"                # ||f_θ(x)||_2; also any of scores.NAMES
    lambda_rna: float = 0.5              # λ, weight of L_RNA (Eq. 8)
    tau_la: float = 1.0                  # τ, logit-adjustment scale (Eq. 2)
    # Shortcut (downsample) BNs keep γ, β: None -> the official code's, True on CIFAR (its ResNet-18's
    # 3 shortcut BNs, spec A1), False on the large sets (its ResNet-50 has every BN affine off).
    bn_affine_shortcut: bool | None = None
    proj_type: str = "mlp"               # h_φ: mlp (paper) | linear (W_h) | none (||f||); Table 15
    proj_dim: int = 128
    crop_min_scale: float = 0.2          # large sets only: the ImageNet code's RandomResizedCrop scale
    ACCEPTS = {"ood_score": one_of(*OOD_SCORES), "lambda_rna": number(0), "tau_la": number(0),
               "bn_affine_shortcut": Accepts("choice", choices=(True, False), none=True),
               "proj_type": one_of(*models.PROJECTIONS), "proj_dim": integer(1)}

    def __post_init__(self) -> None:
        fill_dataset_defaults(self, {"bn_affine_shortcut": (True, False)})
        super().__post_init__()


def rna_loss(projected: torch.Tensor) -> torch.Tensor:
    """Returns L_RNA = -mean_i log(1 + ||h_i||_2) for projected ID features h [B, d] (Eq. 5)."""
    return -torch.log1p(projected.norm(dim=1)).mean()


def representation_norm(feats: torch.Tensor) -> torch.Tensor:
    """Returns ||f_θ(x)||_2 per row [B] of features [B, D]: the negated S_RN of Eq. 4."""
    return feats.float().norm(dim=1)


class Method(BaseMethod):
    """RNA for the shared engine: joint ID+outlier forward, L_LA + λ L_RNA, RN score."""

    config_cls = RnaConfig
    name = "rna"
    summary = ("RNA: logit-adjusted CE + representation-norm amplification, outliers through BN "
               "only, ResNet-18, RN score")
    uses_outliers = True
    large_scale = True   # RNA's ImageNet ResNet-50 (models.RNAImageNetResNet), the dataset's views
    augment_rule = ("random crop 32 with 4-px zero padding, horizontal flip p=0.5, ColorJitter(0.4, 0.4, "
                    "0.4, 0.1) p=0.8, grayscale p=0.2 (batched, torchvision tensor maths); ID and outliers")
    input_rule = "x / 255, no mean/std normalisation (RNA's CIFAR code)"
    odin_std = (1.0, 1.0, 1.0)            # inputs are raw [0, 1] pixels: ODIN's step is not rescaled

    def __init__(self, cfg: RnaConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        self.prior_log = losses.log_prior(counts, device)     # log π_c, fixed before training

    def build_model(self) -> torch.nn.Module:
        cfg, arch = self.cfg, self.backbone_name()
        if arch is not None:   # the ImageNet network: torchvision's trunk, BN affine off, h_φ on its GAP
            return models.create("rna_resnet50", self.num_classes, arch=arch, pretrained=cfg.pretrained,
                                 shortcut_bn_affine=cfg.bn_affine_shortcut, projection=cfg.proj_type,
                                 proj_dim=cfg.proj_dim)
        return models.create("resnet18_rna", self.num_classes, shortcut_bn_affine=cfg.bn_affine_shortcut,
                             projection=cfg.proj_type, proj_dim=cfg.proj_dim)

    def train_transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return augment.crop_flip_jitter_gray(x_uint8, gen)

    def eval_transform(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return x_uint8.float() / 255.0       # ToTensor only: RNA's CIFAR inputs are not normalised

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (L_LA + λ L_RNA on the ID rows, stats). Stats (spec §2.9): both loss terms, the
        mean ||f|| and the active fraction of f's coordinates, for ID and outlier rows."""
        cfg, b = self.cfg, batch.x.shape[0]
        x = batch.x if batch.x_out is None else torch.cat([batch.x, batch.x_out])
        logits, feats = model(x)
        logits, feats = logits[0], feats[0]
        loss_la = losses.logit_adjusted_cross_entropy(logits[:b], batch.y, self.prior_log, cfg.tau_la)
        loss_rna = rna_loss(model.project(feats[:b]))
        stats = {"loss_la": loss_la.detach(), "loss_rna": loss_rna.detach()}
        with torch.no_grad():
            for rows, part in (("id", feats[:b]), ("ood", feats[b:])):
                if len(part):
                    stats[f"feat_norm_{rows}"] = representation_norm(part).mean()
                    stats[f"active_ratio_{rows}"] = (part > 0).float().mean()
        return loss_la + cfg.lambda_rna * loss_rna, stats

    def confidence(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns ||f_θ(x)||_2 [B] for ood_score "rn" (higher = more ID), else the base score."""
        if self.cfg.ood_score == "rn":
            with torch.no_grad():
                return representation_norm(model(x)[1][0])
        return super().confidence(model, x)


if __name__ == "__main__":
    from trainables.engine import main

    main(Method)
