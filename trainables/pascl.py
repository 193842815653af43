"""PASCL, stage 1 (Wang et al., ICML 2022): partial and asymmetric supervised contrastive learning
between tail-class ID samples and auxiliary outliers, on top of Outlier Exposure.

    L = CE(both ID views) + λ1 · L_OE + λ2 · L_PASCL

- L_OE: cross-entropy of the outliers' logits to the uniform distribution (`losses.outlier_exposure_loss`).
- L_PASCL: SupCon on L2-normalised 128-d projections at temperature T. "Partial": only the tail
  ID samples (the bottom k = 40% of classes by training count, both views) are anchors.
  "Asymmetric": outliers are negatives only, never anchors. Positives of an anchor are the other
  tail samples of its class, its own second view included.

What is PASCL's own here: the second ID view, the projection head, the tail/outlier contrast and
the loss weights. The loop, schedule, evaluation and checkpoints are the shared engine's.

Choices against the paper's code (`stage1.py` / `my_cl_loss_fn3` of the official release):
- Backbone: the official CIFAR runs use ResNet-18 (512-d features, projection 512-512-128). We
  use the CIFAR ResNet-32 (64-d features, projection 64-64-128) like the other ResNet-32
  baselines, so every row of the comparison table trains the same network.
- Head ID samples: the official loss contrasts tail views and outliers only; head samples never
  enter it. That is the default here (`head_negatives=False`); `head_negatives=True` adds both
  views of the head samples to every anchor's denominator as extra negatives (plain SupCon's
  treatment of other classes).
- Recipe (the official code defaults, which the paper states for CIFAR): Adam lr 1e-3, L2
  weight decay 5e-4, cosine over 200 epochs with no warm-up, ID batch 256 with 256 outliers per
  step (1:1) in one forward pass (BN statistics mix ID and outliers, as in the official code),
  30,000 auxiliary images (the official code takes the first 30,000 of 300K; we take a seeded subset).
- Augmentation: the shared crop/flip/cutout + CIFAR normalisation for both ID views and the
  outliers, instead of the official crop/flip/colour-jitter/grayscale without normalisation.
  Outliers get one view, as in the official code: they are never anchors, so a second view
  would add nothing but negatives.
- The official per-class `sign` re-weighting of the contrastive rows is +1 on exactly the
  anchor classes, a no-op, so it is left out.
- Test time: MSP on the stage-1 model. Stage 2 (PASCL-FT: BN + classifier fine-tuning with
  logit-adjusted CE) is not implemented; our ID accuracy is therefore the stage-1 model's.

Large-scale setup (ImageNet-LT in the paper; the official `models/resnet_imagenet.py` and
`stage1.py --ds imagenet`):
- network: torchvision's ResNet-50 (`backbone=auto`; ResNet-152 on Places-LT, or `backbone=...`,
  `pretrained=...`) with its linear classifier, and PASCL's head on the 2048-d GAP feature:
  Linear(2048, 2048)-ReLU-Linear(2048, 128), L2-normalised (`PasclNetwork`);
- loss: the same; λ2 = 0.1 and T = 0.07 (the code's defaults, which its ImageNet command keeps;
  Places-LT, which PASCL never ran, takes them too), k = 0.4;
- outliers: all of the outlier set (the code's ImageNet-Extra ImageFolder; `outlier_max_images`
  None there), 1:1 with the ID batch;
- inputs: the dataset's views (`large_lt.View`, ImageNet mean/std) for both ID views and the
  outliers, crops at scale (0.2, 1) as the code's RandomResizedCrop; its colour jitter and
  grayscale are not applied;
- tail classes ranked by training count. The code takes labels >= round(0.6 C), which on the
  count-sorted CIFAR builds is the same set; ImageNet-LT's labels are not sorted by count, so
  there it picks the last 400 labels, not the 400 rarest classes;
- the paper's ImageNet recipe (SGD, Nesterov, lr 0.1 · batch/256, weight decay 5e-5, steps at
  epochs 60 and 80 of 100, batch 256) is not this config's default: it is the pascl/imagenet-lt
  recipe (trainables.recipes), which `--preset small|paper` trains.

Run one trial without Ray:  python -m trainables pascl --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables import large_lt, losses
from trainables.config import FLAG, TrainConfig, fill_dataset_defaults, integer, number, positive
from trainables.method import Batch, Method as BaseMethod, TrainData


@dataclass
class PasclConfig(TrainConfig):
    # PASCL's CIFAR recipe (official stage-1 code defaults).
    epochs: int = 200
    optimizer: str = "adam"
    lr_schedule: str = "cosine"          # CosineAnnealingLR(T_max=epochs), stepped per epoch
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 256                # ID images per step; each gives two views
    warmup_epochs: int = 0
    # None -> the paper's: 30,000 on CIFAR (the code's first 30,000 of 300K; set 300000 for all of
    # it), all of the set on the large ones (the code's ImageNet-Extra).
    outlier_max_images: int | None = None
    ood_score: str = "msp"
    # Loss.
    lambda_oe: float = 0.5               # λ1, weight of L_OE
    lambda_pascl: float | None = None    # λ2; None -> 0.1 (CIFAR-10) / 0.02 (CIFAR-100)
    temperature: float | None = None     # T of L_PASCL; None -> 0.07 (CIFAR-10) / 0.2 (CIFAR-100)
    tail_fraction: float = 0.4           # k: the bottom k of classes by count are the anchors
    head_negatives: bool = False         # True: head ID views join the denominator (not official)
    projection_dim: int = 128
    crop_min_scale: float = 0.2          # large sets only: the ImageNet code's RandomResizedCrop scale
    ACCEPTS = {"lambda_oe": number(0), "lambda_pascl": number(0, none=True),
               "temperature": positive(none=True), "tail_fraction": number(0, 1, low_open=True),
               "head_negatives": FLAG, "projection_dim": integer(1)}

    def __post_init__(self) -> None:
        fill_dataset_defaults(self, {"outlier_max_images": (30_000, None)})
        super().__post_init__()


def default_lambda_pascl(num_classes: int, dataset: str = "cifar10") -> float:
    """Returns PASCL's λ2: 0.1 for CIFAR-10, 0.02 for CIFAR-100 (README recipe), 0.1 on the large
    sets (the code's default, kept by its ImageNet command)."""
    return 0.1 if num_classes == 10 or large_lt.is_large(dataset) else 0.02


def default_temperature(num_classes: int, dataset: str = "cifar10") -> float:
    """Returns PASCL's contrastive temperature T: 0.07 for CIFAR-10, 0.2 for CIFAR-100, 0.07 on
    the large sets (the code's default)."""
    return 0.07 if num_classes == 10 or large_lt.is_large(dataset) else 0.2


def tail_classes(counts: list[int], fraction: float) -> torch.Tensor:
    """Returns a bool mask [C] of the tail classes: the bottom C - round((1 - k) C) by count.

    The official code takes labels >= round((1 - k) C) on count-sorted classes (CIFAR-10, k = 0.4:
    classes 6-9); ranking by count gives the same set without assuming the class order.
    """
    num_classes = len(counts)
    head = round((1 - fraction) * num_classes)
    order = np.argsort(-np.asarray(counts), kind="stable")
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[torch.as_tensor(order[head:], dtype=torch.long)] = True
    return mask


def pascl_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, anchor: torch.Tensor,
                           contrast: torch.Tensor, temperature: float) -> torch.Tensor:
    """Returns L_PASCL = mean over anchors i of -1/|P(i)| Σ_{p ∈ P(i)} log q_i(p), where
    q_i = softmax over a ∈ A(i) of z_i·z_a / T (SupCon, Khosla et al. 2020, restricted as below).

    z [R, d] L2-normalised projections of every row; labels [R] (outliers any value no ID class
    has, e.g. -1); anchor [R] bool; contrast [R] bool, the rows that may appear in a denominator.
    A(i) = contrast rows other than i (anchors are always in it); P(i) = the rows of A(i) with
    i's label. An anchor without positives adds 0; no anchors gives 0 (with a graph).
    """
    rows = anchor.nonzero().squeeze(1)
    if rows.numel() == 0:
        return z.sum() * 0.0
    contrast = contrast | anchor
    not_self = torch.arange(len(z), device=z.device)[None, :] != rows[:, None]
    in_denominator = contrast[None, :] & not_self                                  # A(i) [A, R]
    positive = in_denominator & (labels[rows][:, None] == labels[None, :])        # P(i) [A, R]
    sim = (z[rows] @ z.T / temperature).masked_fill(~in_denominator, float("-inf"))
    log_prob = sim.log_softmax(1)
    per_anchor = -torch.where(positive, log_prob, 0.0).sum(1) / positive.sum(1).clamp(min=1)
    return per_anchor.mean()


