"""AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019) on whole uint8 batches on the device.

The reference is torchvision's `AutoAugment(AutoAugmentPolicy.CIFAR10)`: its 25 sub-policies of
two (op, probability, magnitude bin) slots, its 10 magnitude bins, its sign flip (p = 0.5) of the
signed ops and its nearest-neighbour geometry. torchvision draws and applies them one image at
a time; here every image draws its own sub-policy, apply-coins and signs from a torch.Generator
(`draw`), then each slot runs every op once on the whole batch with per-image parameters and a
`torch.where` keeps it on the rows that chose it (`apply`): a fixed number of kernels per batch
and no host sync. The geometric ops share one `grid_sample` per slot, each row with its own
inverse affine matrix, built as torchvision builds it.

LGLA's loader runs the PIL `CIFAR10Policy` (the AutoAugment authors' table, as here) with a grey
fill of 128, which is this module's default fill; PIL's rounding and bicubic shears are the
differences from torchvision's tensor ops, which our tests match.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as tvf

NUM_BINS = 10
# Op names as torchvision writes them; the first five move pixels, the first nine take a sign.
OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
GEOMETRIC = OPS[:5]
SIGNED = OPS[:9]
# (op, probability, magnitude bin) x 2 per sub-policy (the paper's Table 7, torchvision's order).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
LGLA_FILL = 128   # the grey of LGLA's CIFAR10Policy (PIL fillcolor (128, 128, 128))


def magnitude(op: str, bin_: int | None, height: int = 32, width: int = 32) -> float:
    """Returns the unsigned magnitude of `op` at bin `bin_` (0..9), torchvision's bins: linspace
    over [0, max] in float32 (Solarize: 1 -> 0; Posterize: 8 -> 4 bits, rounded); 0 without one."""
    if bin_ is None:
        return 0.0
    if op == "Posterize":
        return float((8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))).round().int()[bin_])
    if op == "Solarize":
        return float(torch.linspace(1.0, 0.0, NUM_BINS)[bin_])
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width,
           "TranslateY": 150.0 / 331.0 * height, "Rotate": 30.0}.get(op, 0.9)
    return float(torch.linspace(0.0, top, NUM_BINS)[bin_])


def _inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                    shear: tuple[float, float]) -> list[float]:
    """Returns the 2x3 output-to-input matrix torchvision samples with (scale 1; angle and shear
    in degrees, centre relative to the image centre), in its order of float operations."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def _geometry(op: str, signed_magnitude: float, height: int, width: int) -> list[float]:
    """Returns the inverse matrix of a geometric op at a signed magnitude, as torchvision's
    AutoAugment calls affine / rotate (shears about the top-left corner, the rest the centre)."""
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(signed_magnitude))
        shear = (degrees, 0.0) if op == "ShearX" else (0.0, degrees)
        return _inverse_affine((-width * 0.5, -height * 0.5), 0.0, (0.0, 0.0), shear)
    if op in ("TranslateX", "TranslateY"):
        shift = float(int(signed_magnitude))
        return _inverse_affine((0.0, 0.0), 0.0, (shift, 0.0) if op == "TranslateX" else (0.0, shift),
                               (0.0, 0.0))
    if op == "Rotate":
        return _inverse_affine((0.0, 0.0), -(signed_magnitude % 360), (0.0, 0.0), (0.0, 0.0))
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]   # not geometric: the identity


@dataclass
class Tables:
    """Per (sub-policy, slot, sign) parameters on one device; sign index 1 = negated.

    op [P, 2] index into OPS; prob [P, 2]; theta [P, 2, 2, 2, 3] inverse affine matrices;
    ratio / one_minus [P, 2, 2] blend weights 1 ± m and 1 - (1 ± m) of the colour ops; bits_mask
    [P, 2] Posterize's kept-bits mask; threshold [P, 2] Solarize's threshold 255·m.
    """
    op: torch.Tensor
    prob: torch.Tensor
    theta: torch.Tensor
    ratio: torch.Tensor
    one_minus: torch.Tensor
    bits_mask: torch.Tensor
    threshold: torch.Tensor


