"""The base every method file subclasses: the defaults a method overrides only where it differs.

A method supplies its config class, its model, its batch composition and loss, and (if it has
one) its own test-time score. The engine (`trainables.engine`) owns the epoch loop, the streams,
schedules, evaluation, reporting and checkpoints, and calls only what is defined here.

Model contract: `model(x)` returns `(logits [K, B, C], feats [K, B, D])`; K = 1 for a
single-head network, K experts for LGLA's mixture. Inputs are what `train_transform` /
`eval_transform` return (normalised float images by default).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from trainables import augment, detectors, large_lt, models, scores
from trainables.config import TrainConfig


@dataclass
class Batch:
    """One training step's inputs, already transformed.

    x, y: the long-tailed stream (`index` = the rows' positions in the training set, `out_index`
    the outliers' positions in the outlier set);
    x_bal, y_bal: the class-balanced stream, if the method asks for it;
    x_out: a batch of auxiliary outliers (no labels), if the method asks for them.
    """
    x: torch.Tensor
    y: torch.Tensor
    x_bal: torch.Tensor | None = None
    y_bal: torch.Tensor | None = None
    x_out: torch.Tensor | None = None
    index: torch.Tensor | None = None
    out_index: torch.Tensor | None = None   # the outlier rows' positions in the outlier set


@dataclass
class TrainData:
    """The training tensors on the device, handed to `Method.begin_training` once per trial.

    x: uint8 [N, 3, H, W]; y: int64 [N]; meta_x / meta_y: the balanced held-out meta set
    (empty unless the config asks for one, e.g. Meta-CALA).
    """
    x: torch.Tensor
    y: torch.Tensor
    meta_x: torch.Tensor
    meta_y: torch.Tensor


class Method(abc.ABC):
    """Defaults: SGD from the config, crop/flip/cutout + CIFAR normalisation, mean-of-experts
    logits at test time, and `cfg.ood_score` on those logits (msp, energy, max_logit, odin) or on
    the penultimate features (knn, mahalanobis, mahalanobis_pp, react; `fit_detector` first)."""

    config_cls = TrainConfig
    name = "base"
    summary = ""                   # one line for `search/run.py --list`
    uses_balanced_stream = False   # engine draws a class-balanced batch as batch.x_bal / y_bal
    # Engine loads cfg.outlier_set and draws cfg.outlier_batch_size of them as batch.x_out. A class
    # attribute: the data is prepared before the method is built.
    uses_outliers = False
    # How images reach the network; logged with every trial (a method that changes them says so).
    augment_rule = augment.AUGMENT_RULE
    input_rule = f"mean {augment.CIFAR_MEAN} std {augment.CIFAR_STD} (CIFAR-10, all sets)"
    compilable = True              # the engine may torch.compile the model passed to `loss`
    # Runs on ImageNet-LT / Places-LT: the method builds its network with `backbone`, and the
    # dataset's views (trainables.large_lt.View) replace its CIFAR transforms there.
    large_scale = False
    # The fewest training images a class may keep (a method whose losses need pairs raises it);
    # the smoke preset's n_max grows to keep its tail class at this many.
    min_train_per_class = 1
    odin_std = augment.CIFAR_STD   # ODIN's step is in pixel units, divided by the input std
    # Training statistics of a feature-based cfg.ood_score (trainables.detectors), set by
    # `fit_detector`; a checkpoint carries them, so a loaded champion scores without refitting.
    detector: dict[str, torch.Tensor] | None = None

    def __init__(self, cfg: TrainConfig, counts: list[int], device: torch.device):
        self.cfg, self.counts, self.device = cfg, list(counts), device
        self.num_classes = len(counts)
        if large_lt.is_large(cfg.dataset):
            if not self.large_scale:
                raise ValueError(f"method {self.name} has no large-scale setup (its network and views are "
                                 f"CIFAR's), so dataset={cfg.dataset!r} is not accepted; accepted: cifar10, cifar100")
            # A large set's input pipeline is the dataset's: the methods' CIFAR augmentations
            # (crop with padding, cutout) do not apply to 224-px images.
            view = large_lt.View(cfg.image_size, cfg.crop_min_scale)
            self.train_transform, self.eval_transform = view.train, view.eval
            self.augment_rule, self.input_rule = view.rules()
            self.odin_std = large_lt.IMAGENET_STD

    def backbone_name(self) -> str | None:
        """Returns the torchvision backbone in use (cfg.backbone, or on a large set its papers'),
        or None for the method's own CIFAR network."""
        if self.cfg.backbone != "auto":
            return self.cfg.backbone
        return large_lt.SETS[self.cfg.dataset].backbone if large_lt.is_large(self.cfg.dataset) else None

    def backbone(self, cifar_model: str, num_outputs: int | None = None, **cifar_kwargs) -> torch.nn.Module:
        """Returns the method's CIFAR network `cifar_model`, or the torchvision ResNet of
        `backbone_name` (with cfg.pretrained) where one is in use, with `num_outputs` classifier
        outputs (the number of classes unless given, e.g. C + 1 with an outlier class)."""
        name, outputs = self.backbone_name(), num_outputs or self.num_classes
        if name is None:
            return models.create(cifar_model, outputs, **cifar_kwargs)
        return models.create(name, outputs, pretrained=self.cfg.pretrained)

    # -- model and optimiser ---------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """Returns the network (see the model contract above)."""

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Returns the optimiser named by cfg.optimizer ("sgd" or "adam") over the model, at cfg.lr."""
        return self.make_optimizer(model.parameters())

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """Returns cfg.optimizer over `params` (tensors or param groups); one fused kernel per
        step where cfg.fused_optimizer resolves on (CUDA by default)."""
        cfg = self.cfg
        fused = True if cfg.speed(torch.device(self.device).type)["fused_optimizer"] else None
        if cfg.optimizer == "adam":   # L2 added to the gradient (Adam's weight_decay, not AdamW)
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused)

    def step_generator(self, rng: np.random.RandomState) -> torch.Generator:
        """Returns a generator on the method's device seeded from the engine's per-epoch `rng`:
        a draw made with it happens on the device (no host-to-device copy in the step) and a
        resumed trial repeats it."""
        return torch.Generator(device=self.device).manual_seed(int(rng.randint(2**31 - 1)))

    # -- inputs ----------------------------------------------------------------------------
    def train_transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Returns the augmented, normalised training batch for uint8 images [B, 3, H, W]."""
        return augment.normalize(augment.crop_flip_cutout(x_uint8, gen))

    def eval_transform(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Returns the network input for uint8 test images [B, 3, H, W]."""
        return augment.normalize(x_uint8)

    # -- training --------------------------------------------------------------------------
    def begin_training(self, data: TrainData) -> None:
        """Called once per trial, before the first epoch (not when a champion is loaded)."""

    def begin_epoch(self, epoch: int, model: torch.nn.Module) -> None:
        """Called before every epoch with its 0-based index."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch,
             rng: np.random.RandomState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (scalar loss, per-step stats as 0-d tensors; the engine averages them)."""

    # -- test time -------------------------------------------------------------------------
    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns the test-time class logits [B, C]: the mean over experts, no adjustment."""
        return model(x)[0].mean(0)

    def features(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns the penultimate features [K, B, d] (per expert; the detectors concatenate them)."""
        return model(x)[1]

    def classify(self, model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """Returns the test-time logits [B, C] of features [K, B, d]: each expert's classifier on its
        own features, averaged (`logits` on the same images, when the features are not altered)."""
        heads = classifier_heads(model)
        return torch.stack([head(f) for head, f in zip(heads, feats)]).mean(0)

    def score_params(self) -> dict:
        """Returns the parameters of cfg.ood_score, read from the config (the post-hoc sweep
        replaces the config with the values it chose)."""
        cfg = self.cfg
        return {"odin": {"temperature": cfg.odin_temperature, "eps": cfg.odin_eps, "std": self.odin_std},
                "energy": {"temperature": cfg.ood_energy_temperature},
                "knn": {"k": cfg.ood_knn_k},
                "react": {"percentile": cfg.ood_react_percentile, "temperature": cfg.ood_energy_temperature},
                }.get(cfg.ood_score, {})

    def confidence(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Returns the test-time OOD confidence [B] (higher = more in-distribution)."""
        name = self.cfg.ood_score
        if name in detectors.NAMES:
            if self.detector is None:
                raise RuntimeError(f"ood_score={name!r} scores against training statistics; call "
                                   f"fit_detector after training, before scoring")
            with torch.no_grad():
                return detectors.confidence(name, self.detector, self.features(model, x),
                                            partial(self.classify, model), **self.score_params())
        return scores.confidence(name, partial(self.logits, model), x, **self.score_params())

    def embed(self, model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Returns the eval-mode penultimate features [K, N, d] of uint8 images [N, 3, H, W]."""
        model.eval()
        with torch.no_grad():
            return torch.cat([self.features(model, self.eval_transform(images[i:i + batch_size]))
                              for i in range(0, len(images), batch_size)], dim=1)

    def fit_detector(self, model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                     batch_size: int) -> None:
        """Fits cfg.ood_score's statistics on the ID training images (uint8, eval transform), if
        it is a feature-based score; clears them otherwise."""
        name = self.cfg.ood_score
        self.detector = None
        if name in detectors.NAMES:
            self.detector = detectors.fit(name, self.embed(model, train_x, batch_size), train_y,
                                          self.num_classes, **self.score_params())

    # -- extra state (beyond model and optimiser) ------------------------------------------
    def state_dict(self) -> dict:
        """Returns method state a checkpoint must carry (e.g. a meta-network); {} by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict` returned."""


def classifier_heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Returns the model's classifier per expert: `classifiers` (LGLA) or `classifier`, on the
    model or on its `backbone` (a model that wraps one, like PASCL's)."""
    for m in (model, getattr(model, "backbone", None)):
        if hasattr(m, "classifiers"):
            return list(m.classifiers)
        if hasattr(m, "classifier"):
            return [m.classifier]
    raise ValueError(f"ood_score=react recomputes logits from clipped features, but "
                     f"{type(model).__name__} exposes no `classifier` or `classifiers`")
