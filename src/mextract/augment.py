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