@functools.lru_cache(maxsize=None)
def tables(device: torch.device, height: int = 32, width: int = 32) -> Tables:
    """Returns the CIFAR-10 policy's parameters as tensors on `device`, built once per device."""
    cols: dict[str, list] = {k: [] for k in ("op", "prob", "theta", "ratio", "one_minus",
                                             "bits_mask", "threshold")}
    for sub in CIFAR10_POLICY:
        row: dict[str, list] = {k: [] for k in cols}
        for name, p, bin_ in sub:
            m = magnitude(name, bin_, height, width)
            signs = (1.0, -1.0) if name in SIGNED else (1.0, 1.0)
            bits = int(m) if name == "Posterize" else 8
            row["op"].append(OPS.index(name))
            row["prob"].append(p)
            row["theta"].append([_geometry(name, s * m, height, width) for s in signs])
            row["ratio"].append([1.0 + s * m for s in signs])
            row["one_minus"].append([1.0 - (1.0 + s * m) for s in signs])   # as torchvision's alpha
            row["bits_mask"].append(((1 << bits) - 1) << (8 - bits))
            row["threshold"].append(255.0 * m if name == "Solarize" else 256.0)
        for k, v in row.items():
            cols[k].append(v)
    t = lambda k, dtype: torch.tensor(cols[k], dtype=dtype, device=device)  # noqa: E731
    return Tables(op=t("op", torch.long), prob=t("prob", torch.float32),
                  theta=t("theta", torch.float32).view(len(CIFAR10_POLICY), 2, 2, 2, 3),
                  ratio=t("ratio", torch.float32), one_minus=t("one_minus", torch.float32),
                  bits_mask=t("bits_mask", torch.uint8), threshold=t("threshold", torch.float32))


@dataclass
class Draws:
    """Each image's choices: sub-policy [B] (index into CIFAR10_POLICY), whether each of its two
    slots applies [B, 2] and whether a signed op's magnitude is negated [B, 2]."""
    policy: torch.Tensor
    on: torch.Tensor
    negate: torch.Tensor


def draw(b: int, gen: torch.Generator, device: torch.device) -> Draws:
    """Returns torchvision's per-image draws for a batch of b: a uniform sub-policy, slot k
    applied when U <= its probability, a signed magnitude negated when U <= 0.5."""
    policy = torch.randint(0, len(CIFAR10_POLICY), (b,), device=device, generator=gen)
    coins = torch.rand(b, 2, device=device, generator=gen)
    negate = torch.rand(b, 2, device=device, generator=gen) <= 0.5
    return Draws(policy, coins <= tables(torch.device(device)).prob[policy], negate)


def autoaugment(x: torch.Tensor, gen: torch.Generator, fill: int = LGLA_FILL) -> torch.Tensor:
    """Returns uint8 images [B, 3, H, W] with one CIFAR-10 sub-policy applied per image."""
    return apply(x, draw(x.shape[0], gen, x.device), fill)


def apply(x: torch.Tensor, draws: Draws, fill: int = LGLA_FILL, gather: bool | None = None) -> torch.Tensor:
    """Returns uint8 images [B, 3, H, W] after each row's drawn sub-policy, slot by slot.

    gather=True runs each op on the sub-batch of rows that chose it (row indices read on the
    host: cheapest on a CPU); False runs it on the whole batch and keeps it where chosen (no host
    sync: for accelerators). Both give the same images; None picks by the device.
    """
    gather = x.device.type == "cpu" if gather is None else gather
    # A method may transform inside the trial's bf16 autocast (RICASSO's re-drawn stream); the
    # sampling grid and the blur must stay fp32 to land on torchvision's pixels.
    with torch.autocast(x.device.type, enabled=False):
        return _apply(x, draws, fill, gather)


def _apply(x: torch.Tensor, draws: Draws, fill: int, gather: bool) -> torch.Tensor:
    t = tables(x.device, *x.shape[-2:])
    for slot in range(2):
        index = (draws.policy, slot, draws.negate[:, slot].long())
        params = {"theta": t.theta[index], "ratio": _per_row(t.ratio[index]),
                  "one_minus": _per_row(t.one_minus[index]),
                  "bits_mask": _per_row(t.bits_mask[draws.policy, slot]),
                  "threshold": _per_row(t.threshold[draws.policy, slot])}
        op = torch.where(draws.on[:, slot], t.op[draws.policy, slot], -1)   # -1: slot not applied
        if gather:
            out = x.clone()
            for chosen, fn in _STEPS:
                idx = chosen(op).nonzero().squeeze(1)
                if len(idx):
                    out[idx] = fn(x[idx], {k: v[idx] for k, v in params.items()}, fill)
            x = out
        else:
            # Every step on every row, then each row picks its own: candidate 0 is the row as it
            # was, 1 the geometric warp, 2.. the other ops in OPS order (as _STEPS lists them).
            candidates = torch.stack([x, *(fn(x, params, fill) for _, fn in _STEPS)])
            pick = torch.where(op < 0, 0, torch.where(op < len(GEOMETRIC), 1, op - len(GEOMETRIC) + 2))
            x = candidates[pick, torch.arange(len(x), device=x.device)]
    return x


