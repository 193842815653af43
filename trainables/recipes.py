"""The papers' training recipes on the large sets (ImageNet-LT, Places-LT), as data.

Each recipe holds the config fields a method's paper (or the spec that fills in for it) trains
with on one large set: schedule, batch, optimiser, augmentation size, network, outlier batch.
`search/run.py --preset small|paper` applies it on that set under the preset's own overrides, and
`search/reproduce.py` trains the paper point with it. Only fields the method's config has appear
in `values` (tests/test_presets_large.py builds every recipe into its config); what the paper
does that we do not implement is said in `note`, which the runs log with the recipe's name and
source (the `recipe` param). A recipe with `needs_pretrained` fine-tunes an ImageNet-pretrained
network: the weights are the user's to give (`--set pretrained=FILE`, or `imagenet` to download
torchvision's).

Methods and sets without an entry have no large-scale recipe in the specs: DARL and RICASSO
report nothing on Places-LT (the LGLA config they build on is used for both), Energy-OE's
ImageNet-LT row fine-tunes a CE model (not implemented), LA's large-set numbers come from
papers that do not give a schedule, and RNA, PASCL, COCL and EAT never ran Places-LT.
"""
from __future__ import annotations

from dataclasses import dataclass

# LGLA's own configs, which DARL and RICASSO build on (both specs cite them for ImageNet-LT).
_LGLA_IMAGENET = ("LGLA's ImageNet-LT config, as darl.md §5 and §8 item 20 and ricasso.md §4 give it "
                  "(config_imagenet_lt_resnet50_lgla.json: CosineAnnealingLR T_max 180 from epoch 0, "
                  "no warm-up)")
_LGLA_IMAGENET_NOTE = ("not as LGLA: ColorJitter(0.4, 0.4, 0.4) and RandAugment rand-n2-m10-mstd0.5 are not "
                       "applied (the large sets' view is RandomResizedCrop + flip); LGLA splits the batch over "
                       "2 GPUs, here one device takes 64 per stream")
_LGLA_PLACES = ("LGLA's Places-LT config (config_places_lt_resnet152_lgla.json: ImageNet-pretrained 3-expert "
                "ResNet-152, SGD 0.01 Nesterov, wd 4e-4, batch 128, x0.1 at epochs 10 and 20 of 30, no "
                "warm-up, tau_G 2.4); the specs give only its tau_G (ricasso.md §4)")
_LGLA_PLACES_NOTE = ("not as LGLA: no ColorJitter; LGLA splits the batch over 4 GPUs; LGLA copies one "
                     "ResNet-152's layer3/layer4 into every expert, ours loads the state dict given")
_RNA_IMAGENET = "RNA's ImageNet-LT setting, rna.md §4.1-4.2 (code: train.py with --dataset imagenet)"
_RNA_IMAGENET_NOTE = ("not as RNA: ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 and RandomGrayscale(0.2) are not "
                      "applied; RNA splits the 256 + 256 batch over 7 GPUs (DDP)")


@dataclass(frozen=True)
class Recipe:
    method: str                 # registry name
    dataset: str                # imagenet-lt | places-lt
    values: dict[str, object]   # config field -> the paper's value
    source: str                 # spec section / paper table / baseline config it comes from
    note: str = ""              # what of the paper's setting is not implemented here
    needs_pretrained: bool = False   # fine-tunes ImageNet weights: `pretrained` must be given

    @property
    def name(self) -> str:
        return f"{self.method}/{self.dataset}"

    def describe(self) -> str:
        """Returns one line: the recipe's name, source and note (the `recipe` param's value)."""
        return f"{self.name}: {self.source}" + (f"; {self.note}" if self.note else "")


def _lgla_tau(method: str, tau_gla: float) -> dict[str, float]:
    """Returns LGLA's τ_G for the set; RICASSO writes one τ for Eqs. 1 and 6, so its energy
    temperature (searched, paper point = τ_G) takes the same value. DARL's τ is its own (8)."""
    return {"tau_gla": tau_gla, **({"tau_energy": tau_gla} if method == "ricasso" else {})}


