"""Attacker pools: the images a live-API strategy may choose its queries from.

The seed's strategies draw from the victim's own data distribution (the other half of
the training set); real attackers often have no such data. An experiment's ``pool``
config key selects the source (config/schema.yaml, ``$defs/pool``):

* ``{source: split}`` (default): the split's attacker half, as before;
* ``{source: imagefolder, root, count}``: any torchvision ``ImageFolder`` tree
  (``root/<class>/*``), read as RGB and resized to the data set's image size; with
  ``count``, a seeded subset of that many images (the class folders are not used);
* ``{source: skimage, count}``: random crops of scikit-image's bundled natural images
  (offline, no download): a non-problem-domain natural pool in the spirit of
  KnockoffNets' ImageNet / OpenImages pools (Orekondy, Schiele & Fritz, "Knockoff
  Nets: Stealing Functionality of Black-Box Models", CVPR 2019);
* ``{source: noise, count}``: uniform noise images (each pixel uniform in 0..255).

``count`` defaults to the size of the split's attacker half (the same pool size as the
default), ``seed`` (default 0) draws the subset, crops or noise: the pool does not
depend on the substitute's seed, so the seeds of an experiment share it.

:func:`build_pool` returns the uint8 pool (N, 3, S, S) and a one-line description
that goes into the experiment's metrics (``pool``) and the results table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: pool sources (the schema's enum)
SOURCES = ("split", "imagefolder", "skimage", "noise")

#: scikit-image's bundled natural photographs that load without the optional ``pooch``
#: download (checked with scikit-image 0.26): RGB ones and greyscale ones (replicated
#: to three channels). Synthetic images (text, page, logo, blobs, colorwheel) are left
#: out; ``cat`` is ``chelsea``.
SKIMAGE_RGB = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
               "immunohistochemistry", "retina")
SKIMAGE_GREY = ("camera", "moon", "coins", "grass", "gravel", "brick", "clock", "cell")
#: sources are downscaled to this shorter side first (crops then cover 32..256 pixels
#: of it, i.e. 1/8 to all of the picture's height), which keeps roi_align's per-pixel
#: averaging cheap
MAX_SIDE = 256


def _count(spec: Mapping[str, Any], count: int | None) -> int:
    n = spec.get("count", count)
    if n is None or int(n) < 1:
        raise ValueError(f"pool source {spec['source']!r} needs a count >= 1, got {n!r}")
    return int(n)


def noise_pool(count: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """``count`` uniform-noise uint8 images (count, 3, S, S), seeded."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 256, (count, 3, image_size, image_size), generator=gen,
                         dtype=torch.uint8)


def skimage_sources() -> list[np.ndarray]:
    """The bundled natural images as (H, W, 3) uint8 arrays, each downscaled (PIL,
    antialiased) so that its shorter side is at most :data:`MAX_SIDE`."""
    import skimage.data
    from PIL import Image

    out = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in SKIMAGE_RGB]
    for name in SKIMAGE_GREY:
        grey = np.asarray(getattr(skimage.data, name)())
        out.append(np.repeat(grey[..., None], 3, axis=2))
    small = []
    for im in out:
        h, w = im.shape[:2]
        scale = min(1.0, MAX_SIDE / min(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            im = np.asarray(Image.fromarray(np.ascontiguousarray(im, dtype=np.uint8))
                            .resize(size, Image.LANCZOS))
        small.append(np.ascontiguousarray(im, dtype=np.uint8))
    return small


def random_crops(sources: list[np.ndarray], count: int, image_size: int,
                 seed: int = 0) -> torch.Tensor:
    """``count`` random square crops of the ``sources``, each resized to ``image_size``
    and flipped horizontally with probability 1/2 (uint8, (count, 3, S, S)).

    A crop's source is uniform over the sources, its side uniform in [S, min(H, W)],
    its position uniform. Crops of one source are cut and resized in one
    ``torchvision.ops.roi_align`` call (bilinear, averaging ceil(side / S)^2 samples per
    output pixel, i.e. antialiased downscaling).
    """
    from torchvision.ops import roi_align

    rng = np.random.default_rng(int(seed))
    which = rng.integers(0, len(sources), size=count)
    out = torch.empty((count, 3, image_size, image_size), dtype=torch.uint8)
    for k, img in enumerate(sources):
        idx = np.flatnonzero(which == k)
        if len(idx) == 0:
            continue
        h, w = img.shape[:2]
        side = rng.uniform(image_size, min(h, w), size=len(idx))
        x0 = rng.uniform(0, w - side)
        y0 = rng.uniform(0, h - side)
        boxes = torch.from_numpy(np.stack([np.zeros_like(side), x0, y0, x0 + side,
                                           y0 + side], axis=1)).float()
        src = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None]
        crops = roi_align(src, boxes, output_size=image_size, spatial_scale=1.0,
                          sampling_ratio=-1, aligned=True)
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        crops[flip] = crops[flip].flip(-1)
        out[torch.from_numpy(idx)] = crops.round().clamp(0, 255).to(torch.uint8)
    return out


def imagefolder_pool(root: str | Path, image_size: int, count: int | None = None,
                     seed: int = 0) -> torch.Tensor:
    """The images of an ImageFolder tree (uint8, resized to ``image_size``); with
    ``count`` below the number of images, a seeded random subset of them (in file
    order)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"pool root '{root}' is not a folder")
    samples = ImageFolder(str(root)).samples  # sorted by class folder, then file name
    if count is not None and count < len(samples):
        keep = np.sort(np.random.default_rng(int(seed)).choice(len(samples), count,
                                                               replace=False))
        samples = [samples[i] for i in keep]
    out = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            out[i] = np.asarray(img)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def build_pool(spec: Mapping[str, Any] | None, *, image_size: int, count: int | None = None,
               seed: int = 0, split_pool: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, str]:
    """The attacker pool a ``pool`` config entry names, and its description.

    ``count`` is the size of pools drawn from the other sources when the spec gives
    none (the workflow passes the split pool's size); ``seed`` the draw's seed when the
    spec gives none; ``split_pool`` the split's attacker half (``source: split``).
    """
    spec = dict(spec or {"source": "split"})
    source = spec.get("source", "split")
    seed = int(spec.get("seed", seed))
    if source == "split":
        if split_pool is None:
            raise ValueError("pool source 'split' needs the split's attacker half")
        return split_pool, f"split ({len(split_pool)} images)"
    if source == "noise":
        n = _count(spec, count)
        return noise_pool(n, image_size, seed), f"noise (uniform, {n} images)"
    if source == "skimage":
        n = _count(spec, count)
        sources = skimage_sources()
        return (random_crops(sources, n, image_size, seed),
                f"skimage ({n} crops of {len(sources)} images)")
    if source == "imagefolder":
        if "root" not in spec:
            raise ValueError("pool source 'imagefolder' needs a 'root'")
        images = imagefolder_pool(spec["root"], image_size, spec.get("count"), seed)
        return images, f"imagefolder:{Path(spec['root']).name} ({len(images)} images)"
    raise ValueError(f"unknown pool source {source!r} (known: {', '.join(SOURCES)})")
