"""CALA (Zhou, Wu and Yang, AAAI 2025): class- and attribute-aware logit adjustment.

Both variants train a CIFAR ResNet-32 (on ImageNet-LT / Places-LT the set's torchvision ResNet) with the
CALA loss (Eq. 5), softmax cross-entropy on

    z + τ1·log p_tr(y) + τ2·v(x, ·),

where v(x, c) estimates the log class-conditional density ratio log p_tr(x|c) / p_te(x|c) from
the sample's neighbourhood in feature space, and both predict with the raw logits z (no
adjustment at test time). They differ only in how v is estimated:

- Heuristic-CALA (`HeuristicMethod`): v = log p̃_pr / p̃_mx over the K cosine nearest neighbours
  in a bank of recent in-batch-Mixup batches (Eq. 8 with the class-average smoothing of Eq. A.11).
- Meta-CALA (`MetaMethod`): v = MLP_Ω(ζ) on 42 neighbourhood and training-dynamics features,
  with Ω meta-learned by a one-step look-ahead on a balanced meta set (Eqs. A.12-A.14).

CALA is not an OOD detector: the test-time OOD score is the post-hoc cfg.ood_score (energy by
default) on the raw logits, from the base class.

Meta-CALA's meta set on CIFAR deviates from the paper, which balances it over classes and
attributes (KMeans, 6 clusters per class, on pre-trained ResNet-50 features): no pre-trained
network is assumed there, so it is class-balanced only: meta_per_class random images per class,
held out by the engine after validation and before the long-tailed subsampling (as the released
code holds out its meta set). M = 3,000 on either CIFAR (meta_per_class 300 / 30, each data
set's default). On CIFAR-100-LT at ρ = 100 the paper's tail class has 5 images, which needs
n_max = 500, i.e. nothing held out: the 50 validation images a class already leave 4, and a meta
set of up to 50 a class keeps it at 4. A split that leaves any class under 2 images is refused.

On ImageNet-LT / Places-LT the meta set is the paper's: meta_per_group image(s) per (class,
KMeans group) of a pretrained ResNet's features, drawn from the training list and kept in
training where removing them would leave a cell under 2 images (trainables.meta_set); the
virtual step moves only the last residual block and the classifier (meta_virtual_params, the
spec's [R] for big backbones).

Run one trial without Ray:  python -m trainables cala --epochs 2 --data-dir DATA_DIR
"""
from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from trainables import augment, large_lt, losses, meta_set
from trainables.config import (FLAG, LARGE_DATASETS, Accepts, TrainConfig, integer, number, one_of,
                               positive)
from trainables.method import Batch, Method, TrainData

V_MODES = ("log", "l2_ratio")
META_OUTS = ("per_class", "gt_scalar")
VIRTUAL_PARAMS = ("all", "last_block_fc")
GROUPING_ARCHS = ("resnet18", "resnet50", "resnet152")
NUM_BASE_CHARACTERISTICS = 21   # ζ1..ζ21 of Table A-1; ζ22..ζ42 are their changes


@dataclass
class CalaConfig(TrainConfig):
    """Fields both variants share. Defaults: the paper's CIFAR-10-LT (ρ = 100) recipe, which
    follows LDAM-DRW: SGD 0.9, lr 0.1, 5-epoch warm-up, ×0.01 at 160 and again at 180 of 200.

    A field listed in DATASET_DEFAULTS and left None takes its data set's value (an explicit value
    wins); `dataset_defaults` then records which fields did, and is logged with the config."""
    tau1: float = 1.5                # τ1, weight of u(y) = log p_tr(y); the paper uses 1.0 at ρ ≤ 10
    tau2: float = 1.0                # τ2, weight of v(x, y)
    knn_k: int | None = None         # K, neighbourhood size; None -> 40 (CIFAR-10-LT) / 80 (CIFAR-100-LT)
    dataset_defaults: str | None = None   # e.g. "cifar100: knn_k=80", set when built
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False           # plain momentum SGD, as in LDAM-DRW, which the paper follows
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    warmup_method: str = "ldam"       # LDAM-DRW's ramp lr·(e+1)/W, which the CIFAR-LT recipe follows
    # lr_at multiplies by 0.1 per entry reached, so two entries per epoch give ×0.01 at 160 and 180.
    lr_milestones: tuple[float, ...] = (0.8, 0.8, 0.9, 0.9)
    ood_score: str = "energy"        # CALA has no OOD score of its own: a post-hoc one on raw logits
    ACCEPTS = {"tau1": number(0), "tau2": number(0), "knn_k": integer(1, none=True),
               "dataset_defaults": Accepts("text", none=True)}
    # The spec's per-data-set values (cala.md §2 and Fig. A-2: K = 40 on CIFAR-10-LT, 80 on
    # CIFAR-100-LT); τ1, τ2 and the schedule are the same on both.
    DATASET_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {"cifar10": {"knn_k": 40},
                                                             "cifar100": {"knn_k": 80}}

    def __post_init__(self) -> None:
        values = self.DATASET_DEFAULTS.get(self.dataset, {}) if isinstance(self.dataset, str) else {}
        filled = {name: value for name, value in values.items() if getattr(self, name) is None}
        for name, value in filled.items():
            setattr(self, name, value)
        if filled and isinstance(self.dataset_defaults, (str, type(None))):   # else validate refuses it
            self.dataset_defaults = f"{self.dataset}: " + ", ".join(f"{k}={v}" for k, v in filled.items())
        super().__post_init__()


