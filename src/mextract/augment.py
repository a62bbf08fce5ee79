"""Batched image augmentations as tensor ops (no per-image Python loop in hot paths).

All functions take a batch (N, C, H, W) on any device and a ``torch.Generator`` on
that device, so results are reproducible from the generator's seed.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def _rand(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal flip of each image with probability 1/2."""
    mask = _rand(len(x), gen, x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding) with zero fill, an independent offset per image."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    ni = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[ni, ci, rows, cols]


def crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    return random_flip(random_crop(x, gen, padding), gen)


_TRIVIAL = v2.TrivialAugmentWide()


def trivial_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide on uint8 images, one independently drawn op per image.

    torchvision only offers it per image (a batch call applies one op to the whole
    batch), so this is the one per-image loop; it runs on small uint8 tensors.
    The op choice draws from the global torch RNG, which training seeds and
    checkpoints.
    """
    return torch.stack([_TRIVIAL(img) for img in x])


def random_erasing(x: torch.Tensor, gen: torch.Generator, p: float = 0.5,
                   scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0) -> torch.Tensor:
    """torchvision's RandomErasing for a whole batch: each image, with probability
    ``p``, gets one rectangle of area fraction in ``scale`` and aspect ratio in
    ``ratio`` (log-uniform) set to ``value``. Boxes are clipped to the image (torchvision
    retries instead; the area distribution differs slightly at the largest scales)."""
    n, _, h, w = x.shape
    dev = x.device
    area = h * w * (scale[0] + (scale[1] - scale[0]) * _rand(n, gen, dev))
    log_r = torch.log(torch.tensor(ratio, device=dev))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand(n, gen, dev))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = ((h - eh + 1) * _rand(n, gen, dev)).floor()
    left = ((w - ew + 1) * _rand(n, gen, dev)).floor()
    apply = _rand(n, gen, dev) < p
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :]) & apply[:, None, None]
    return torch.where(mask[:, None], torch.as_tensor(value, dtype=x.dtype, device=dev), x)


def random_affine(x: torch.Tensor, gen: torch.Generator, degrees: float = 15.0,
                  translate_px: int = 4, flip: bool = True) -> torch.Tensor:
    """Flip + RandomCrop(padding=translate_px) + RandomRotation(degrees) as one batched
    affine resampling (``grid_sample``, bilinear, zero fill): an independent
    rotation, integer shift and flip per image. Float images in, float images out."""
    n, _, h, w = x.shape
    dev = x.device
    theta_deg = (2 * _rand(n, gen, dev) - 1) * degrees
    theta = theta_deg * torch.pi / 180
    dx = torch.randint(-translate_px, translate_px + 1, (n,), generator=gen, device=dev)
    dy = torch.randint(-translate_px, translate_px + 1, (n,), generator=gen, device=dev)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(_rand(n, gen, dev) < 0.5, -sign, sign)
    cos, sin = torch.cos(theta), torch.sin(theta)
    mat = torch.zeros(n, 2, 3, device=dev)
    mat[:, 0, 0] = cos * sign
    mat[:, 0, 1] = -sin
    mat[:, 1, 0] = sin * sign
    mat[:, 1, 1] = cos
    mat[:, 0, 2] = -2 * dx.float() / w  # shift in normalised coordinates
    mat[:, 1, 2] = -2 * dy.float() / h
    grid = torch.nn.functional.affine_grid(mat, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear",
                                           padding_mode="zeros", align_corners=False)
