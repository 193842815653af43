"""Whole-batch augmentation on the training device: no per-image Python work.

Images live as uint8 [N, 3, H, W] tensors on the device. A batch is gathered by index, cropped,
flipped and cut out there, then normalised; Mixup and CutMix act on normalised tensors (the same
as mixing raw pixels, since normalisation is affine per channel).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# LGLA (and DARL after it) normalise every CIFAR set, CIFAR-100 included, with CIFAR-10 statistics.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
AUGMENT_RULE = ("random crop 32 with 4-px zero padding, horizontal flip p=0.5, cutout 1x16 px; "
                "LGLA's AutoAugment CIFAR10Policy is not applied")


def to_device_images(x_nhwc: np.ndarray, device: torch.device) -> torch.Tensor:
    """Returns uint8 [N, 3, H, W] on `device` from a uint8 [N, H, W, 3] array."""
    return torch.from_numpy(np.ascontiguousarray(x_nhwc)).to(device).permute(0, 3, 1, 2).contiguous()


def normalize(x_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns (x / 255 - mean) / std as `dtype` [B, 3, H, W]."""
    mean = torch.tensor(CIFAR_MEAN, device=x_uint8.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x_uint8.device, dtype=dtype).view(1, 3, 1, 1)
    return (x_uint8.to(dtype) / 255.0 - mean) / std


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
        cy = torch.randint(0, h, (b, 1, 1), device=dev, generator=gen)
        cx = torch.randint(0, w, (b, 1, 1), device=dev, generator=gen)
        ys = torch.arange(h, device=dev)[None, :, None]
        xs = torch.arange(w, device=dev)[None, None, :]
        hole = ((ys - cy).abs() * 2 < cutout) & ((xs - cx).abs() * 2 < cutout)  # clipped at borders
        out = out * (~hole)[:, None].to(out.dtype)
    return out.contiguous()


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