@dataclass
class HeuristicConfig(CalaConfig):
    smooth_alpha: float = 0.05       # α of the class-average smoothing (Eq. A.11)
    mixup_alpha: float = 0.2         # a of λ ~ Beta(a, a) (paper; the released code uses 1.0); 0 = off
    v_mode: str = "log"              # "log": Eq. 8 | "l2_ratio": the released code's normalised ratio
    v_eps: float = 1e-6              # ε in log(p + ε), log mode
    v_clip: float = 5.0              # |v| <= v_clip, log mode
    bank_samples_per_class: int = 10  # bank = ceil(this·C / batch_size) + 1 batches (code: 10)
    exclude_self: bool = False       # leave x out of its own neighbourhood (the code keeps it)
    v_start_epoch: int = 0           # v = 0 before this epoch, while predictions are still noise
    ACCEPTS = {"smooth_alpha": number(0, 1), "mixup_alpha": number(0), "v_mode": one_of(*V_MODES),
               "v_eps": positive(), "v_clip": positive(), "bank_samples_per_class": integer(1),
               "exclude_self": FLAG, "v_start_epoch": integer(0)}


@dataclass
class MetaConfig(CalaConfig):
    meta_per_class: int | None = None  # None -> 300 (CIFAR-10) / 30 (CIFAR-100): M = 3,000 (paper; code 1,000)
    meta_batch_size: int = 100       # m (released code)
    meta_lr: float = 1e-3            # η2, Adam (paper; code 1e-2)
    meta_weight_decay: float = 0.0   # Adam's L2 on Ω (code 5e-4)
    meta_interval: int = 1           # steps between meta updates (Alg. A-2: every step; code 20)
    meta_hidden: int = 200           # width of the adjustment MLP (code)
    meta_out: str = "per_class"      # "per_class": δ ∈ R^C | "gt_scalar": δ = s·onehot(y)
    # Parameters the virtual step moves (Eq. A.12): "all" (the paper), or "last_block_fc", the
    # last residual block and the classifier (spec §3.7 [R] for big backbones, as MetaSAug on
    # ImageNet-scale data). None: "all" on CIFAR, "last_block_fc" on the large sets.
    meta_virtual_params: str | None = None
    # The large sets' meta set (spec §3.7.1, pitfall row 18): meta_per_group images per (class,
    # group), groups = KMeans(meta_groups) per class on a pretrained ResNet's features.
    meta_groups: int = 6             # k (paper)
    meta_per_group: int = 1          # 1 on iNat / Places-LT (paper; 2 on the GLT sets)
    # The grouping network's weights: None = the run's own backbone and `pretrained`; a
    # torchvision state-dict file of meta_group_arch (or "imagenet"); "pixels" = the released
    # code's KMeans on raw pixels, only when asked for.
    meta_group_weights: str | None = None
    meta_group_arch: str = "resnet50"   # the paper's grouping network, for meta_group_weights=FILE
    # M = 3,000 on CIFAR-LT (spec §3.7.1): 300 a class on CIFAR-10, 30 on CIFAR-100. The large
    # sets draw theirs per (class, group) instead, and restrict the virtual step.
    DATASET_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"knn_k": 40, "meta_per_class": 300}, "cifar100": {"knn_k": 80, "meta_per_class": 30},
        **{name: {"meta_per_class": 0, "meta_virtual_params": "last_block_fc"} for name in LARGE_DATASETS}}
    ACCEPTS = {"meta_per_class": integer(0, none=True), "meta_batch_size": integer(1), "meta_lr": positive(),
               "meta_weight_decay": number(0), "meta_interval": integer(1), "meta_hidden": integer(1),
               "meta_out": one_of(*META_OUTS), "meta_groups": integer(1), "meta_per_group": integer(1),
               "meta_virtual_params": Accepts("choice", choices=VIRTUAL_PARAMS, none=True),
               "meta_group_weights": Accepts("text", none=True), "meta_group_arch": one_of(*GROUPING_ARCHS)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.meta_virtual_params is None:
            self.meta_virtual_params = "all"
        self.meta_grouping()   # a large set without a grouping network is refused before anything starts

    def meta_grouping(self) -> meta_set.MetaGrouping | None:
        """Returns how the meta set is drawn on a large set (None on CIFAR, whose meta set is
        meta_per_class held out per class). ValueError, one line, when no grouping network is
        given."""
        if self.dataset not in LARGE_DATASETS:
            return None
        if self.meta_group_weights == "pixels":
            arch, weights = "pixels", None
        elif self.meta_group_weights is not None:
            arch, weights = self.meta_group_arch, self.meta_group_weights
        else:
            arch = self.backbone if self.backbone != "auto" else large_lt.SETS[self.dataset].backbone
            weights = self.pretrained
            if not weights:
                raise ValueError(
                    f"meta_group_weights=None with pretrained=None: cala_meta on {self.dataset} groups each class "
                    f"by KMeans on a pretrained ResNet's features; accepted: pretrained=FILE (the run's {arch}), "
                    f"meta_group_weights=FILE (a torchvision {self.meta_group_arch} state dict) or "
                    f"meta_group_weights=pixels (the released code's raw-pixel KMeans)")
        device = self.device
        if device == "auto":   # where the trial will train (engine.resolve_device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return meta_set.MetaGrouping(groups=self.meta_groups, per_group=self.meta_per_group, features=arch,
                                     weights=weights, view_size=self.image_size, device=device)


