"""Whole-batch augmentation on the training device: no per-image Python work.

Images live as uint8 [N, 3, H, W] tensors on the device. A batch is gathered by index, cropped,
flipped and cut out there, then normalised; Mixup and CutMix act on normalised tensors (the same
as mixing raw pixels, since normalisation is affine per channel).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

# LGLA (and DARL after it) normalise every CIFAR set, CIFAR-100 included, with CIFAR-10 statistics.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
AUGMENT_RULE = ("random crop 32 with 4-px zero padding, horizontal flip p=0.5, cutout 1x16 px; "
                "LGLA's AutoAugment CIFAR10Policy is not applied")
# LGLA's CIFAR loader (DARL, RICASSO): crop, flip, AutoAugment, then cutout (trainables.autoaugment).
LGLA_RULE = ("random crop 32 with 4-px zero padding, horizontal flip p=0.5, AutoAugment CIFAR10Policy "
             "per image if autoaugment=true (torchvision's 25 sub-policies, nearest, fill 128), "
             "cutout 1x16 px")
CROP_FLIP_RULE = "random crop 32 with 4-px zero padding, horizontal flip p=0.5; no cutout"


def to_device_images(x_nhwc: np.ndarray, device: torch.device) -> torch.Tensor:
    """Returns uint8 [N, 3, H, W] on `device` from a uint8 [N, H, W, 3] array."""
    return torch.from_numpy(np.ascontiguousarray(x_nhwc)).to(device).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device, dtype: torch.dtype, mean: tuple[float, ...],
              std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel statistics as [1, 3, 1, 1] tensors, copied to each device once, not every step."""
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1))


def standardize(x: torch.Tensor, mean: tuple[float, ...] = CIFAR_MEAN,
                std: tuple[float, ...] = CIFAR_STD) -> torch.Tensor:
    """Returns (x - mean) / std [B, 3, H, W] for float images in [0, 1] (CIFAR statistics unless
    given)."""
    m, s = _mean_std(x.device, x.dtype, mean, std)
    return (x - m) / s


def standardize_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Returns x standardised in place ((x - mean) / std, [B, 3, H, W]): no new batch-sized
    tensors, for the large images' views."""
    m, s = _mean_std(x.device, x.dtype, mean, std)
    return x.sub_(m).div_(s)


