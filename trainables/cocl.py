"""COCL (Miao et al., AAAI 2024): calibrated outlier class learning for OOD detection in
long-tailed recognition.

    L = L_CE + λ1 · L_OCL + λ2 · L_TPL + λ3 · L_DHL

- L_CE: cross-entropy of the ID rows over C + 1 outputs (the last one is the outlier class).
- L_OCL (outlier class learning): cross-entropy of the auxiliary outliers to the outlier class C.
- L_TPL (OOD-aware tail class prototype learning): each tail-class feature is classified among
  learnable tail prototypes (one per tail class) and the batch's outlier features, on cosine
  similarities at temperature T; its target is its own class prototype, so it is pulled to the
  prototype and pushed away from the other tail prototypes and from every outlier. Features,
  prototypes and outliers are L2-normalised per half of the feature vector (the code's two
  "heads"), so a similarity lies in [-2, 2].
- L_DHL (debiased head class learning): a triplet margin loss on the raw features with each
  outlier as anchor, the outlier of the batch farthest from it as positive and a random head-class
  ID feature as negative, margin m: outliers are gathered together and kept m away from the head
  classes.
Together L_TPL and L_DHL are the paper's debiased large-margin learning. At test time the
outlier-class-aware logit calibration (OLC) subtracts τ · log [π_1, ..., π_C, 1] from the C + 1
logits (the outlier class is not adjusted); the ID prediction is the argmax of the first C
calibrated logits and the OOD score is the calibrated softmax probability of the outlier class.

What is COCL's own here: the C + 1 head, the prototypes, the four loss terms, OLC and the score.
Symbols and defaults follow the official code (`train.py`, `test.py --OLC`): λ1 = 0.05 (OCL),
λ2 = 0.05 (tail prototypes), λ3 = 0.1 (head triplets), T = 0.07, m = 1, τ = 1; tail classes are
the bottom 40% by count (`labels >= round(0.6 C)`), head classes the round(0.4 C) + 1 most
frequent (`labels <= round(0.4 C)`: 5 of 10 on CIFAR-10, 41 of 100 on CIFAR-100).

Choices against the official code:
- Backbone: the official CIFAR runs use ResNet-18 (512-d features). We use the CIFAR ResNet-32
  (64-d features, split into two 32-d halves for the per-half normalisation) like PASCL and the
  other ResNet-32 baselines, so the comparison table's outlier methods train the same network.
- Recipe (the official CIFAR defaults): Adam lr 1e-3, L2 weight decay 5e-4, cosine over 100
  epochs with no warm-up, 128 ID images and 256 outliers per step (2:1) in one forward pass,
  all of the outlier set (300K in the code). Inputs: crop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1)
  p = 0.8, grayscale p = 0.2 for ID and outliers, normalised with the ImageNet mean/std on CIFAR
  as in the code.
- Batches are the engine's: one pass over the ID set per epoch, outliers drawn without
  replacement (the code zips the two loaders and drops the last partial ID batch).
- Sync-free rows: L_TPL averages over the tail rows through a mask, and the head negatives are
  drawn on the device generator (uniformly among the batch's head rows, with replacement, as the
  code's randint); a batch without tail (head) rows gives L_TPL (L_DHL) = 0, where the code
  skips (or fails on) it.
- Test-time score: the code reports -P(outlier) with ID as the positive class; our confidence is
  -P(outlier class | OLC logits), higher for ID, which is the same ranking.

Large-scale setup (ImageNet-LT in the paper; the official `models/resnet_imagenet.py`,
`train.py --ds imagenet` and the README's ImageNet command):
- network: torchvision's ResNet-50 (`backbone=auto`; ResNet-152 on Places-LT, or `backbone=...`,
  `pretrained=...`) with a linear classifier of C + 1 outputs on its 2048-d GAP feature, and
  round(0.4 C) learnable tail prototypes [P, 2048] (400 on ImageNet-LT, the code's
  `weight` [400, 2048]), each half of 1024 normalised separately in L_TPL (its num_head = 2);
  L_DHL on the raw 2048-d features (`CoclNetwork`);
- loss weights: λ1 = 0.02, λ2 = 0.01, λ3 = 0.01 (the README's ImageNet command and the code's
  help text; Places-LT, which COCL never ran, takes them too); T, m, τ, the head/tail rates and
  the 2:1 outlier batch are the code's defaults (the ImageNet command changes none of them; its
  `stage1.py` is not in the release);
- inputs: the dataset's views (`large_lt.View`, ImageNet mean/std as the code), crops at scale
  (0.2, 1) as its RandomResizedCrop; its colour jitter and grayscale are not applied;
- head and tail classes ranked by training count. The code compares labels with round(0.4 C)
  and round(0.6 C), the same sets on the count-sorted CIFAR builds; ImageNet-LT's labels are not
  sorted by count, so there the code's "head" and "tail" are the first 401 and last 400 labels;
- the recipe (the README's lr 0.1; the rest of its ImageNet schedule is not published) is not
  this config's default: the cocl/imagenet-lt recipe (trainables.recipes), which `--preset
  small|paper` trains, fills the rest with PASCL's ImageNet schedule (its note says so).

Run one trial without Ray:  python -m trainables cocl --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables import augment, losses, scores
from trainables.config import TrainConfig, fill_dataset_defaults, integer, number, one_of, positive
from trainables.method import Batch, Method as BaseMethod
from trainables.pascl import tail_classes

OOD_SCORES = ("outlier_class", *(name for name in scores.NAMES if name != "odin"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CoclConfig(TrainConfig):
    # COCL's CIFAR recipe (official train.py defaults).
    epochs: int = 100
    optimizer: str = "adam"
    lr_schedule: str = "cosine"          # CosineAnnealingLR(T_max=epochs), stepped per epoch
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_epochs: int = 0
    outlier_ratio: float = 2.0           # outliers per ID image when outlier_batch_size is unset: 256 : 128
    ood_score: str = "outlier_class"     # -P(outlier class) after OLC; also msp | energy | max_logit
    # Loss (the code's Lambda1-3, temperature, margin, headrate, tailrate). λ1-3 None -> the
    # paper's for the dataset: 0.05 / 0.05 / 0.1 on CIFAR, 0.02 / 0.01 / 0.01 on the large sets.
    lambda_ocl: float | None = None      # λ1, weight of L_OCL
    lambda_tail: float | None = None     # λ2, weight of L_TPL (OOD-aware tail prototypes)
    lambda_head: float | None = None     # λ3, weight of L_DHL (debiased head triplets)
    temperature: float = 0.07            # T of L_TPL
    margin: float = 1.0                  # m of L_DHL
    head_rate: float = 0.4               # head = the round(h C) + 1 most frequent classes
    tail_rate: float = 0.4               # tail = the bottom C - round((1 - t) C) classes
    prototype_heads: int = 2             # halves normalised separately in L_TPL (the code's num_head)
    # Test time.
    tau_olc: float = 1.0                 # τ of OLC; 0 = raw logits
    crop_min_scale: float = 0.2          # large sets only: the ImageNet code's RandomResizedCrop scale

    ACCEPTS = {"outlier_ratio": positive(), "ood_score": one_of(*OOD_SCORES),
               "lambda_ocl": number(0, none=True), "lambda_tail": number(0, none=True),
               "lambda_head": number(0, none=True), "temperature": positive(),
               "margin": number(0), "head_rate": number(0, 1, low_open=True, high_open=True),
               "tail_rate": number(0, 1, low_open=True, high_open=True), "prototype_heads": integer(1),
               "tau_olc": number(0)}

    def __post_init__(self) -> None:
        fill_dataset_defaults(self, {"lambda_ocl": (0.05, 0.02), "lambda_tail": (0.05, 0.01),
                                     "lambda_head": (0.1, 0.01)})
        super().__post_init__()
        if self.outlier_batch_size is None:
            self.outlier_batch_size = max(1, round(self.outlier_ratio * self.batch_size))


def most_frequent_classes(counts: list[int], k: int) -> torch.Tensor:
    """Returns a bool mask [C] of the k classes with the most training images (stable on ties)."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    mask = torch.zeros(len(counts), dtype=torch.bool)
    mask[torch.as_tensor(order[:k], dtype=torch.long)] = True
    return mask