class PasclNetwork(nn.Module):
    """A backbone with PASCL's projection head on its d-dim feature: Linear(d, d)-ReLU-Linear(d,
    projection_dim). The CIFAR ResNet-32 (d = 64), or torchvision's ResNet on the large sets
    (d = 2048 for ResNet-50, the official ImageNet head).

    forward(x) keeps the model contract: (logits [1, B, C], feats [1, B, d]); `project(feats)`
    returns the L2-normalised projections [B, projection_dim] used only by L_PASCL.
    """

    num_experts = 1

    def __init__(self, backbone: nn.Module, feature_dim: int, projection_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        d = feature_dim
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(x)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(feats), dim=-1)


class Method(BaseMethod):
    """PASCL stage 1 for the shared engine: two ID views + outliers, CE + OE + L_PASCL; MSP."""

    config_cls = PasclConfig
    name = "pascl"
    summary = "baseline: PASCL stage 1 (Wang et al. 2022), ResNet-32 + projection, MSP"
    uses_outliers = True
    large_scale = True   # torchvision's ResNet + the 2048-d head of the official ImageNet code

    def __init__(self, cfg: PasclConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        self.lambda_pascl = (cfg.lambda_pascl if cfg.lambda_pascl is not None
                             else default_lambda_pascl(self.num_classes, cfg.dataset))
        self.temperature = (cfg.temperature if cfg.temperature is not None
                            else default_temperature(self.num_classes, cfg.dataset))
        self.is_tail = tail_classes(counts, cfg.tail_fraction).to(device)
        self.train_x: torch.Tensor | None = None

    def build_model(self) -> torch.nn.Module:
        backbone = self.backbone("resnet32")
        return PasclNetwork(backbone, backbone.feature_dim, self.cfg.projection_dim)

    def begin_training(self, data: TrainData) -> None:
        self.train_x = data.x        # uint8 training images, for the second view

    def second_view(self, index: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        """Returns a second augmented view of training rows `index`, drawn on a generator seeded
        from `rng`, so a resumed or repeated trial draws the same views."""
        if self.train_x is None or index is None:
            raise ValueError("pascl needs the training images (begin_training) and batch.index "
                             "to draw the second view; got none")
        return self.train_transform(self.train_x[index], self.step_generator(rng))

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.x_out is None:
            raise ValueError("pascl trains with auxiliary outliers; batch.x_out is None")
        n, n_out = len(batch.y), len(batch.x_out)
        x = torch.cat([batch.x, self.second_view(batch.index, rng), batch.x_out])
        logits, feats = model(x)                       # one pass: BN sees ID and outliers together
        logits, feats = logits[0], feats[0]
        y2 = torch.cat([batch.y, batch.y])
        ce = F.cross_entropy(logits[:2 * n], y2)
        oe = losses.outlier_exposure_loss(logits[2 * n:])
        labels = torch.cat([y2, y2.new_full((n_out,), -1)])
        anchor = torch.cat([self.is_tail[y2], y2.new_zeros(n_out, dtype=torch.bool)])
        contrast = anchor | (labels < 0)
        if self.cfg.head_negatives:
            contrast = contrast | (labels >= 0)
        contrastive = pascl_contrastive_loss(model.project(feats), labels, anchor, contrast,
                                             self.temperature)
        loss = ce + self.cfg.lambda_oe * oe + self.lambda_pascl * contrastive
        return loss, {"loss_ce": ce.detach(), "loss_oe": oe.detach(),
                      "loss_pascl": contrastive.detach(), "tail_anchors": anchor.sum().float()}


if __name__ == "__main__":
    from trainables.engine import main

    main(Method)