def _lgla_imagenet(method: str) -> Recipe:
    return Recipe(method, "imagenet-lt", {
        "epochs": 180, "batch_size": 64, "optimizer": "sgd", "lr": 0.025, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "lr_schedule": "cosine", "warmup_epochs": 0, "image_size": 224,
        "crop_min_scale": 0.08, "backbone": "resnet50", **_lgla_tau(method, 2.8)}, _LGLA_IMAGENET,
        _LGLA_IMAGENET_NOTE)


def _lgla_places(method: str) -> Recipe:
    return Recipe(method, "places-lt", {
        "epochs": 30, "batch_size": 128, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True,
        "weight_decay": 4e-4, "lr_schedule": "step", "lr_milestones": (1 / 3, 2 / 3), "warmup_epochs": 0,
        "image_size": 224, "crop_min_scale": 0.08, "backbone": "resnet152", **_lgla_tau(method, 2.4)},
        _LGLA_PLACES, _LGLA_PLACES_NOTE, needs_pretrained=True)


def _cala_places(method: str, note_extra: str = "") -> Recipe:
    """Returns CALA's Places-LT recipe for `method` (Heuristic or Meta-CALA: the same network and
    schedule), its note extended by `note_extra`."""
    return Recipe(method, "places-lt", {
        "epochs": 30, "batch_size": 256, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False,
        "weight_decay": 5e-4, "lr_schedule": "cosine", "warmup_epochs": 0, "image_size": 224,
        "crop_min_scale": 0.08, "backbone": "resnet152"},
        "cala.md §5.1 Places-LT: ImageNet-pretrained ResNet-152, cosine schedule after Kang et al. (2020), "
        "batch 256, wd 5e-4; the spec gives no epochs or lr: 30 epochs at lr 0.01 is our choice, the length "
        "and rate of LGLA's fine-tuning of the same network on Places-LT",
        "not as the paper: its epochs and lr are not given (ours are a decision), nor is K on Places-LT "
        "(the search space's K applies)" + note_extra, needs_pretrained=True)


def _rna_imagenet(method: str, source: str, note: str = _RNA_IMAGENET_NOTE, outliers: bool = True) -> Recipe:
    values = {"epochs": 100, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
              "weight_decay": 5e-4, "lr_schedule": "cosine", "warmup_epochs": 0, "image_size": 224,
              "crop_min_scale": 0.2, "backbone": "resnet50"}
    if outliers:   # 256 ID + 256 outliers per step
        values["outlier_batch_size"] = 256
    return Recipe(method, "imagenet-lt", values, source, note)


