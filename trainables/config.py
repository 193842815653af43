"""The settings every method shares: data build, training schedule, evaluation.

A method's config subclasses `TrainConfig` and adds its own fields, with defaults equal to its
paper's. Configs travel through Ray Tune and MLflow as flat dicts of plain values.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tailtune")
# Offline test-OOD sets (see trainables.data); online-only ones are tried and skipped if absent.
DEFAULT_TEST_OOD = ("cifar100", "tin", "textures", "svhn", "mnist", "fashion_mnist")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Validation OOD is synthetic only: the search never sees a test OOD set (DARL spec §4.2).
DEFAULT_VAL_OOD = ("gaussian", "rademacher", "blobs")


def default_test_ood(dataset: str) -> tuple[str, ...]:
    """Returns the default test OOD sets for an ID set: the other CIFAR stands in for near-OOD."""
    if dataset == "cifar100":
        return tuple("cifar10" if name == "cifar100" else name for name in DEFAULT_TEST_OOD)
    return DEFAULT_TEST_OOD


@dataclass
class TrainConfig:
    # Data build (trainables.data.DatasetSpec).
    dataset: str = "cifar10"
    imbalance_ratio: float = 100.0
    val_per_class: int = 50
    n_max: int | None = None
    test_per_class: int | None = None
    split_seed: int = 0
    data_dir: str | None = None
    cache_dir: str = DEFAULT_CACHE_DIR
    download: bool = True
    val_ood: tuple[str, ...] = DEFAULT_VAL_OOD
    val_ood_size: int = 1000            # images per synthetic validation set
    test_ood: tuple[str, ...] = DEFAULT_TEST_OOD
    ood_max_images: int | None = None   # cap per test OOD set (seeded subset); None = all
    # Evaluation protocol (trainables.protocols): "offline" = test_ood as given, missing sets
    # skipped; a paper protocol fixes its own sets, cap, resize rule and headline FPR95.
    protocol: str = "offline"
    allow_missing_ood: bool = False     # under a paper protocol: run without missing sets
    meta_per_class: int = 0             # balanced meta set held out after validation (Meta-CALA)
    # Auxiliary outliers, for the methods that train with them (trainables.data.load_outliers).
    outlier_set: str = "auto"           # auto | 300k | tin_aux | gaussian | a real OOD set name
    outlier_batch_size: int | None = None   # outliers per step; None = batch_size (1:1)
    outlier_max_images: int | None = None   # seeded subset of the outlier set; None = all
    # Optimisation (LGLA / DARL CIFAR recipe).
    epochs: int = 400
    optimizer: str = "sgd"              # "sgd" | "adam"
    lr_schedule: str = "step"           # "step": ×0.1 at each milestone | "cosine" (per epoch)
    batch_size: int = 128               # per stream
    lr: float = 0.1                     # η
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 2e-4
    warmup_epochs: int = 5
    # "constant": ×0.1 (DARL, literal); "linear": LGLA's ramp 1/3 -> 1; "ldam": LDAM-DRW's lr·(e+1)/W
    warmup_method: str = "constant"
    lr_milestones: tuple[float, ...] = (0.8, 0.9)   # fractions of `epochs`: 320, 360 of 400
    seed: int = 123                     # training seed (LGLA)
    device: str = "auto"
    # Speed (logged with every trial). "auto" turns each on for CUDA and off elsewhere. bf16
    # autocasts the training forward and loss; channels_last is the layout convolutions like best
    # on GPUs; fused runs the optimiser step as one kernel; compile wraps the training forward in
    # torch.compile ("reduce-overhead" adds CUDA graphs), off unless asked for.
    precision: str = "auto"             # "auto" | "fp32" | "bf16"
    channels_last: bool | str = "auto"  # "auto" | true | false
    fused_optimizer: bool | str = "auto"
    compile: str = "none"               # "none" | "default" | "reduce-overhead" | "max-autotune"
    # Evaluation.
    ood_score: str = "odin"
    odin_temperature: float = 1000.0
    odin_eps: float = 0.0014
    eval_batch_size: int = 500
    eval_every: int = 1                 # validate (and report) every N epochs, and at the last
    checkpoint_every: int = 1           # in reported epochs

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Returns a config from a flat dict; unknown keys raise ValueError naming them."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown config keys {unknown} for {cls.__name__}; valid: {sorted(names)}")
        cast = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**cast)

    def __post_init__(self) -> None:
        for name, value, accepted in (("optimizer", self.optimizer, ("sgd", "adam")),
                                      ("lr_schedule", self.lr_schedule, ("step", "cosine")),
                                      ("warmup_method", self.warmup_method, ("constant", "linear", "ldam")),
                                      ("precision", self.precision, ("auto", "fp32", "bf16")),
                                      ("channels_last", self.channels_last, ("auto", True, False)),
                                      ("fused_optimizer", self.fused_optimizer, ("auto", True, False)),
                                      ("compile", self.compile, COMPILE_MODES)):
            if (type(value), value) not in {(type(a), a) for a in accepted}:   # 1 is not True here
                raise ValueError(f"{name}={value!r}; accepted: {', '.join(map(str, accepted))}")
        for name in ("eval_every", "checkpoint_every", "batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected an integer >= 1")

    def speed(self, device_type: str) -> dict[str, Any]:
        """Returns the speed settings resolved for a device type ("cuda", "cpu"): "auto" is on
        for CUDA only."""
        on = device_type == "cuda"
        auto = lambda v: on if v == "auto" else v   # noqa: E731
        return {"precision": ("bf16" if on else "fp32") if self.precision == "auto" else self.precision,
                "channels_last": auto(self.channels_last), "fused_optimizer": auto(self.fused_optimizer),
                "compile": self.compile}

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a flat dict of plain values."""
        return dataclasses.asdict(self)

    def lr_at(self, epoch: int) -> float:
        """Returns the learning rate for 0-based `epoch`: warm-up, then ×0.1 at each milestone
        ("step") or cosine annealing to 0 over the remaining epochs ("cosine", stepped per epoch
        like CosineAnnealingLR(T_max=epochs - warmup_epochs))."""
        if epoch < self.warmup_epochs:
            if self.warmup_method == "linear":   # LGLA: factor ramps from 1/3 to 1
                return self.lr * (1 / 3 + (2 / 3) * epoch / self.warmup_epochs)
            if self.warmup_method == "ldam":     # LDAM-DRW / Open-sampling / CALA: 0.02, ..., 0.1
                return self.lr * (epoch + 1) / self.warmup_epochs
            return self.lr * 0.1
        if self.lr_schedule == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))
        steps = sum(epoch >= round(m * self.epochs) for m in self.lr_milestones)
        return self.lr * 0.1 ** steps