# -- the loss (both variants) ------------------------------------------------------------------
def cala_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float,
              log_prior: torch.Tensor, v: torch.Tensor, tau1: float, tau2: float) -> torch.Tensor:
    """Returns λ·CE(adj, y_a) + (1 − λ)·CE(adj, y_b) with adj = z + τ1·log p_tr + τ2·v (Eq. 5,
    under Mixup as in Alg. A-1).

    logits [B, C] raw; v [B, C], detached by the caller for the classifier update. With λ = 1
    and τ2 = 0 this is exactly logit-adjusted CE with τ = τ1.
    """
    adjusted = logits + tau2 * v
    loss = lam * losses.logit_adjusted_cross_entropy(adjusted, y_a, log_prior, tau1)
    if lam < 1:
        loss = loss + (1 - lam) * losses.logit_adjusted_cross_entropy(adjusted, y_b, log_prior, tau1)
    return loss


def nearest(query: torch.Tensor, keys: torch.Tensor, k: int, self_start: int | None = None) -> torch.Tensor:
    """Returns the indices [B, k'] of each query row's k nearest keys by cosine similarity,
    k' = min(k, available keys). query [B, D] and keys [N, D] are unit-norm rows.

    `self_start` says query row i is key row self_start + i, which is then left out.
    """
    sim = query @ keys.T
    available = keys.shape[0]
    if self_start is not None:
        rows = torch.arange(query.shape[0], device=sim.device)
        sim[rows, self_start + rows] = float("-inf")
        available -= 1
    return sim.topk(min(k, available), dim=1).indices


