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
    """RandomCrop(size, padding) with zero fill, an independent offset per image.

    One ``gather`` of each image's window from the flattened padded batch (4x faster
    on the CPU than indexing with four broadcast index tensors; same result)."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    flat = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    return xp.flatten(2).gather(2, flat.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    return random_flip(random_crop(x, gen, padding), gen)


_TRIVIAL = v2.TrivialAugmentWide()

#: TrivialAugmentWide's operations (Mueller & Hutter, 2021, "TrivialAugment:
#: Tuning-free Yet State-of-the-Art Data Augmentation"), in torchvision's order.
TRIVIAL_OPS: tuple[str, ...] = tuple(v2.TrivialAugmentWide._AUGMENTATION_SPACE)
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")


def _trivial_magnitudes(num_bins: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 magnitude table [ops, bins], signed flag [ops]) of TrivialAugmentWide."""
    table = torch.zeros(len(TRIVIAL_OPS), num_bins, dtype=torch.float64)
    signed = torch.zeros(len(TRIVIAL_OPS), dtype=torch.bool)
    for k, (fn, sgn) in enumerate(v2.TrivialAugmentWide._AUGMENTATION_SPACE.values()):
        mags = fn(num_bins, h, w)
        if mags is not None:
            table[k] = mags.double()
        signed[k] = sgn
    return table, signed


def _inverse_affine(angle: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor,
                    tx: torch.Tensor, ty: torch.Tensor, cx: torch.Tensor,
                    cy: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_get_inverse_affine_matrix`` (scale 1, angles in degrees) for a
    batch of parameter sets, in float64: the (N, 2, 3) output-to-input matrices."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3)


def _geometric(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """ShearX/Y, TranslateX/Y and Rotate (``op``: indices into :data:`TRIVIAL_OPS`) with
    a per-image magnitude, as one nearest-neighbour ``grid_sample`` with zero fill
    (torchvision's affine / rotate kernels, for a batch)."""
    n, _, h, w = x.shape
    zero = torch.zeros(n, dtype=torch.float64, device=x.device)
    kind = {name: op == TRIVIAL_OPS.index(name) for name in _GEOMETRIC}
    shear = torch.rad2deg(torch.atan(mag))
    angle = torch.where(kind["Rotate"], -torch.remainder(mag, 360.0), zero)
    shear_x = torch.where(kind["ShearX"], shear, zero)
    shear_y = torch.where(kind["ShearY"], shear, zero)
    tx = torch.where(kind["TranslateX"], mag.trunc(), zero)
    ty = torch.where(kind["TranslateY"], mag.trunc(), zero)
    is_shear = kind["ShearX"] | kind["ShearY"]  # sheared about the top-left corner
    cx = torch.where(is_shear, zero - w * 0.5, zero)
    cy = torch.where(is_shear, zero - h * 0.5, zero)
    theta = _inverse_affine(angle, shear_x, shear_y, tx, ty, cx, cy).float()
    # torchvision's _affine_grid: pixel-centre base grid, normalised after theta.
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w),
                        torch.ones(h, w, device=x.device)], dim=-1).view(1, h * w, 3)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    grid = base.expand(n, -1, -1).bmm(theta.transpose(1, 2) / scale).view(n, h, w, 2)
    out = torch.nn.functional.grid_sample(x.float(), grid, mode="nearest",
                                          padding_mode="zeros", align_corners=False)
    return out.round_().to(x.dtype)


def _blend(x: torch.Tensor, op: str, factor: torch.Tensor) -> torch.Tensor:
    """Brightness / Color (saturation) / Contrast / Sharpness with a per-image factor:
    torchvision's blend of the image with its degenerate image (black, grey-scale, mean
    grey, smoothed), ``factor * x + (1 - factor) * degenerate``, clamped to uint8."""
    r = factor.float()[:, None, None, None]
    s = (1.0 - factor).float()[:, None, None, None]  # 1 - factor rounded once, as torchvision
    xf = x.float()
    if op == "Brightness":
        return xf.mul_(r).clamp_(0, 255).to(x.dtype)
    if op == "Sharpness":  # borders keep the image; the smoothing kernel is torchvision's
        degenerate = v2.functional.adjust_sharpness(x, 0.0).float()
        return torch.addcmul(xf, degenerate - xf, s).clamp_(0, 255).to(x.dtype)
    grey = v2.functional.rgb_to_grayscale(x).float()  # floor of the luma, as torchvision
    if op == "Contrast":
        grey = grey.mean(dim=(-3, -2, -1), keepdim=True)
    return torch.addcmul(xf.mul_(r), grey, s).clamp_(0, 255).to(x.dtype)


