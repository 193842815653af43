"""EAT, stage 1 (Wei et al., AAAI 2024, "Expand and AugmenT"): abstention classes for OOD and
tail images pasted onto head and OOD context.

Expand: the classifier has C + A outputs; the A extra ("abstention") classes take the
auxiliary outliers. Each outlier is assigned to the abstention class its head currently scores
highest (argmax over the A abstention logits, recomputed every step and detached), so the
outliers spread over A classes instead of one.
Augment: tail-class images are pasted, CutMix-style, into head-class images and into outliers;
the pasted row keeps the tail image's label (a hard label, not area-mixed). Rows per step:
- tail on head: in each view, the r-th head row (in batch order) receives the box of the
  (r mod t)-th tail row of the same view, for r < ⌊h / t⌋ · t (h head rows, t tail rows);
- tail on OOD: the j-th outlier receives the box of the (j mod t)-th tail row of view 1, for
  j < ⌊m / t⌋ · t (m outliers).
Each of the two groups uses one box per step, its area share 1 - λ with λ ~ Beta(0.9999, 0.9999)
(Yun et al. 2019's box rule). The model has three linear heads on one feature; each head k gets

    L_k = CE(z_k(ID, both views), y) + Λ0 · CE(z_k(pasted rows), y_tail) + Λ1 · CE(z_k(outliers), ŷ_k)

with ŷ_k = C + argmax_a z_k(outlier)_{C+a}, and L = L_0 + L_1 + L_2. At test time the heads'
softmaxes are summed: the ID prediction is the argmax over the C ID columns and the OOD score is
the summed probability of the A abstention classes (our confidence is its negative).

What is EAT's own: the abstention classes and their assignment rule, the two paste groups, the
three heads and the test-time score. Defaults follow the official README (CIFAR-10: `--odc 3`,
CIFAR-100: `--odc 30`, `--Lambda0 0.05 --Lambda1 0.05`, 180 epochs) and `stage1.py` (Adam lr
1e-3, L2 weight decay 5e-4, cosine, no warm-up, 128 ID images with two views and 128 outliers
per step, head = the 40% most frequent classes, tail = the bottom 40%).

Choices against the official code:
- Backbone: the official CIFAR runs use ResNet-18 with three heads. We use the CIFAR ResNet-32
  with three heads (`models.MultiHeadResNet32`), like PASCL and COCL here.
- Class layout: the code puts the abstention classes first (ID label + A); we put them last
  (ID labels unchanged). A permutation of the outputs, nothing else changes.
- A = round(abstention_ratio · C): 0.3 gives the README's 3 and 30.
- Fixed-size, sync-free batches: both paste groups are built for every candidate row (every ID
  row of each view, every outlier) and the rows outside the rule above get weight 0 in their CE
  (the code leaves them out of the batch). They still pass through the forward, so BatchNorm's
  batch statistics also see them: on CIFAR-10-LT IR100 the non-head rows are about 12% of the ID
  rows, about 5% of a step's 4B + 2M rows. A batch without tail rows has no used pasted rows
  (the code reuses the previous step's there, or fails).
- Inputs: crop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p = 0.8, grayscale p = 0.2 for ID and
  outliers, no mean/std normalisation (x / 255 at test time), as in the code.
- Not implemented: stage 2 (`stage2.py`, the README's 10-epoch fine-tune of the classifier,
  used for the paper's ID accuracy). Our ID accuracy is the stage-1 model's, like PASCL's here.

Large-scale setup (ImageNet-LT in the paper; the official `models/our_resnet_imagenet.py` and
`stage1.py --ds imagenet` with the README's ImageNet command):
- network: torchvision's ResNet-50 (`backbone=auto`; ResNet-152 on Places-LT, or `backbone=...`,
  `pretrained=...`) with three linear heads Linear(2048, C + A) on its GAP feature
  (`models.MultiHeadTorchvisionResNet`). The released ImageNet code builds the heads with C
  outputs, too few for its shifted labels (ID label + A); we give them C + A, as on CIFAR;
- A = 30 abstention classes (the README's `--odc 30`): abstention_ratio resolves to 30 / C on
  the large sets (0.03 on ImageNet-LT; Places-LT, which EAT never ran, keeps the 30 classes);
- contexts and pasted classes: the code's ImageNet split is half and half (head = the first 500
  labels, tail = the last 500), so head_fraction and tail_fraction resolve to 0.5 there. We rank
  classes by training count; ImageNet-LT's labels are not sorted by count, so the code's halves
  are not the frequent and rare halves;
- inputs: the dataset's views (`large_lt.View`, ImageNet mean/std) for both ID views and the
  outliers, crops at scale (0.2, 1) as the code's RandomResizedCrop; its colour jitter and
  grayscale are not applied. The paste boxes follow the view size (224 px at the default);
- outliers: all of the outlier set (the code's ImageNet-Extra ImageFolder), 1:1;
- the paper's ImageNet recipe (SGD, Nesterov, lr 0.1 · batch/256 = 0.05 at its batch 128,
  weight decay 5e-5, 60 epochs: its command passes `--epochs 100` and then `-e 60`, and the last
  wins, so its step milestones 60 and 80 never fire) is not this config's default: it is the
  eat/imagenet-lt recipe (trainables.recipes), which `--preset small|paper` trains.

Run one trial without Ray:  python -m trainables eat --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainables import augment, models, scores
from trainables.cocl import most_frequent_classes
from trainables.config import TrainConfig, fill_dataset_defaults, integer, number, one_of, positive
from trainables.method import Batch, Method as BaseMethod, TrainData
from trainables.pascl import tail_classes

OOD_SCORES = ("abstention", *(name for name in scores.NAMES if name != "odin"))
# A = 30 abstention classes on the large sets (the README's ImageNet-LT `--odc 30`), as a share of
# each set's classes.
LARGE_ABSTENTION_RATIO = {"imagenet-lt": 30 / 1000, "places-lt": 30 / 365}


@dataclass
class EatConfig(TrainConfig):
    # EAT's CIFAR recipe (README command line over stage1.py's defaults).
    epochs: int = 180
    optimizer: str = "adam"
    lr_schedule: str = "cosine"          # CosineAnnealingLR(T_max=epochs), stepped per epoch
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 128                # ID images per step, two views each; outliers 1:1
    warmup_epochs: int = 0
    ood_score: str = "abstention"        # -Σ_k Σ_a softmax(z_k)_{C+a}; also msp | energy | max_logit
    lambda_cutmix: float = 0.05          # Λ0, weight of the pasted rows' CE
    lambda_ood: float = 0.05             # Λ1, weight of the outliers' abstention CE
    # None below -> the paper's for the dataset, CIFAR / large sets (see the module docstring).
    abstention_ratio: float | None = None   # A = round(ratio · C); 0.3 (3 / 30 on CIFAR-10 / 100) / 30 / C
    num_heads: int = 3                   # linear heads on the shared feature
    head_fraction: float | None = None   # contexts: the round(f C) most frequent classes; 0.4 / 0.5
    tail_fraction: float | None = None   # pasted: the bottom C - round((1 - f) C) classes; 0.4 / 0.5
    cutmix_beta: float = 0.9999          # λ ~ Beta(β, β) of each paste group
    crop_min_scale: float = 0.2          # large sets only: the ImageNet code's RandomResizedCrop scale

    ACCEPTS = {"ood_score": one_of(*OOD_SCORES), "lambda_cutmix": number(0), "lambda_ood": number(0),
               "abstention_ratio": positive(none=True), "num_heads": integer(1),
               "head_fraction": number(0, 1, low_open=True, high_open=True, none=True),
               "tail_fraction": number(0, 1, low_open=True, high_open=True, none=True),
               "cutmix_beta": positive()}

    def __post_init__(self) -> None:
        fill_dataset_defaults(self, {"abstention_ratio": (0.3, LARGE_ABSTENTION_RATIO),
                                     "head_fraction": (0.4, 0.5), "tail_fraction": (0.4, 0.5)})
        super().__post_init__()


def num_abstention_classes(num_classes: int, ratio: float) -> int:
    """Returns A = round(ratio · C); ValueError if that is 0."""
    a = round(ratio * num_classes)
    if a < 1:
        raise ValueError(f"abstention_ratio={ratio} gives {a} abstention classes for {num_classes} "
                         f"classes; accepted: a ratio with round(ratio · C) >= 1")
    return a


def abstention_targets(logits_out: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Returns ŷ = C + argmax_a z_{C+a} [M] for outlier logits [M, C + A]: each outlier goes to
    the abstention class its head scores highest (EAT's assignment rule; no gradient)."""
    return num_classes + logits_out.detach()[:, num_classes:].argmax(-1)