def normalize(x_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns (x / 255 - mean) / std as `dtype` [B, 3, H, W] (CIFAR statistics)."""
    return standardize(x_uint8.to(dtype) / 255.0)


def crop_flip_cutout(x: torch.Tensor, gen: torch.Generator, padding: int = 4,
                     cutout: int = 16) -> torch.Tensor:
    """Returns a uint8 batch [B, 3, H, W] randomly cropped (zero padding), flipped and cut out."""
    b, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=gen)
    rows = (oy + torch.arange(h, device=dev))[:, :, None]            # [B, H, 1]
    cols = (ox + torch.arange(w, device=dev))[:, None, :]            # [B, 1, W]
    flip = torch.rand(b, 1, 1, device=dev, generator=gen) < 0.5
    cols = torch.where(flip, 2 * ox[:, :, None] + w - 1 - cols, cols)  # mirror inside the window
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if cutout:
        out = cut_out(out, gen, cutout)
    return out.contiguous()


def cut_out(x: torch.Tensor, gen: torch.Generator, length: int = 16) -> torch.Tensor:
    """Returns images [B, C, H, W] with one length x length hole per row zeroed, its centre
    uniform over the image and the hole clipped at the borders (DeVries & Taylor's Cutout)."""
    b, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (b, 1, 1), device=dev, generator=gen)
    cx = torch.randint(0, w, (b, 1, 1), device=dev, generator=gen)
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    hole = ((ys - cy).abs() * 2 < length) & ((xs - cx).abs() * 2 < length)
    return x * (~hole)[:, None].to(x.dtype)


def mixup(xa: torch.Tensor, xb: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor,
          lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (lam*xa + (1-lam)*xb, lam*qa + (1-lam)*qb): Mixup rows with two-hot targets."""
    return lam * xa + (1 - lam) * xb, lam * qa + (1 - lam) * qb


def cutmix_box(h: int, w: int, lam: float, rng: np.random.RandomState) -> tuple[int, int, int, int]:
    """Returns (y1, y2, x1, x2): a floor(H sqrt(1-lam)) x floor(W sqrt(1-lam)) box, centre
    uniform over the image, clipped to it (Yun et al. 2019)."""
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = rng.randint(h), rng.randint(w)
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


def cutmix(xa: torch.Tensor, xb: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor,
           box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns (x, q, lam_eff): xb pasted into `box` of xa; lam_eff is xa's exact kept-area share."""
    y1, y2, x1, x2 = box
    h, w = xa.shape[-2:]
    x = xa.clone()
    x[..., y1:y2, x1:x2] = xb[..., y1:y2, x1:x2]
    lam_eff = 1 - (y2 - y1) * (x2 - x1) / (h * w)
    return x, lam_eff * qa + (1 - lam_eff) * qb, lam_eff


# Colour augmentation of SimCLR-style recipes (RNA, PASCL): torchvision's ColorJitter and
# RandomGrayscale, re-done on whole float batches in [0, 1]. Each op follows torchvision's tensor
# implementation (float arithmetic, luma weights 0.2989/0.587/0.114). The PIL path the papers'
# code ran rounds to uint8 after every op and shifts hue on an 8-bit channel (steps of 1/255);
# those rounding differences are the only departure.
LUMA = (0.2989, 0.587, 0.114)


def _per_row(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Returns the luma of float images [B, 3, H, W] as [B, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Returns clamp(b · x, 0, 1) for float images [B, 3, H, W] and per-row factors b [B]."""
    return (_per_row(factor) * x).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Returns clamp(c · x + (1 - c) · m, 0, 1), m = the image's mean luma, per row."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    c = _per_row(factor)
    return (c * x + (1 - c) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Returns clamp(s · x + (1 - s) · luma(x), 0, 1) per pixel and row."""
    s = _per_row(factor)
    return (s * x + (1 - s) * grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Returns x with its HSV hue rotated by `shift` [B] (in turns, in [-0.5, 0.5]) per row."""
    r, g, b = x.unbind(1)
    v = x.max(1).values
    chroma = v - x.min(1).values
    grey = chroma == 0
    sat = chroma / torch.where(grey, torch.ones_like(v), v)
    safe = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
    hue = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0 + shift.view(-1, 1, 1), 1.0)
    sector = torch.floor(hue * 6.0)
    f = hue * 6.0 - sector
    p = (v * (1 - sat)).clamp(0, 1)
    q = (v * (1 - sat * f)).clamp(0, 1)
    t = (v * (1 - sat * (1 - f))).clamp(0, 1)
    sector = sector.long() % 6
    # (r, g, b) for hue sectors 0..5 of the HSV hexcone
    table = torch.stack([torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p),
                                                     (p, p, t, v, v, q))], 1)   # [B, 3, 6, H, W]
    index = sector[:, None, None].expand(-1, 3, 1, -1, -1)
    return table.gather(2, index).squeeze(2)


def color_jitter(x: torch.Tensor, gen: torch.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 p: float = 0.8) -> torch.Tensor:
    """Returns RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p) applied to
    every row of float images [B, 3, H, W] in [0, 1].

    Per row, as torchvision: with probability p, draw b, c, s ~ U[1 - w, 1 + w] (floored at 0)
    and a hue shift ~ U[-hue, hue], then apply the four ops in a random order of that row's own.
    """
    n, dev = x.shape[0], x.device
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(n, device=dev, generator=gen)  # noqa: E731
    applied = torch.rand(n, device=dev, generator=gen) < p
    factors = [uniform(max(0.0, 1 - w), 1 + w) for w in (brightness, contrast, saturation)]
    shift = uniform(-hue, hue)
    order = torch.rand(n, 4, device=dev, generator=gen).argsort(1)   # a permutation per row
    ops = (adjust_brightness, adjust_contrast, adjust_saturation)
    for step in range(4):
        chosen = order[:, step]
        # Factor 1 leaves a row exactly unchanged, so the three blends run on the whole batch.
        for k, op in enumerate(ops):
            on = applied & (chosen == k)
            x = op(x, torch.where(on, factors[k], torch.ones_like(factors[k])))
        on = applied & (chosen == 3)
        x = torch.where(_per_row(on), adjust_hue(x, shift), x)
    return x


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Returns float images [B, 3, H, W] with each row turned to 3-channel luma with probability p."""
    on = torch.rand(x.shape[0], device=x.device, generator=gen) < p
    return torch.where(_per_row(on), grayscale(x).expand_as(x), x)


def crop_flip_jitter_gray(x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Returns RNA/PASCL's CIFAR training view as float [B, 3, H, W] in [0, 1], unnormalised:
    random crop (4-px zero padding) and flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8,
    RandomGrayscale p = 0.2."""
    x = crop_flip_cutout(x_uint8, gen, cutout=0).float() / 255.0
    return random_grayscale(color_jitter(x, gen), gen)