def _apply_trivial(x: torch.Tensor, op: str, mag: torch.Tensor) -> torch.Tensor:
    """One non-geometric TrivialAugmentWide operation on a batch (per-image magnitude)."""
    if op == "Identity":
        return x
    if op == "AutoContrast":
        return v2.functional.autocontrast(x)
    if op == "Equalize":
        return v2.functional.equalize(x)
    if op == "Posterize":  # keep the top `bits` bits
        bits = mag.to(torch.int64)
        mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
        return x & mask[:, None, None, None]
    if op == "Solarize":  # invert pixels at or above 255 * magnitude
        thr = (255.0 * mag).float()[:, None, None, None]
        return torch.where(x >= thr, 255 - x, x)
    if op in _BLENDS:
        return _blend(x, op, 1.0 + mag)
    raise ValueError(f"unknown TrivialAugmentWide op {op!r}")


def trivial_params(n: int, gen: torch.Generator,
                   num_bins: int = 31) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw TrivialAugmentWide's parameters for ``n`` images from ``gen``, as torchvision
    does per image: an op uniformly from :data:`TRIVIAL_OPS`, a magnitude bin uniformly
    from ``num_bins``, a sign with probability 1/2 (signed ops only). Returns CPU
    tensors (op index, bin, negative?)."""
    op = torch.randint(0, len(TRIVIAL_OPS), (n,), generator=gen, device=gen.device)
    bins = torch.randint(0, num_bins, (n,), generator=gen, device=gen.device)
    negative = torch.rand(n, generator=gen, device=gen.device) <= 0.5
    return op.cpu(), bins.cpu(), negative.cpu()


def trivial_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide on uint8 images (Mueller & Hutter, 2021), one independently
    drawn op and magnitude per image, computed as batched tensor ops on ``x``'s device.

    torchvision only applies it per image (a batch call applies one op to the whole
    batch). Here all parameters are drawn from ``gen`` at once (:func:`trivial_params`),
    and :func:`apply_trivial` transforms each group of images sharing an op in one
    call. The result equals torchvision's per-image op for the same parameters
    (tests/test_bench.py checks it, allowing 1 grey level of float rounding).
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"trivial_augment takes uint8 images, got {x.dtype}")
    if len(x) == 0:
        return x
    return apply_trivial(x, *trivial_params(len(x), gen))


def apply_trivial(x: torch.Tensor, op: torch.Tensor, bins: torch.Tensor,
                  negative: torch.Tensor, num_bins: int = 31) -> torch.Tensor:
    """TrivialAugmentWide with given per-image parameters (:func:`trivial_params`):
    AutoContrast / Equalize / the degenerate images through torchvision's batched
    kernels, the blends, posterize and solarize with a per-image factor, and the five
    geometric ops as one nearest-neighbour ``grid_sample`` with per-image matrices."""
    _, _, h, w = x.shape
    op, bins, negative = op.cpu(), bins.cpu(), negative.cpu()
    table, signed = _trivial_magnitudes(num_bins, h, w)
    mag = table[op, bins]
    mag = torch.where(negative & signed[op], -mag, mag)
    out = x.clone()
    geo = torch.isin(op, torch.tensor([TRIVIAL_OPS.index(g) for g in _GEOMETRIC]))
    groups = [(geo, None)] + [(op == k, name) for k, name in enumerate(TRIVIAL_OPS)
                              if name not in _GEOMETRIC and name != "Identity"]
    for mask, name in groups:  # one batched call per op (the geometric ops together)
        idx = mask.nonzero().flatten()
        if len(idx) == 0:
            continue
        dev_idx = idx.to(x.device)
        xs, ms = x[dev_idx], mag[idx].to(x.device)
        out[dev_idx] = (_geometric(xs, op[idx].to(x.device), ms) if name is None
                        else _apply_trivial(xs, name, ms))
    return out


def trivial_augment_per_image(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ``TrivialAugmentWide`` called once per image (the reference the
    batched :func:`trivial_augment` is checked and benchmarked against). Its random
    draws come from the global torch RNG (``gen`` is ignored)."""
    return torch.stack([_TRIVIAL(img) for img in x]) if len(x) else x


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