def _per_row(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _is(name: str):
    return lambda op: op == OPS.index(name)


# (which rows, what they get): each op on uint8 images [n, 3, H, W] with per-row parameters,
# the geometric ops first, then the others in OPS order (`_apply` relies on that order).
_STEPS = (
    (lambda op: (op >= 0) & (op < len(GEOMETRIC)), lambda x, p, fill: warp(x, p["theta"], fill)),
    (_is("Brightness"), lambda x, p, fill: x.float().mul(p["ratio"]).clamp_(0, 255).to(x.dtype)),
    (_is("Color"), lambda x, p, fill: blend(x, _luma(x).floor_(), p["ratio"], p["one_minus"])),
    (_is("Contrast"), lambda x, p, fill: blend(
        x, _luma(x).floor_().mean(dim=(-3, -2, -1), keepdim=True), p["ratio"], p["one_minus"])),
    (_is("Sharpness"), lambda x, p, fill: sharpen(x, p["one_minus"])),
    (_is("Posterize"), lambda x, p, fill: x & p["bits_mask"]),
    (_is("Solarize"), lambda x, p, fill: torch.where(x >= p["threshold"], tvf.invert(x), x)),
    (_is("AutoContrast"), lambda x, p, fill: tvf.autocontrast(x)),
    (_is("Equalize"), lambda x, p, fill: tvf.equalize(x)),
    (_is("Invert"), lambda x, p, fill: tvf.invert(x)),
)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Returns the float luma [B, 1, H, W] of uint8 images, in torchvision's order of operations."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor,
          one_minus: torch.Tensor) -> torch.Tensor:
    """Returns uint8 clamp(ratio·x + (1 - ratio)·other) with per-row weights [B, 1, 1, 1]."""
    return _fused_add(x.mul(ratio), other, one_minus).clamp_(0, 255).to(x.dtype)


def _fused_add(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Returns a + alpha·b in float32 rounded once, as torchvision's `add_(b, alpha=...)` does
    (a fused multiply-add): float32 products are exact in float64."""
    return (a.double() + b.double() * alpha.double()).float()


def sharpen(x: torch.Tensor, one_minus: torch.Tensor) -> torch.Tensor:
    """Returns torchvision's adjust_sharpness per row: the interior blended with a 3x3 blur
    (weights 1/13, centre 5/13, rounded) by 1 - factor; the border rows and columns kept."""
    kernel = _blur_kernel(x.device).expand(x.shape[-3], 1, 3, 3)
    out = x.float()
    blurred = nnf.conv2d(out, kernel, groups=x.shape[-3]).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.copy_(_fused_add(inner, blurred.sub_(inner), one_minus))
    return out.clamp_(0, 255).to(x.dtype)


def warp(x: torch.Tensor, theta: torch.Tensor, fill: int) -> torch.Tensor:
    """Returns uint8 images resampled (nearest) through per-row inverse affine matrices theta
    [B, 2, 3] in torchvision's pixel convention; pixels from outside the image get `fill`."""
    b, c, h, w = x.shape
    dev = x.device
    base, half_size = _pixel_grid(dev, h, w)
    grid = base.expand(b, -1, -1).bmm(theta.transpose(1, 2) / half_size).view(b, h, w, 2)
    img = torch.cat([x.float(), torch.ones(b, 1, h, w, device=dev)], dim=1)
    img = nnf.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    img, inside = img[:, :c], img[:, c:]
    img = torch.where(inside < 0.5, torch.full_like(img, float(fill)), img)
    return img.round_().to(x.dtype)


@functools.lru_cache(maxsize=None)
def _blur_kernel(device: torch.device) -> torch.Tensor:
    """Returns torchvision's sharpness blur [1, 1, 3, 3]: 1/13 around a centre of 5/13."""
    a, b = 1.0 / 13.0, 5.0 / 13.0
    return torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=device).view(1, 1, 3, 3)


@functools.lru_cache(maxsize=None)
def _pixel_grid(device: torch.device, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (pixel centres as homogeneous (x, y, 1) rows [1, H·W, 3] about the image centre,
    the half size (w/2, h/2) that maps them to grid_sample's [-1, 1]), torchvision's convention."""
    base = torch.empty(1, h, w, 3, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    return base.view(1, h * w, 3), torch.tensor([0.5 * w, 0.5 * h], device=device)
