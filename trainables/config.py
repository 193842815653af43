"""The settings every method shares: data build, training schedule, evaluation.

A method's config subclasses `TrainConfig` and adds its own fields, with defaults equal to its
paper's. Configs travel through Ray Tune and MLflow as flat dicts of plain values.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tailtune")
# Offline test-OOD sets (see trainables.data); online-only ones are tried and skipped if absent.
DEFAULT_TEST_OOD = ("cifar100", "tin", "textures", "svhn", "mnist", "fashion_mnist")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Validation OOD is synthetic only: the search never sees a test OOD set (DARL spec §4.2).
DEFAULT_VAL_OOD = ("gaussian", "rademacher", "blobs")
# A paper reproduction trains in fp32 (`precision`), not the "auto" choice (bf16 autocast on
# CUDA): no side-by-side run has yet shown bf16 to change the papers' numbers by no more than
# seed noise. A search may keep "auto".
REPRODUCTION_PRECISION = "fp32"


# The scores of trainables.scores, by name (kept here so a config is checked without torch): on
# the logits, then the feature-based detectors (trainables.detectors).
OOD_SCORES = ("msp", "energy", "max_logit", "odin", "knn", "mahalanobis", "mahalanobis_pp", "react")


@dataclass(frozen=True)
class Accepts:
    """What a config field accepts: a number or integer in [low, high] (either bound may be open
    or absent), one of `choices`, any text, or a list of names / of fractions in [0, 1]; `none`
    lets None through (a field whose None means "derive it")."""
    kind: str                            # "number" | "integer" | "choice" | "text" | "names" | "fractions"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    none: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.kind == "choice":   # 1 is not True here
            return (type(value), value) in {(type(c), c) for c in self.choices}
        if self.kind == "text":
            return isinstance(value, str)
        if self.kind == "names":
            return isinstance(value, (tuple, list)) and all(isinstance(v, str) and v for v in value)
        if self.kind == "fractions":
            return isinstance(value, (tuple, list)) and all(
                _is_number(v) and math.isfinite(v) and 0 <= v <= 1 for v in value)
        if not _is_number(value) or (self.kind == "integer" and not isinstance(value, int)):
            return False
        if not math.isfinite(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        if self.kind == "choice":
            text = ", ".join(map(str, self.choices))
        elif self.kind == "text":
            text = "a string"
        elif self.kind == "names":
            text = "a list of names"
        elif self.kind == "fractions":
            text = "a list of numbers in [0, 1]"
        else:
            noun = "an integer" if self.kind == "integer" else "a number"
            if self.low is not None and self.high is not None:
                text = (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, "
                        f"{self.high:g}{')' if self.high_open else ']'}")
            elif self.low is not None:
                text = f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text = f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
            else:
                text = f"a finite {noun.split()[1]}"
        return f"{text} or null" if self.none else text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, none: bool = False) -> Accepts:
    return Accepts("number", low, high, low_open, high_open, none=none)


def positive(none: bool = False) -> Accepts:
    return Accepts("number", 0, None, low_open=True, none=none)


def integer(low: int | None = None, high: int | None = None, *, none: bool = False) -> Accepts:
    return Accepts("integer", low, high, none=none)


def one_of(*choices: Any) -> Accepts:
    return Accepts("choice", choices=choices)


FLAG = one_of(True, False)
TEXT = Accepts("text")


LARGE_DATASETS = ("imagenet-lt", "places-lt")   # trainables.large_lt
# Each large set's default test-OOD sets (trainables.large_lt.SETS repeats them, with torch).
LARGE_TEST_OOD = {"imagenet-lt": ("imagenet_1k_ood",), "places-lt": ("places_lt_open",)}
BACKBONES = ("auto", "resnet18", "resnet50", "resnet152")


def default_test_ood(dataset: str) -> tuple[str, ...]:
    """Returns the default test OOD sets for an ID set: the other CIFAR stands in for near-OOD;
    the large sets take their benchmark's OOD set."""
    if dataset in LARGE_TEST_OOD:
        return LARGE_TEST_OOD[dataset]
    if dataset == "cifar100":
        return tuple("cifar10" if name == "cifar100" else name for name in DEFAULT_TEST_OOD)
    return DEFAULT_TEST_OOD