# -- Heuristic-CALA ----------------------------------------------------------------------------
def class_smoothed(p: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Returns α·p̄_{y_i} + (1 − α)·p_i per row [B, C] (Eq. A.11).

    p̄_c is the mean of p's rows over the mini-batch rows labelled c, divided by how many rows
    carry label c (the released code divides p_pr's sum by the bank's count, a bug).
    """
    onehot = F.one_hot(y, p.shape[1]).to(p.dtype)                   # [B, C]
    class_mean = (onehot.T @ p) / onehot.sum(0).clamp_min(1)[:, None]  # [C, C]
    return alpha * class_mean[y] + (1 - alpha) * p


def density_ratio(p_pr: torch.Tensor, p_mx: torch.Tensor, mode: str = "log", eps: float = 1e-6,
                  clip: float = 5.0) -> torch.Tensor:
    """Returns v [B, C] from the smoothed neighbourhood distributions p̃_pr, p̃_mx [B, C].

    "log": clip(log(p̃_pr + ε) − log(p̃_mx + ε), ±clip), Eq. 8. "l2_ratio": the released code's
    p̃_pr / (p̃_mx + 1e-12), L2-normalised per row (no log; values in [0, 1]).
    """
    if mode == "log":
        return (torch.log(p_pr + eps) - torch.log(p_mx + eps)).clamp(-clip, clip)
    if mode == "l2_ratio":
        return F.normalize(p_pr / (p_mx + 1e-12), p=2, dim=1)
    raise ValueError(f"v_mode={mode!r}; accepted: {', '.join(V_MODES)}")


class NeighbourBank:
    """FIFO bank of the last `window` training batches: unit penultimate features, softmax of the
    raw logits, and each row's own (Mixup) label distribution. Reset at every epoch start."""

    def __init__(self, window: int):
        self.window = window
        self.batches: collections.deque = collections.deque(maxlen=window)

    def reset(self) -> None:
        self.batches.clear()

    @property
    def full(self) -> bool:
        return len(self.batches) == self.window

    def push(self, h: torch.Tensor, q: torch.Tensor, y_soft: torch.Tensor) -> None:
        """Adds a batch: features h [B, D], predictions q [B, C], label distributions y_soft [B, C]."""
        self.batches.append((F.normalize(h.detach().float(), dim=1), q.detach().float(),
                             y_soft.detach().float()))

    def neighbourhood(self, k: int, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (p_pr, p_mx) [B, C] for the newest batch: the mean prediction and the mean label
        distribution over each row's K nearest bank rows (itself included unless excluded)."""
        keys, q, y_soft = (torch.cat(parts) for parts in zip(*self.batches))
        query = self.batches[-1][0]
        start = keys.shape[0] - query.shape[0]
        idx = nearest(query, keys, k, start if exclude_self else None)   # [B, k']
        return q[idx].mean(1), y_soft[idx].mean(1)


MIN_TRAIN_PER_CLASS = 2   # spec: no hold-out may leave a class (or cell) with fewer than 2 images


def check_counts(counts: list[int], cfg: CalaConfig) -> None:
    """Raises ValueError, one line, naming the first class with fewer than MIN_TRAIN_PER_CLASS
    training images after the validation and meta hold-outs."""
    for c, n in enumerate(counts):
        if n < MIN_TRAIN_PER_CLASS:
            raise ValueError(
                f"class {c} has {n} training image(s) after holding out val_per_class={cfg.val_per_class} "
                f"+ meta_per_class={cfg.meta_per_class} (imbalance_ratio={cfg.imbalance_ratio:g}, "
                f"n_max={cfg.n_max}); accepted: a split leaving every class >= {MIN_TRAIN_PER_CLASS} "
                f"training images (a larger n_max, a smaller imbalance_ratio or smaller hold-outs)")


class CalaMethod(Method):
    """What both variants share: ResNet-32, crop + flip, u(y) = log p_tr(y); raw logits at test."""

    augment_rule = augment.CROP_FLIP_RULE
    min_train_per_class = MIN_TRAIN_PER_CLASS
    large_scale = True   # CALA's Places-LT runs: ResNet-152 (cfg.pretrained for ImageNet weights)

    def __init__(self, cfg: CalaConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        if cfg.knn_k is None:   # only CIFAR has a data-set default (the paper gives none elsewhere)
            raise ValueError(f"knn_k=None with dataset={cfg.dataset}: the paper gives no K for it; accepted: "
                             f"an integer >= 1 (its grid: 10, 20, 40, 60, 80, 100)")
        check_counts(counts, cfg)
        self.log_prior = losses.log_prior(counts, device)              # u(y)

    def build_model(self) -> nn.Module:
        return self.backbone("resnet32")

    def train_transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # The CIFAR-LT recipe is crop + flip; Cutout is not applied (zero padding, not reflect).
        return augment.normalize(augment.crop_flip_cutout(x_uint8, gen, cutout=0))


class HeuristicMethod(CalaMethod):
    """Heuristic-CALA: in-batch Mixup, v from a neighbour bank each step, CALA loss."""

    config_cls = HeuristicConfig
    name = "cala"
    summary = ("Heuristic-CALA: class- and attribute-aware logit adjustment from a kNN density "
               "ratio, ResNet-32, energy score")

    def __init__(self, cfg: HeuristicConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        # Released-code rule: about bank_samples_per_class per class, plus the current batch.
        window = math.ceil(cfg.bank_samples_per_class * self.num_classes / cfg.batch_size) + 1
        self.bank = NeighbourBank(window)
        self.epoch = 0

    def begin_epoch(self, epoch: int, model: nn.Module) -> None:
        self.epoch = epoch
        self.bank.reset()

    def adjustment(self, h: torch.Tensor, q: torch.Tensor, y_soft: torch.Tensor,
                   y_a: torch.Tensor) -> torch.Tensor:
        """Pushes the batch into the bank and returns v [B, C] (no grad); 0 until the bank is full."""
        cfg = self.cfg
        with torch.no_grad():
            self.bank.push(h, q, y_soft)
            if not self.bank.full or self.epoch < cfg.v_start_epoch:
                return q.new_zeros(q.shape)   # a constant v leaves the loss unchanged
            p_pr, p_mx = self.bank.neighbourhood(cfg.knn_k, cfg.exclude_self)
            p_pr = class_smoothed(p_pr, y_a, cfg.smooth_alpha)
            p_mx = class_smoothed(p_mx, y_a, cfg.smooth_alpha)
            return density_ratio(p_pr, p_mx, cfg.v_mode, cfg.v_eps, cfg.v_clip)

    def loss(self, model: nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, c = self.cfg, self.num_classes
        x, y_a = batch.x, batch.y
        lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)) if cfg.mixup_alpha > 0 else 1.0
        y_b = y_a
        q_a = F.one_hot(y_a, c).float()
        y_soft = q_a
        if lam < 1:
            perm = torch.randperm(len(y_a), device=y_a.device, generator=self.step_generator(rng))
            y_b = y_a[perm]
            x, y_soft = augment.mixup(x, x[perm], q_a, q_a[perm], lam)
        logits, feats = model(x)
        z = logits[0]
        v = self.adjustment(feats[0], z.detach().softmax(1), y_soft, y_a)
        loss = cala_loss(z, y_a, y_b, lam, self.log_prior, v, cfg.tau1, cfg.tau2)
        clipped = (v.abs() >= cfg.v_clip).float().mean() if cfg.v_mode == "log" else v.new_zeros(())
        return loss, {"v_mean": v.mean(), "v_std": v.std(), "v_frac_clipped": clipped}


# -- Meta-CALA ---------------------------------------------------------------------------------
def characteristics(h: torch.Tensor, z: torch.Tensor, y: torch.Tensor, prev: torch.Tensor | None,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ζ [B, 42], the base ζ1..ζ21 [B, 21]) in Table A-1's order, without gradient.

    h [B, D] penultimate features, z [B, C] raw logits, y [B]; neighbours are the k nearest rows
    of the same mini-batch by cosine similarity, itself included (as the released code). prev
    [B, 21] holds each row's base characteristics at its previous visit (NaN = never seen, or
    None): ζ22..ζ42 are the changes since then, 0 on the first visit.
    """
    with torch.no_grad():
        h, z = h.detach().float(), z.detach().float()
        num_classes = z.shape[1]
        q = z.softmax(1)
        onehot = F.one_hot(y, num_classes).float()
        is_y = onehot.bool()
        loss = F.cross_entropy(z, y, reduction="none")                              # ζ1 ℓ
        logit_y = z.gather(1, y[:, None]).squeeze(1)                                 # ζ2 a_y
        grad_norm = (onehot - q).norm(dim=1)                                         # ζ3 g
        q_y = q.gather(1, y[:, None]).squeeze(1)                                     # ζ4 q_y
        entropy = -(q * q.clamp_min(1e-12).log()).sum(1)                             # ζ5
        margin = q_y - q.masked_fill(is_y, float("-inf")).max(1).values              # ζ6 γ
        base = torch.stack([loss, logit_y, grad_norm, q_y, entropy, margin], 1)     # [B, 6]
        unit = F.normalize(h, dim=1)
        idx = nearest(unit, unit, k)                                                 # [B, k']
        k_eff = idx.shape[1]
        hood = base[idx].mean(1)                                                     # ζ7..ζ12
        label_count = F.one_hot(y[idx], num_classes).float().sum(1)                  # [B, C]
        same = label_count.gather(1, y[:, None]).squeeze(1) / k_eff                  # ζ19
        other = label_count.masked_fill(is_y, -1.0).max(1).values / k_eff            # ζ20
        centre_cos = F.cosine_similarity(h, h[idx].mean(1), dim=1)                   # ζ21
        cur = torch.cat([base, hood, base - hood, same[:, None], other[:, None],
                         centre_cos[:, None]], 1)                                    # [B, 21]
        if prev is None:
            change = torch.zeros_like(cur)
        else:
            change = torch.where(torch.isnan(prev), torch.zeros_like(cur), cur - prev)  # ζ22..ζ42
        return torch.cat([cur, change], 1), cur


def virtual_step_names(names: list[str], which: str) -> list[str]:
    """Returns the parameter names the virtual step moves: all of them, or ("last_block_fc")
    those from the last residual block on (its `layerN.i.` block, then the classifier), in the
    model's order. ValueError, one line, for a model without residual blocks."""
    if which == "all":
        return names
    blocks = [re.match(r"(.*layer\d+\.\d+\.)", name) for name in names]
    last = [m.group(1) for m in blocks if m]
    if not last:
        raise ValueError(f"meta_virtual_params={which!r}: the model has no residual blocks (layerN.i); "
                         f"accepted: {', '.join(VIRTUAL_PARAMS[:1])} for this model")
    return names[next(i for i, name in enumerate(names) if name.startswith(last[-1])):]


class AdjustmentNet(nn.Module):
    """Ω: BN1d(42) → Linear → ReLU → Linear → ReLU → Linear(out) (spec §3.7.3).

    The last layer starts at zero, so training starts as plain logit adjustment. out = C gives
    δ ∈ R^C per sample (the paper); the released code's single sigmoid output broadcast to every
    logit is a per-row constant that softmax ignores, so it is not offered.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.BatchNorm1d(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(),
                                    nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, zeta: torch.Tensor) -> torch.Tensor:
        return self.layers(zeta)


class MetaMethod(CalaMethod):
    """Meta-CALA: v = δ(ζ; Ω) from the adjustment network, Ω meta-learned inside `loss`."""

    config_cls = MetaConfig
    name = "cala_meta"
    compilable = False   # the meta step differentiates through `functional_call` on the model
    summary = ("Meta-CALA: CALA's adjustment from a meta-learned network on a balanced meta set, "
               "ResNet-32, energy score")

    def __init__(self, cfg: MetaConfig, counts: list[int], device: torch.device):
        super().__init__(cfg, counts, device)
        out_dim = self.num_classes if cfg.meta_out == "per_class" else 1
        # Ω is drawn from its own seed so the backbone's initialisation matches other methods'.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.meta_net = AdjustmentNet(2 * NUM_BASE_CHARACTERISTICS, cfg.meta_hidden, out_dim).to(device)
        self.meta_opt = torch.optim.Adam(self.meta_net.parameters(), lr=cfg.meta_lr,
                                         weight_decay=cfg.meta_weight_decay)
        # Base characteristics at each training row's previous visit (= previous epoch).
        self.memory: torch.Tensor | None = None
        self.meta_x = self.meta_y = None
        self.epoch = self.iteration = 0
        self.last_meta_loss: torch.Tensor | None = None

    def begin_training(self, data: TrainData) -> None:
        if len(data.meta_y) == 0:
            raise ValueError(f"cala_meta needs a meta set; meta_per_class={self.cfg.meta_per_class}, "
                             f"accepted: an integer >= 1")
        self.meta_x, self.meta_y = data.meta_x, data.meta_y
        self.memory = torch.full((len(data.y), NUM_BASE_CHARACTERISTICS), float("nan"),
                                 device=self.device)

    def begin_epoch(self, epoch: int, model: nn.Module) -> None:
        self.epoch, self.iteration = epoch, 0

    def adjustment(self, zeta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Returns δ [B, C] = MLP_Ω(ζ), or s·onehot(y) in "gt_scalar" mode; differentiable in Ω."""
        # Batch statistics need two rows; a last batch of one falls back to the running ones.
        self.meta_net.train(zeta.shape[0] > 1)
        out = self.meta_net(zeta)
        if self.cfg.meta_out == "gt_scalar":
            return out * F.one_hot(y, self.num_classes).to(out.dtype)
        return out

    def meta_batch(self, rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns m meta images (augmented like training) and their labels, drawn without replacement."""
        m = min(self.cfg.meta_batch_size, len(self.meta_y))
        gen = self.step_generator(rng)
        idx = torch.randperm(len(self.meta_y), device=self.meta_y.device, generator=gen)[:m]
        return self.train_transform(self.meta_x[idx], gen), self.meta_y[idx]

    def meta_step(self, model: nn.Module, x: torch.Tensor, z: torch.Tensor, zeta: torch.Tensor,
                  y: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        """One Ω update (Eqs. A.12-A.13); returns the meta loss. z [B, C] = f_W(x) with its graph.

        Virtual step: Ŵ = W − η1·∇_W ℓ_CALA(z, y; δ(ζ; Ω)), plain SGD at the current lr (no
        momentum or weight decay), over the parameters cfg.meta_virtual_params names (the rest
        stay W); then Ω takes an Adam step on CE(f_Ŵ(x_meta), y_meta). The
        virtual passes use copies of the BN buffers, so only the real forward moves them.

        The whole step runs in fp32 whatever the trial's precision: a second-order gradient
        through bf16 activations loses most of its mantissa. Under autocast, z is recomputed in
        fp32 for it (one extra forward); without autocast the real forward's z is used as is.
        """
        cfg = self.cfg
        params = dict(model.named_parameters())
        virtual = virtual_step_names(list(params), cfg.meta_virtual_params)
        reduced = torch.is_autocast_enabled(x.device.type) or z.dtype != torch.float32
        with torch.autocast(x.device.type, enabled=False):
            if reduced:
                buffers = {name: b.clone() for name, b in model.named_buffers()}
                z = functional_call(model, {**params, **buffers}, (x.float(),))[0][0]
            inner = cala_loss(z, y, y, 1.0, self.log_prior, self.adjustment(zeta.float(), y),
                              cfg.tau1, cfg.tau2)
            grads = torch.autograd.grad(inner, [params[name] for name in virtual], create_graph=True,
                                        allow_unused=True)
            lr = cfg.lr_at(self.epoch)
            fast = dict(params)
            fast.update({name: params[name] if g is None else params[name] - lr * g
                         for name, g in zip(virtual, grads)})
            buffers = {name: b.clone() for name, b in model.named_buffers()}
            x_meta, y_meta = self.meta_batch(rng)
            logits_meta, _ = functional_call(model, {**fast, **buffers}, (x_meta,))
            meta_loss = F.cross_entropy(logits_meta[0], y_meta)              # Eq. A.13: plain CE, f_Ŵ
            self.meta_opt.zero_grad(set_to_none=True)
            meta_loss.backward(inputs=list(self.meta_net.parameters()))
        self.meta_opt.step()
        return meta_loss.detach()

    def loss(self, model: nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, y = self.cfg, batch.y
        # One forward serves the virtual and the real step: W does not move between them, so
        # ζ^(t+1) = ζ^(t) and only Ω differs (Alg. A-2 recomputes the same values).
        logits, feats = model(batch.x)
        z = logits[0]
        # Each training row is drawn once per epoch, so its previous visit is the previous epoch.
        seen = self.memory is not None and batch.index is not None
        prev = self.memory[batch.index] if seen else None
        zeta, current = characteristics(feats[0], z, y, prev, cfg.knn_k)
        self.iteration += 1
        if self.iteration % cfg.meta_interval == 0:
            self.last_meta_loss = self.meta_step(model, batch.x, z, zeta, y, rng)
        with torch.no_grad():
            delta = self.adjustment(zeta, y)                             # δ(ζ, Ω^(t+1)), Eq. A.14
        if seen:
            self.memory[batch.index] = current
        loss = cala_loss(z, y, y, 1.0, self.log_prior, delta, cfg.tau1, cfg.tau2)
        stats = {"delta_mean": delta.mean(), "delta_std": delta.std()}
        if self.last_meta_loss is not None:   # the latest meta loss, so the epoch mean is not diluted
            stats["meta_loss"] = self.last_meta_loss
        return loss, stats

    def state_dict(self) -> dict:
        return {"meta_net": self.meta_net.state_dict(), "meta_opt": self.meta_opt.state_dict(),
                "memory": self.memory}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.meta_net.load_state_dict(state["meta_net"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.memory = state["memory"].to(self.device) if state["memory"] is not None else None


if __name__ == "__main__":
    from trainables.engine import main

    main(HeuristicMethod)
