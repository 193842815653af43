"""CIFAR (and ImageNet-size) backbones behind a tiny registry: `create("lgla_resnet32", num_classes=10)`.

Every model returns the same thing, so methods never branch on the architecture:

    logits, feats = model(x)     # x: [B, 3, H, W]
    logits: [K, B, C]            # one row of logits per expert (K = model.num_experts)
    feats:  [K, B, d]            # expert GAP features before the classifier (d = 64 here)
    ensemble = logits.mean(0)    # [B, C]; a single model has K = 1

Registered:
- "resnet32": the LDAM-DRW CIFAR ResNet-32 (BasicBlocks [5, 5, 5], widths 16/32/64, option-A
  zero-pad shortcuts, GAP) with a linear or cosine classifier.
- "resnet32_multihead": the same ResNet-32 with K linear heads on one feature (EAT).
- "lgla_resnet32": LGLA's K-expert ResNet-32 (DARL spec §3.0): a shared stem + layer1, then
  layer2/layer3 as grouped convolutions (groups = K) over K tiled copies, one cosine classifier
  per expert. Parameter count 1,344,784 (C=10, K=3) and 1,362,064 (C=100, K=3), as in LGLA.
- "resnet18", "resnet50", "resnet152": torchvision's ImageNet ResNets (ImageNet-LT, Places-LT).
- "lgla_resnet50": LGLA's K-expert ResNet-50 for ImageNet-LT (shared stem to layer2).
- "rna_resnet50": RNA's ImageNet ResNet-50 (BN affine off, projection head h_φ).
- "resnet50_multihead": torchvision's ResNet-50 with K linear heads (EAT on ImageNet-LT).
The last three take `arch` (resnet18 / resnet50 / resnet152) for another torchvision trunk.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPERT_SHORTCUTS = ("lgla_concat", "per_expert")
CLASSIFIERS = ("linear", "cosine")


class NormedLinear(nn.Module):
    """Cosine classifier without bias: returns s * cos(f, w_c), shape [B, out_features].

    The weight is stored as [in_features, out_features] (LGLA/LDAM layout) and initialised
    uniform(-1, 1) with every column rescaled to unit norm, exactly as LDAM's
    `uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0):
        super().__init__()
        self.scale = scale  # s, the cosine scale (30 in LGLA)
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)
        return self.scale * cos


def _pad_channels(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Option-A shortcut: returns x subsampled by 2 and zero-padded to `out_channels`.

    Shape [B, c_in, H, W] -> [B, out_channels, ceil(H/2), ceil(W/2)]; the padding is split
    evenly before and after the channels ((out - in) // 2 each side, which is planes // 4 when
    the width doubles, as in LDAM/LGLA).
    """
    extra = out_channels - x.shape[1]
    before = extra // 2
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, before, extra - before))


class OptionAShortcut(nn.Module):
    """Parameter-free downsampling shortcut for K experts stacked along channels.

    Returns [B, out_channels, H/2, W/2] from [B, in_channels, H, W].
    - "lgla_concat" pads the whole concatenated tensor once, like LGLA's LambdaLayer. The zeros
      then sit only at the two ends, so the middle experts' output channels receive channels of
      their neighbours (the leak of DARL spec §3.0, kept by default to reproduce LGLA).
    - "per_expert" pads every expert's slice separately, so expert k only sees its own channels.
    """

    def __init__(self, out_channels: int, num_experts: int, mode: str):
        super().__init__()
        self.out_channels = out_channels
        self.num_experts = num_experts
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "lgla_concat":
            return _pad_channels(x, self.out_channels)
        per_expert = self.out_channels // self.num_experts
        slices = x.chunk(self.num_experts, dim=1)
        return torch.cat([_pad_channels(s, per_expert) for s in slices], dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity / option-A shortcut; returns [B, planes, H', W'].

    `groups` > 1 makes both convs grouped, i.e. K independent experts side by side; BN is
    per-channel, so it does not mix experts either.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, groups: int = 1,
                 expert_shortcut: str = "lgla_concat"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False,
                               groups=groups)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False, groups=groups)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(planes, groups, expert_shortcut)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: an in-place `+=` would silently keep `out`'s dtype if the two paths
        # differ in dtype under autocast.
        return F.relu(out + self.shortcut(x))


def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int, groups: int = 1,
                expert_shortcut: str = "lgla_concat") -> nn.Sequential:
    """Returns `num_blocks` BasicBlocks; only the first one changes stride and width."""
    blocks = [BasicBlock(in_planes, planes, stride, groups, expert_shortcut)]
    blocks += [BasicBlock(planes, planes, 1, groups, expert_shortcut) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _kaiming_init(module: nn.Module) -> None:
    """LDAM/LGLA init: Kaiming-normal (fan_in, gain sqrt 2) for conv and nn.Linear weights.

    NormedLinear is not an nn.Linear, so it keeps its unit-column init, as in LGLA.
    """
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


def _gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling: [B, c, H, W] -> [B, c]."""
    return x.mean(dim=(2, 3))


class ResNet32(nn.Module):
    """LDAM-DRW CIFAR ResNet-32 (0.46M parameters with a 10-way head).

    forward(x [B, 3, H, W]) returns (logits [1, B, C], feats [1, B, 64]); the leading axis of
    size 1 is the expert axis shared with the multi-expert models.
    """

    num_experts = 1
    feature_dim = 64

    def __init__(self, num_classes: int, classifier: str = "linear", cos_scale: float = 30.0):
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier={classifier!r} is not one of {list(CLASSIFIERS)}")
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, 5, stride=1)
        self.layer2 = _make_stage(16, 32, 5, stride=2)
        self.layer3 = _make_stage(32, 64, 5, stride=2)
        if classifier == "cosine":
            self.classifier: nn.Module = NormedLinear(64, num_classes, cos_scale)
        else:
            self.classifier = nn.Linear(64, num_classes)
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        feats = _gap(out)                                    # [B, 64]
        logits = self.classifier(feats)                      # [B, C]
        return logits.unsqueeze(0), feats.unsqueeze(0)


class MultiHeadResNet32(ResNet32):
    """ResNet-32 with K linear classifiers on one shared 64-d feature (EAT's multi-head model).

    forward(x) returns (logits [K, B, C], feats [K, B, 64]): one row of logits per head and the
    same features repeated along the head axis, so the model contract's expert axis holds heads.
    """

    def __init__(self, num_classes: int, num_heads: int = 3):
        super().__init__(num_classes)
        if num_heads < 1:
            raise ValueError(f"num_heads={num_heads}; accepted: an integer >= 1")
        del self.classifier
        self.num_experts = num_heads
        self.heads = nn.ModuleList(nn.Linear(64, num_classes) for _ in range(num_heads))
        self.heads.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        feats = _gap(self.layer3(self.layer2(self.layer1(out))))           # [B, 64]
        logits = torch.stack([head(feats) for head in self.heads])         # [K, B, C]
        return logits, feats.unsqueeze(0).expand(len(self.heads), -1, -1)


class LGLAResNet32(nn.Module):
    """LGLA's K-expert CIFAR ResNet-32 (DARL spec §3.0).

    Shared conv3x3(3->16)+BN+ReLU and layer1 (16 ch); the layer1 output is tiled K times along
    channels, then layer2 (32K ch) and layer3 (64K ch) run as grouped convs with groups=K, so
    expert k owns output-channel block k of every grouped conv. GAP gives [B, 64K], split into
    K chunks of 64, each scored by its own cosine classifier z_{i,k} = s * cos(f_{i,k}, w_{k,c}).

    forward(x [B, 3, H, W]) returns (logits [K, B, C], feats [K, B, 64]).
    """

    def __init__(self, num_classes: int, num_experts: int = 3,
                 expert_shortcut: str = "lgla_concat", cos_scale: float = 30.0):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if expert_shortcut not in EXPERT_SHORTCUTS:
            raise ValueError(f"expert_shortcut={expert_shortcut!r} is not one of "
                             f"{list(EXPERT_SHORTCUTS)}")
        k = num_experts
        self.num_experts = k
        self.expert_shortcut = expert_shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, 5, stride=1)
        self.layer2 = _make_stage(16 * k, 32 * k, 5, stride=2, groups=k,
                                  expert_shortcut=expert_shortcut)
        self.layer3 = _make_stage(32 * k, 64 * k, 5, stride=2, groups=k,
                                  expert_shortcut=expert_shortcut)
        self.classifiers = nn.ModuleList(NormedLinear(64, num_classes, cos_scale) for _ in range(k))
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)                                       # [B, 16, H, W]
        out = torch.cat([out] * self.num_experts, dim=1)             # [B, 16K, H, W]
        out = self.layer3(self.layer2(out))                          # [B, 64K, H/4, W/4]
        chunks = _gap(out).chunk(self.num_experts, dim=1)            # K x [B, 64]
        logits = [head(f) for head, f in zip(self.classifiers, chunks)]
        return torch.stack(logits), torch.stack(chunks)


PROJECTIONS = ("mlp", "linear", "none")


def rna_projection(d: int, kind: str, proj_dim: int) -> nn.Module:
    """Returns RNA's h_φ on d-dim features: "mlp" = Linear(d, d)-ReLU-Linear(d, proj_dim), the
    paper's, output not normalised; "linear" = W_h, a bias-free Linear(d, proj_dim); "none" = the
    identity (the two ablations of the paper's Table 15)."""
    if kind not in PROJECTIONS:
        raise ValueError(f"projection={kind!r} is not one of {list(PROJECTIONS)}")
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, proj_dim))
    if kind == "linear":
        return nn.Linear(d, proj_dim, bias=False)
    return nn.Identity()


class ConvShortcutBlock(nn.Module):
    """CIFAR ResNet-18 BasicBlock (kuangliu layout) with BN affine off; returns [B, planes, H', W'].

    relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN when the
    stride or the width changes. RNA drops BN's γ, β (a learnable scale would let every norm grow,
    OOD's included); `shortcut_bn_affine` keeps them on the shortcut BN only, as the official RNA
    code does (RNA spec §7, A1).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut_bn_affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, affine=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, affine=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes, affine=shortcut_bn_affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class RNAResNet18(nn.Module):
    """RNA's CIFAR ResNet-18 (RNA spec §2.1): f_θ, a linear classifier W (with bias) and h_φ.

    Stem conv3x3(3->64) + BN + ReLU, no max-pool; stages [2, 2, 2, 2] of widths 64/128/256/512
    and strides 1/2/2/2; GAP gives f_θ(x) [B, 512], non-negative (after the last ReLU). Every BN
    has affine off except, with `shortcut_bn_affine` (the official code), the three shortcut BNs.
    PyTorch's default initialisation, as in the official code.

    forward(x [B, 3, H, W]) returns (logits [1, B, C], feats [1, B, 512]);
    project(feats [..., 512]) returns h_φ(f) [..., proj_dim], used by the training loss only.
    `projection`: "mlp" = Linear(512, 512)-ReLU-Linear(512, proj_dim), the paper's h_φ, output
    not normalised; "linear" = W_h, a bias-free Linear(512, proj_dim); "none" = f itself
    (the two ablations of the paper's Table 15).
    """

    num_experts = 1
    feature_dim = 512

    def __init__(self, num_classes: int, shortcut_bn_affine: bool = True, projection: str = "mlp",
                 proj_dim: int = 128):
        super().__init__()
        if projection not in PROJECTIONS:   # before any layer is built
            raise ValueError(f"projection={projection!r} is not one of {list(PROJECTIONS)}")
        d = self.feature_dim
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, affine=False)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (d, 2)):
            stages.append(nn.Sequential(ConvShortcutBlock(in_planes, planes, stride, shortcut_bn_affine),
                                        ConvShortcutBlock(planes, planes, 1, shortcut_bn_affine)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(d, num_classes)
        self.projection = rna_projection(d, projection, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        feats = _gap(out)                                    # f_θ(x): [B, 512], >= 0
        return self.classifier(feats).unsqueeze(0), feats.unsqueeze(0)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Returns h_φ(f) [..., proj_dim] (or f itself for projection="none"); not normalised."""
        return self.projection(feats)


# ----------------------------------------------------------------------------- ImageNet-size

TORCHVISION_RESNETS = ("resnet18", "resnet50", "resnet152")
FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048, "resnet152": 2048}   # GAP width of each


def _torchvision_resnet(arch: str, pretrained: str | None) -> nn.Module:
    """Returns torchvision's `arch`, random or with ImageNet weights: `pretrained` is a state-dict
    file (torchvision's layout; its `fc.*` is dropped) or "imagenet" (torchvision's weights enum,
    downloaded on first use). ValueError, one line, for a missing or mismatched file."""
    import torchvision
    if arch not in TORCHVISION_RESNETS:
        raise ValueError(f"arch={arch!r}; accepted: {', '.join(TORCHVISION_RESNETS)}")
    if pretrained == "imagenet":
        return getattr(torchvision.models, arch)(weights="DEFAULT")
    net = getattr(torchvision.models, arch)(weights=None)
    if pretrained is None:
        return net
    if not os.path.isfile(pretrained):
        raise ValueError(f"pretrained={pretrained!r}: no such file; accepted: a torchvision {arch} "
                         f"state-dict file, \"imagenet\" or null")
    state = torch.load(pretrained, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = net.state_dict()
    missing = [k for k in own if not k.startswith("fc.") and k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"pretrained={pretrained!r} does not fit torchvision {arch}: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped keys (e.g. "
                         f"{(missing + unexpected + wrong)[0]}); accepted: a {arch} state dict")
    net.load_state_dict(state, strict=False)   # only fc.* is left out
    return net


class TorchvisionResNet(nn.Module):
    """torchvision's ImageNet ResNet (7x7 stem, max-pool, GAP) with a fresh linear classifier.

    forward(x [B, 3, H, W]) returns (logits [1, B, C], feats [1, B, d]); d = 512 (ResNet-18) or
    2048 (ResNet-50/152)."""

    num_experts = 1

    def __init__(self, num_classes: int, arch: str = "resnet50", pretrained: str | None = None):
        super().__init__()
        net = _torchvision_resnet(arch, pretrained)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.trunk = net
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(x)                                 # [B, d]
        return self.classifier(feats).unsqueeze(0), feats.unsqueeze(0)


def strip_bn_affine(module: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> None:
    """Removes γ, β from every BatchNorm2d of `module` whose qualified name `keep` refuses (the
    running statistics stay): RNA's `register_parameter("weight", None)` on each BN."""
    for name, m in module.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not keep(name):
            m.register_parameter("weight", None)
            m.register_parameter("bias", None)
            m.affine = False


class RNAImageNetResNet(TorchvisionResNet):
    """RNA's ImageNet ResNet (RNA spec §2.1, the official `models/resnet_imagenet.py`):
    torchvision's ResNet (v1.5) with γ, β removed from every BatchNorm, stem and downsample BNs
    included; f_θ(x) = the GAP of layer4 after its last ReLU (2048-d for ResNet-50, 512-d for
    ResNet-18), non-negative; the linear classifier W (with bias) on f_θ; h_φ on f_θ, used by
    the loss only (`rna_projection`: D -> D -> proj_dim for "mlp", not normalised).

    `shortcut_bn_affine` keeps γ, β on the downsample BNs (the CIFAR code's quirk, RNA spec A1;
    the ImageNet code has them off). `pretrained` loads a torchvision state dict first: its
    convolutions and BN running statistics are kept, its BN γ, β dropped (RNA has none).

    forward(x) returns (logits [1, B, C], feats [1, B, D]); project(feats [..., D]) returns
    h_φ(f) [..., proj_dim]."""

    def __init__(self, num_classes: int, arch: str = "resnet50", pretrained: str | None = None,
                 shortcut_bn_affine: bool = False, projection: str = "mlp", proj_dim: int = 128):
        if projection not in PROJECTIONS:   # before the trunk is built (or loaded)
            raise ValueError(f"projection={projection!r} is not one of {list(PROJECTIONS)}")
        super().__init__(num_classes, arch, pretrained)
        strip_bn_affine(self.trunk, keep=lambda name: shortcut_bn_affine and name.endswith("downsample.1"))
        self.projection = rna_projection(self.feature_dim, projection, proj_dim)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Returns h_φ(f) [..., proj_dim] (or f itself for projection="none"); not normalised."""
        return self.projection(feats)


class MultiHeadTorchvisionResNet(TorchvisionResNet):
    """torchvision's ResNet with K linear heads on its one GAP feature (EAT's ImageNet model:
    three `Linear(2048, C + A)` heads on a ResNet-50).

    forward(x) returns (logits [K, B, C], feats [K, B, d]): one row of logits per head and the
    same features repeated along the head axis, as `MultiHeadResNet32`."""

    def __init__(self, num_classes: int, num_heads: int = 3, arch: str = "resnet50",
                 pretrained: str | None = None):
        if num_heads < 1:
            raise ValueError(f"num_heads={num_heads}; accepted: an integer >= 1")
        super().__init__(num_classes, arch, pretrained)
        del self.classifier
        self.num_experts = num_heads
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, num_classes) for _ in range(num_heads))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(x)                                                # [B, d]
        logits = torch.stack([head(feats) for head in self.heads])          # [K, B, C]
        return logits, feats.unsqueeze(0).expand(len(self.heads), -1, -1)


class LGLAResNet50(nn.Module):
    """LGLA's K-expert ImageNet ResNet (DARL spec §3.0, ImageNet-LT): torchvision's stem, layer1
    and layer2 shared; K copies of layer3 + layer4, one per expert (LGLA runs them as grouped
    convs with 1x1 grouped downsampling, which is the same as separate copies: no channel leaks
    between experts); one cosine classifier (s = 30) per expert on its 2048-d GAP feature.

    forward(x) returns (logits [K, B, C], feats [K, B, d])."""

    def __init__(self, num_classes: int, num_experts: int = 3, cos_scale: float = 30.0,
                 arch: str = "resnet50", pretrained: str | None = None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        import copy
        net = _torchvision_resnet(arch, pretrained)
        self.num_experts = num_experts
        self.shared = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
        self.experts = nn.ModuleList(nn.Sequential(copy.deepcopy(net.layer3), copy.deepcopy(net.layer4))
                                     for _ in range(num_experts))
        d = net.fc.in_features
        self.classifiers = nn.ModuleList(NormedLinear(d, num_classes, cos_scale) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.shared(x)
        feats = torch.stack([_gap(expert(shared)) for expert in self.experts])    # [K, B, d]
        return torch.stack([head(f) for head, f in zip(self.classifiers, feats)]), feats


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": partial(TorchvisionResNet, arch="resnet18"),
    "resnet50": partial(TorchvisionResNet, arch="resnet50"),
    "resnet152": partial(TorchvisionResNet, arch="resnet152"),
    "lgla_resnet50": LGLAResNet50,
    "rna_resnet50": RNAImageNetResNet,
    "resnet50_multihead": MultiHeadTorchvisionResNet,
    "resnet32": ResNet32,
    "resnet32_multihead": MultiHeadResNet32,
    "lgla_resnet32": LGLAResNet32,
    "resnet18_rna": RNAResNet18,
}


def names() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_REGISTRY)


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Returns a freshly initialised model `name` with `num_classes` outputs per expert.

    kwargs go to the model: resnet32 takes classifier="linear"|"cosine", cos_scale;
    lgla_resnet32 takes num_experts, expert_shortcut="lgla_concat"|"per_expert", cos_scale;
    resnet18_rna takes shortcut_bn_affine, projection="mlp"|"linear"|"none", proj_dim;
    resnet32_multihead takes num_heads; resnet18 / resnet50 / resnet152 (torchvision's) take
    pretrained (a state-dict file or "imagenet"); lgla_resnet50 takes num_experts, cos_scale,
    arch, pretrained; rna_resnet50 takes arch, pretrained, shortcut_bn_affine, projection,
    proj_dim; resnet50_multihead takes num_heads, arch, pretrained.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {names()}")
    return _REGISTRY[name](num_classes, **kwargs)