def cycled_sources(context: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (src [L], used [L]) for bool masks context [L] and source [N].

    The r-th context row (in order) is paired with the (r mod s)-th source row, s = source.sum(),
    and is used iff r < ⌊c / s⌋ · s (c = context.sum()): the code's repetition of the tail rows
    ⌊c / s⌋ times over the first context rows. Computed on the device, without a host sync; no
    source rows leaves every row unused.
    """
    rank = torch.cumsum(context.long(), 0) - 1
    c, s = context.sum(), source.sum()
    s1 = s.clamp(min=1)
    used = context & (rank < (c // s1) * s) & (s > 0)
    want = rank.clamp(min=0) % s1 + 1                       # 1-based rank of the source row
    src = torch.searchsorted(torch.cumsum(source.long(), 0), want).clamp(max=len(source) - 1)
    return src, used


def paste_box(context: torch.Tensor, source: torch.Tensor,
              box: tuple[int, int, int, int]) -> torch.Tensor:
    """Returns a copy of context [B, 3, H, W] with box (y1, y2, x1, x2) taken from source."""
    y1, y2, x1, x2 = box
    out = context.clone()
    out[..., y1:y2, x1:x2] = source[..., y1:y2, x1:x2]
    return out


def eat_head_loss(logits: torch.Tensor, y2: torch.Tensor, n_out: int, paste_y: torch.Tensor,
                  paste_used: torch.Tensor, num_classes: int, lambda_cutmix: float,
                  lambda_ood: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (L_k, its terms) for one head's logits [R, C + A] on rows ordered as
    [ID views (len(y2)), outliers (n_out), pasted rows (len(paste_y))].

    L_k = CE(ID, y2) + Λ0 · (mean CE of the used pasted rows on their tail labels; 0 if none)
          + Λ1 · CE(outliers, C + argmax over the abstention logits).
    """
    n2 = len(y2)
    ce_id = F.cross_entropy(logits[:n2], y2)
    z_out = logits[n2:n2 + n_out]
    ce_ood = F.cross_entropy(z_out, abstention_targets(z_out, num_classes))
    ce_paste = F.cross_entropy(logits[n2 + n_out:], paste_y, reduction="none")
    weight = paste_used.to(ce_paste.dtype)
    ce_paste = (ce_paste * weight).sum() / weight.sum().clamp(min=1)
    loss = ce_id + lambda_cutmix * ce_paste + lambda_ood * ce_ood
    return loss, {"loss_id": ce_id, "loss_cutmix": ce_paste, "loss_ood": ce_ood}


def abstention_mass(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Returns Σ_k Σ_a softmax(z_k)_{C+a} [B] for logits [K, B, C + A]: EAT's OOD score."""
    return logits.float().softmax(-1)[..., num_classes:].sum(-1).sum(0)


class Method(BaseMethod):
    """EAT stage 1 for the shared engine: two ID views, outliers and the pasted rows in one
    forward pass through a three-head ResNet-32; abstention mass at test time."""

    config_cls = EatConfig
    name = "eat"
    summary = ("EAT stage 1: abstention classes for outliers + tail images pasted on head/OOD "
               "context, 3-head ResNet-32, abstention-class probability")
    uses_outliers = True
    augment_rule = ("random crop 32 with 4-px zero padding, horizontal flip p=0.5, ColorJitter(0.4, 0.4, "
                    "0.4, 0.1) p=0.8, grayscale p=0.2 (batched, torchvision tensor maths); ID (two "
                    "views) and outliers; tail boxes pasted on head / outlier rows")
    input_rule = "x / 255, no mean/std normalisation (EAT's CIFAR code)"
    large_scale = True   # torchvision's ResNet with three heads of C + A outputs (official ImageNet model)

    def __init__(self, cfg: EatConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        self.num_abstention = num_abstention_classes(self.num_classes, cfg.abstention_ratio)
        self.is_head = most_frequent_classes(counts, round(cfg.head_fraction * self.num_classes)).to(device)
        self.is_tail = tail_classes(counts, cfg.tail_fraction).to(device)
        self.train_x: torch.Tensor | None = None

    def build_model(self) -> torch.nn.Module:
        cfg, arch, outputs = self.cfg, self.backbone_name(), self.num_classes + self.num_abstention
        if arch is not None:
            return models.create("resnet50_multihead", outputs, num_heads=cfg.num_heads, arch=arch,
                                 pretrained=cfg.pretrained)
        return models.create("resnet32_multihead", outputs, num_heads=cfg.num_heads)

    def train_transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return augment.crop_flip_jitter_gray(x_uint8, gen)

    def eval_transform(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return x_uint8.float() / 255.0

    def begin_training(self, data: TrainData) -> None:
        self.train_x = data.x        # uint8 training images, for the second view

    def second_view(self, index: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        """Returns a second augmented view of training rows `index`, drawn from `rng`."""
        if self.train_x is None or index is None:
            raise ValueError("eat needs the training images (begin_training) and batch.index "
                             "to draw the second view; got none")
        return self.train_transform(self.train_x[index], self.step_generator(rng))

    def paste_rows(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor,
                   rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (images [2B + M, 3, H, W], labels, used) of the two paste groups: tail boxes
        on the head rows of each view, then tail boxes (view 1) on the outliers."""
        h, w = v1.shape[-2:]
        head, tail = self.is_head[y], self.is_tail[y]
        src, used = cycled_sources(head, tail)
        box = augment.cutmix_box(h, w, rng.beta(self.cfg.cutmix_beta, self.cfg.cutmix_beta), rng)
        on_head = [paste_box(v, v[src], box) for v in (v1, v2)]
        src_out, used_out = cycled_sources(torch.ones(len(x_out), dtype=torch.bool, device=y.device), tail)
        box = augment.cutmix_box(h, w, rng.beta(self.cfg.cutmix_beta, self.cfg.cutmix_beta), rng)
        on_ood = paste_box(x_out, v1[src_out], box)
        return (torch.cat([*on_head, on_ood]), torch.cat([y[src], y[src], y[src_out]]),
                torch.cat([used, used, used_out]))

    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.x_out is None:
            raise ValueError("eat trains with auxiliary outliers; batch.x_out is None")
        cfg = self.cfg
        v1, v2 = batch.x, self.second_view(batch.index, rng)
        pasted, paste_y, paste_used = self.paste_rows(v1, v2, batch.y, batch.x_out, rng)
        logits = model(torch.cat([v1, v2, batch.x_out, pasted]))[0]      # [K, R, C + A]
        y2 = torch.cat([batch.y, batch.y])
        total, stats = 0.0, {}
        for head_logits in logits:
            loss_k, terms = eat_head_loss(head_logits, y2, len(batch.x_out), paste_y, paste_used,
                                          self.num_classes, cfg.lambda_cutmix, cfg.lambda_ood)
            total = total + loss_k
            for key, value in terms.items():
                stats[key] = stats.get(key, 0.0) + value.detach() / len(logits)
        stats["pasted_rows"] = paste_used.sum().float()
        return total, stats

    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns log of the heads' mean softmax over the C ID columns [B, C]: its argmax is the
        code's prediction (argmax of the summed softmaxes over the ID columns)."""
        probs = model(x)[0].float().softmax(-1).mean(0)
        return probs[:, :self.num_classes].clamp(min=1e-30).log()

    def classify(self, model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """Returns `logits` from features [K, B, d] (ReAct clips them first): each head on its
        copy of the shared feature, the heads' mean softmax over the C ID columns, logged."""
        probs = torch.stack([head(f) for head, f in zip(model.heads, feats)]).float().softmax(-1).mean(0)
        return probs[:, :self.num_classes].clamp(min=1e-30).log()

    def confidence(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns -(summed abstention probability) [B] for ood_score "abstention", else the named
        score on `logits`."""
        if self.cfg.ood_score == "abstention":
            with torch.no_grad():
                return -abstention_mass(model(x)[0], self.num_classes)
        return super().confidence(model, x)


if __name__ == "__main__":
    from trainables.engine import main

    main(Method)