RECIPES: tuple[Recipe, ...] = (
    _lgla_imagenet("darl"),
    _lgla_imagenet("ricasso"),
    _lgla_places("darl"),
    _lgla_places("ricasso"),
    _rna_imagenet("rna", _RNA_IMAGENET),
    _rna_imagenet("oe", f"{_RNA_IMAGENET}, which rna.md §8 item 3 recommends for OE (its Table 2 'OE' row)"),
    _rna_imagenet(
        "ce", f"{_RNA_IMAGENET}, as for OE (rna.md §8 items 1 and 3): Table 2's 'MSP' row is a CE model",
        "not as RNA: ColorJitter p=0.8 and RandomGrayscale(0.2) are not applied; RNA splits the batch over "
        "7 GPUs (DDP)", outliers=False),
    Recipe("pascl", "imagenet-lt", {
        "epochs": 100, "batch_size": 256, "outlier_batch_size": 256, "optimizer": "sgd", "lr": 0.1,
        "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5, "lr_schedule": "step",
        "lr_milestones": (0.6, 0.8), "warmup_epochs": 0, "image_size": 224, "crop_min_scale": 0.2,
        "backbone": "resnet50"},
        "PASCL's ImageNet-LT setting, rna.md §8 item 7 and ltood_code_survey.md §2.2 (its README: stage1.py "
        "--ds imagenet, SGD lr 0.1 · batch/256 at batch 256, wd 5e-5, x0.1 at epochs 60 and 80 of 100); "
        "ImageNet-Extra outliers 1:1",
        "not as PASCL: stage 2 (PASCL-FT: 3 epochs re-fitting BN and the classifier with logit-adjusted CE, "
        "SGD 0.01), which gives the paper's accuracy, is not run; ColorJitter and RandomGrayscale are not "
        "applied; PASCL splits the batch over its GPUs (DDP)"),
    Recipe("eat", "imagenet-lt", {
        "epochs": 60, "batch_size": 128, "outlier_batch_size": 128, "optimizer": "sgd", "lr": 0.05,
        "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5, "lr_schedule": "step", "lr_milestones": (),
        "warmup_epochs": 0, "image_size": 224, "crop_min_scale": 0.2, "backbone": "resnet50"},
        "EAT's README ImageNet command over stage1.py (ltood_code_survey.md §2.2): SGD Nesterov, lr 0.1 · "
        "batch/256 = 0.05 at its batch 128, wd 5e-5, 60 epochs (its -e 60 overrides --epochs 100, so its "
        "x0.1 milestones at 60 and 80 never fire: a constant rate); ImageNet-Extra outliers 1:1",
        "not as EAT: stage 2 (the classifier fine-tune that gives the paper's accuracy) is not run; "
        "ColorJitter and RandomGrayscale are not applied; EAT splits the batch over its GPUs (DDP)"),
    Recipe("cocl", "imagenet-lt", {
        "epochs": 100, "batch_size": 128, "outlier_batch_size": 256, "optimizer": "sgd", "lr": 0.1,
        "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5, "lr_schedule": "step",
        "lr_milestones": (0.6, 0.8), "warmup_epochs": 0, "image_size": 224, "crop_min_scale": 0.2,
        "backbone": "resnet50"},
        "COCL's README ImageNet command (ltood_code_survey.md §2.2): lr 0.1 and λ1, λ2, λ3 = 0.02, 0.01, 0.01 "
        "are published; the rest is our decision: the command runs a stage1.py absent from COCL's release "
        "(the name of PASCL's stage-1 script, whose ImageNet schedule we take: SGD Nesterov, wd 5e-5, x0.1 "
        "at 60 and 80 of 100 epochs); batch 128 and 256 outliers are COCL train.py's defaults",
        "not as COCL: its optimiser, weight decay, schedule and epochs on ImageNet-LT are not published "
        "(if stage1.py kept train.py's default optimiser, it ran Adam at lr 0.1); ColorJitter and "
        "RandomGrayscale are not applied"),
    _cala_places("cala"),
    _cala_places("cala_meta", "; the meta-net's settings are its CIFAR ones (cala.md gives the same Adam "
                              "1e-3 for every set)"),
    Recipe("open_sampling", "places-lt", {
        "epochs": 10, "batch_size": 512, "outlier_batch_size": 512, "optimizer": "sgd", "lr": 0.1,
        "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "lr_schedule": "cosine", "warmup_epochs": 0,
        "image_size": 224, "crop_min_scale": 0.08, "backbone": "resnet152"},
        "open_sampling.md §5.4 and A6/A18: ImageNet-pretrained ResNet-152, SGD 0.9, batch 512, cosine; "
        "epochs, lr and wd from classifier-balancing's cls_crt.yaml (10 epochs, classifier lr 0.1, "
        "wd 5e-4); outlier batch = ID batch",
        "not as the paper: the paper is two-stage (stage 1 fine-tunes the backbone with instance-balanced "
        "CE; stage 2 re-trains only the classifier with Open-sampling and class-balanced sampling on frozen "
        "features); ours trains the whole network once with Open-sampling from epoch 0 at the stage-2 "
        "settings, one lr for all layers (cRT's backbone lr 0.01 is not separate); the outliers "
        "are Places-Extra69 (outlier_set=auto)", needs_pretrained=True),
)


def get(method: str, dataset: str) -> Recipe | None:
    """Returns the recipe of `method` on the large set `dataset`, or None if the specs give none."""
    found = [r for r in RECIPES if r.method == method and r.dataset == dataset]
    return found[0] if found else None