def head_classes(counts: list[int], rate: float) -> torch.Tensor:
    """Returns COCL's head mask [C]: the round(rate C) + 1 most frequent classes, i.e. the code's
    `labels <= round(rate C)` on count-sorted classes (5 of 10 at rate 0.4)."""
    return most_frequent_classes(counts, min(round(rate * len(counts)) + 1, len(counts)))


def split_normalize(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Returns x [N, d] with each of its `heads` equal slices of the last axis L2-normalised."""
    return torch.cat([F.normalize(part, dim=-1) for part in x.chunk(heads, dim=-1)], dim=-1)


def outlier_class_loss(logits_out: torch.Tensor) -> torch.Tensor:
    """Returns L_OCL: the mean cross-entropy of outlier logits [M, C + 1] to the last class."""
    target = torch.full((len(logits_out),), logits_out.shape[-1] - 1, dtype=torch.long,
                        device=logits_out.device)
    return F.cross_entropy(logits_out, target)


def tail_prototype_loss(feats: torch.Tensor, target: torch.Tensor, is_tail: torch.Tensor,
                        prototypes: torch.Tensor, feats_out: torch.Tensor, temperature: float,
                        heads: int = 2) -> torch.Tensor:
    """Returns L_TPL, the mean over tail rows of CE(s_i / T, target_i) with
    s_i = [<f_i, w_1>, ..., <f_i, w_P>, <f_i, o_1>, ..., <f_i, o_M>] on split-normalised vectors.

    feats [B, d] ID features; target [B] the prototype index of each row (ignored where not
    tail); is_tail [B] bool; prototypes [P, d]; feats_out [M, d] the outliers' features. No tail
    rows gives 0 (with a graph).
    """
    f = split_normalize(feats, heads)
    keys = split_normalize(torch.cat([prototypes.to(feats.dtype), feats_out]), heads)
    ce = F.cross_entropy(f @ keys.T / temperature, target.clamp(min=0), reduction="none")
    weight = is_tail.to(ce.dtype)
    return (ce * weight).sum() / weight.sum().clamp(min=1)


def farthest_rows(x: torch.Tensor) -> torch.Tensor:
    """Returns, for every row of x [M, d], the index of the row farthest from it (Euclidean)."""
    with torch.no_grad():
        return torch.cdist(x.float(), x.float()).argmax(1)


def head_triplet_loss(feats_out: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """Returns L_DHL = mean_i max(d(o_i, o_far(i)) - d(o_i, n_i) + m, 0): triplets with outlier
    anchors o [M, d], the farthest outlier as positive and the head features n [M, d] as
    negatives (torch's TripletMarginLoss, p = 2, as in the code)."""
    return F.triplet_margin_loss(feats_out, feats_out[farthest_rows(feats_out)], negatives,
                                 margin=margin)


def calibrated_logits(logits: torch.Tensor, prior_log: torch.Tensor, tau: float) -> torch.Tensor:
    """Returns OLC's z - τ log [π_1, ..., π_C, 1] for logits [B, C + 1] (the outlier class keeps
    its logit)."""
    shift = torch.cat([prior_log, prior_log.new_zeros(1)]).to(logits.dtype)
    return logits - tau * shift


class CoclNetwork(nn.Module):
    """A backbone with C + 1 outputs and P learnable tail prototypes [P, d] on its d-dim feature:
    the CIFAR ResNet-32 (d = 64), or torchvision's ResNet on the large sets (d = 2048 for
    ResNet-50, the official ImageNet model's `weight` [400, 2048]).

    forward(x) keeps the model contract: (logits [1, B, C + 1], feats [1, B, d]).
    """

    num_experts = 1

    def __init__(self, backbone: nn.Module, feature_dim: int, num_prototypes: int):
        super().__init__()
        self.backbone = backbone
        bound = 1.0 / math.sqrt(feature_dim)         # the code's uniform(-1/sqrt(d), 1/sqrt(d))
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, feature_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(x)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """Returns float images in [0, 1] [B, 3, H, W] normalised with the ImageNet mean/std."""
    return augment.standardize(x, IMAGENET_MEAN, IMAGENET_STD)


class Method(BaseMethod):
    """COCL for the shared engine: ID rows + outliers in one forward pass, C + 1 outputs,
    L_CE + λ1 L_OCL + λ2 L_TPL + λ3 L_DHL; OLC and -P(outlier class) at test time."""

    config_cls = CoclConfig
    name = "cocl"
    summary = ("COCL: outlier class + tail prototypes + head triplets, logit calibration (OLC), "
               "ResNet-32, -P(outlier class)")
    uses_outliers = True
    augment_rule = ("random crop 32 with 4-px zero padding, horizontal flip p=0.5, ColorJitter(0.4, 0.4, "
                    "0.4, 0.1) p=0.8, grayscale p=0.2 (batched, torchvision tensor maths); ID and outliers")
    input_rule = f"x / 255, mean {IMAGENET_MEAN} std {IMAGENET_STD} (ImageNet statistics, COCL's CIFAR code)"
    large_scale = True   # torchvision's ResNet, C + 1 outputs, 2048-d prototypes (official ImageNet model)

    def __init__(self, cfg: CoclConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        self.prior_log = losses.log_prior(counts, device)          # log π_c, for OLC
        self.is_tail = tail_classes(counts, cfg.tail_rate).to(device)
        self.is_head = head_classes(counts, cfg.head_rate).to(device)
        # Prototype index of each tail class (in class order, like the code's label - round(0.6 C)).
        self.prototype_of = (torch.cumsum(self.is_tail.long(), 0) - 1).masked_fill(~self.is_tail, -1)

    def build_model(self) -> torch.nn.Module:
        backbone = self.backbone("resnet32", self.num_classes + 1)
        return CoclNetwork(backbone, backbone.feature_dim, int(self.is_tail.sum()))

    def train_transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return imagenet_normalize(augment.crop_flip_jitter_gray(x_uint8, gen))

    def eval_transform(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return imagenet_normalize(x_uint8.float() / 255.0)

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.x_out is None:
            raise ValueError("cocl trains with auxiliary outliers; batch.x_out is None")
        cfg, n = self.cfg, len(batch.y)
        logits, feats = model(torch.cat([batch.x, batch.x_out]))   # one pass: BN sees both
        logits, feats = logits[0], feats[0]
        loss_ce = F.cross_entropy(logits[:n], batch.y)
        loss_ocl = outlier_class_loss(logits[n:])
        loss_tail = tail_prototype_loss(feats[:n], self.prototype_of[batch.y], self.is_tail[batch.y],
                                        model.prototypes, feats[n:], cfg.temperature,
                                        cfg.prototype_heads)
        # One random head row per outlier, drawn on the device; no head rows -> L_DHL = 0.
        head_rows = self.is_head[batch.y]
        has_head = head_rows.any()
        weights = torch.where(has_head, head_rows.float(), torch.ones_like(head_rows, dtype=torch.float))
        n_out = len(batch.x_out)
        negative = torch.multinomial(weights, n_out, replacement=True, generator=self.step_generator(rng))
        loss_head = head_triplet_loss(feats[n:], feats[:n][negative], cfg.margin) * has_head
        loss = (loss_ce + cfg.lambda_ocl * loss_ocl + cfg.lambda_tail * loss_tail
                + cfg.lambda_head * loss_head)
        with torch.no_grad():
            p_out = logits.float().softmax(-1)[:, -1]
            stats = {"loss_ce": loss_ce.detach(), "loss_ocl": loss_ocl.detach(),
                     "loss_tail": loss_tail.detach(), "loss_head": loss_head.detach(),
                     "p_outlier_id": p_out[:n].mean(), "p_outlier_ood": p_out[n:n + n_out].mean()}
        return loss, stats

    def calibrated(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns the OLC logits [B, C + 1] (τ = cfg.tau_olc)."""
        return calibrated_logits(model(x)[0][0], self.prior_log, self.cfg.tau_olc)

    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns the first C OLC logits [B, C]: the ID prediction ignores the outlier class."""
        return self.calibrated(model, x)[:, :self.num_classes]

    def classify(self, model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """Returns `logits` from features [1, B, d] (ReAct clips them first): the classifier, OLC,
        the first C columns."""
        z = model.backbone.classifier(feats[0])
        return calibrated_logits(z, self.prior_log, self.cfg.tau_olc)[:, :self.num_classes]

    def confidence(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns -P(outlier class | OLC logits) [B] for ood_score "outlier_class", else the named
        score on the C calibrated ID logits."""
        if self.cfg.ood_score == "outlier_class":
            with torch.no_grad():
                return -self.calibrated(model, x).float().softmax(-1)[:, -1]
        return super().confidence(model, x)


if __name__ == "__main__":
    from trainables.engine import main

    main(Method)