def fill_dataset_defaults(cfg: Any, defaults: dict[str, tuple[Any, Any]]) -> None:
    """Sets each field of `cfg` that is None to its paper default for cfg.dataset. `defaults`
    maps a field to (CIFAR value, large-scale value); the large-scale value may be a dict by
    dataset. A method's config calls this in __post_init__, so the logged config holds the values
    used (and a CIFAR config the same ones as before the large sets had their own)."""
    for name, (cifar, large) in defaults.items():
        if getattr(cfg, name) is None:
            if cfg.dataset in LARGE_DATASETS:
                setattr(cfg, name, large[cfg.dataset] if isinstance(large, dict) else large)
            else:
                setattr(cfg, name, cifar)


@dataclass
class TrainConfig:
    # Data build (trainables.data.DatasetSpec).
    dataset: str = "cifar10"
    imbalance_ratio: float = 100.0
    val_per_class: int = 50
    # "holdout": validation held out before the LT build (searches); "unused": the papers' exact
    # build, validation from the training images it leaves unused (reproductions; data.VAL_SOURCES).
    val_source: str = "holdout"
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
    # The large-set recipe applied (trainables.recipes; set by search/run.py and reproduce.py):
    # its name, source and what differs from the paper, logged with the run. None: no recipe.
    recipe: str | None = None
    # Evaluation protocol (trainables.protocols): "offline" = test_ood as given, missing sets
    # skipped; a paper protocol fixes its own sets, cap, resize rule and headline FPR95.
    protocol: str = "offline"
    allow_missing_ood: bool = False     # under a paper protocol: run without missing sets
    meta_per_class: int = 0             # balanced meta set held out after validation (Meta-CALA)
    # Large-scale sets only (imagenet-lt, places-lt; trainables.large_lt): images are cached at
    # image_store_side (shorter side, centre square) and viewed at image_size on the device.
    image_store_side: int = 256
    image_size: int = 224               # RandomResizedCrop size in training; centre crop at test
    crop_min_scale: float = 0.08        # RandomResizedCrop's lower area bound
    # Network: "auto" = the method's own on CIFAR, the papers' on the large sets (ResNet-50 on
    # ImageNet-LT, ResNet-152 on Places-LT); or a torchvision ResNet by name.
    backbone: str = "auto"
    pretrained: str | None = None       # torchvision backbones: a state-dict file, or "imagenet"
    # Image sets beyond this many GiB stay in (pinned) host memory and stream in per batch;
    # None keeps every set resident on the device (a memory-mapped outlier cache larger than the
    # device's free memory streams from disk regardless).
    device_image_budget_gb: float | None = None
    # Streamed sets: gather (and copy) the next step's rows while the current step runs. Same
    # numbers either way; off gathers each batch when it is drawn.
    prefetch_streamed: bool = True
    # Auxiliary outliers, for the methods that train with them (trainables.data.load_outliers):
    # auto | 300k | tin_aux | gaussian | a real OOD set name; on imagenet-lt / places-lt
    # (trainables.large_lt.load_outliers): auto | imagenet_extra | places_extra69 | gaussian |
    # a large-benchmark OOD set
    outlier_set: str = "auto"
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
    ood_energy_temperature: float = 1.0   # T of the energy score and of ReAct's energy
    ood_knn_k: int = 50                   # k of the kNN score (Sun et al. 2022: 50 on CIFAR-10)
    ood_react_percentile: float = 90.0    # ReAct's clip: this percentile of training activations
    # After the last epoch, tune the score's parameters on validation ID vs validation OOD (never a
    # test set) and test with the best (trainables.posthoc). Off: each paper's fixed values.
    posthoc_sweep: bool = False
    eval_batch_size: int = 500
    eval_every: int = 1                 # validate (and report) every N epochs, and at the last
    checkpoint_every: int = 1           # in reported epochs

    # What each field accepts, checked when a config is built (`validate`). A subclass declares
    # its own fields (and any field whose range it narrows) in its own ACCEPTS; every field of
    # every config must be declared (tests/test_bad_input.py checks it).
    ACCEPTS: ClassVar[dict[str, Accepts]] = {
        "dataset": one_of("cifar10", "cifar100", *LARGE_DATASETS), "imbalance_ratio": number(1),
        "image_store_side": integer(8, 1024), "image_size": integer(8, 1024),
        "crop_min_scale": number(0, 1, low_open=True), "backbone": one_of(*BACKBONES),
        "pretrained": Accepts("text", none=True), "device_image_budget_gb": number(0, none=True),
        "prefetch_streamed": FLAG,
        "val_per_class": integer(0), "val_source": one_of("holdout", "unused"), "n_max": integer(1, none=True),
        "test_per_class": integer(1, none=True), "split_seed": integer(0),
        "data_dir": Accepts("text", none=True), "cache_dir": TEXT, "download": FLAG,
        "val_ood": Accepts("names"), "val_ood_size": integer(1), "test_ood": Accepts("names"),
        "ood_max_images": integer(1, none=True), "meta_per_class": integer(0), "outlier_set": TEXT,
        "outlier_batch_size": integer(1, none=True), "outlier_max_images": integer(1, none=True),
        "epochs": integer(1), "optimizer": one_of("sgd", "adam"), "lr_schedule": one_of("step", "cosine"),
        "batch_size": integer(1), "lr": positive(), "momentum": number(0, 1, high_open=True),
        "nesterov": FLAG, "weight_decay": number(0), "warmup_epochs": integer(0),
        "warmup_method": one_of("constant", "linear", "ldam"), "lr_milestones": Accepts("fractions"),
        "seed": integer(0), "device": TEXT, "precision": one_of("auto", "fp32", "bf16"),
        "channels_last": one_of("auto", True, False), "fused_optimizer": one_of("auto", True, False),
        "compile": one_of(*COMPILE_MODES), "ood_score": one_of(*OOD_SCORES),
        "odin_temperature": positive(), "odin_eps": number(0), "eval_batch_size": integer(1),
        "eval_every": integer(1), "checkpoint_every": integer(1),
        "ood_energy_temperature": positive(), "ood_knn_k": integer(1),
        "ood_react_percentile": number(0, 100, low_open=True), "posthoc_sweep": FLAG,
        # The protocol's name is checked against trainables.protocols where its sets are loaded.
        "protocol": TEXT, "allow_missing_ood": FLAG, "recipe": Accepts("text", none=True)}

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
        self.validate()
        if self.dataset in LARGE_DATASETS and self.image_size > self.image_store_side:
            raise ValueError(f"image_size={self.image_size} with image_store_side={self.image_store_side}; "
                             f"accepted: image_size <= image_store_side")

    @classmethod
    def accepted(cls) -> dict[str, Accepts]:
        """Returns every field's accepted values: the class's ACCEPTS over its bases'."""
        merged: dict[str, Accepts] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("ACCEPTS", {}))
        return merged

    def validate(self) -> None:
        """Raises ValueError, one line naming the field, its value and what it accepts, for the
        first field outside its declared range."""
        accepted = self.accepted()
        for f in dataclasses.fields(self):
            rule = accepted.get(f.name)
            if rule is None:
                raise TypeError(f"{type(self).__name__}.{f.name} declares no accepted values (ACCEPTS)")
            value = getattr(self, f.name)
            if not rule.accepts(value):
                raise ValueError(f"{f.name}={value!r}; accepted: {rule.describe()}")

    def speed(self, device_type: str) -> dict[str, Any]:
        """Returns the speed settings resolved for a device type ("cuda", "cpu"): "auto" is on
        for CUDA only."""
        on = device_type == "cuda"
        auto = lambda v: on if v == "auto" else v   # noqa: E731
        return {"precision": ("bf16" if on else "fp32") if self.precision == "auto" else self.precision,
                "channels_last": auto(self.channels_last), "fused_optimizer": auto(self.fused_optimizer),
                "compile": self.compile}

    def meta_grouping(self):
        """Returns how a large set's meta set is drawn (trainables.meta_set.MetaGrouping), or
        None: no method but Meta-CALA draws one there."""
        return None

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

