"""Knowledge distillation on Random Erasing copies (Zhong et al., AAAI 2020, "Random
Erasing Data Augmentation"), the reference study's Stage-1 strategy 2.

The victim answers the *clean* pool images once (the shared soft-label cache, as for
:mod:`mextract.attacks.kd`); the substitute trains with the KD loss of Hinton et al.
(2015) on copies of those images in which, with probability ``p``, one rectangle of
area fraction in ``[scale_min, scale_max]`` is erased, while the target stays the
victim's answer for the clean image. The erasing is applied after the recipe's own
augmentation (:func:`mextract.attacks.base.default_augment`) to whole batches as
tensor ops (:func:`mextract.augment.random_erasing`); no erased image is ever sent to
the API, so the query count is the cache's.

Differs from Zhong et al.: the erased rectangle is filled with zeros (black) rather
than random values, and a box is clipped to the image instead of re-drawn (see
:func:`mextract.augment.random_erasing`); differs from the study as ``kd`` does (every
pool image asked once and cached instead of re-asked every epoch).
"""

from __future__ import annotations

from typing import Any

import torch

from mextract.attacks.base import (
    AttackContext,
    AttackResult,
    cache_inputs,
    default_augment,
    fit,
    require_cache,
)
from mextract.augment import random_erasing
from mextract.train import Augment, distillation


def erasing_augment(ctx: AttackContext, p: float, scale: tuple[float, float]) -> Augment:
    """The recipe's augmentation followed by batched RandomErasing(p, scale)."""
    if not scale[0] <= scale[1]:
        raise ValueError(f"random_erasing: scale_min ({scale[0]}) must not exceed "
                         f"scale_max ({scale[1]})")
    base = default_augment(ctx)

    def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_erasing(base(xb, gen), gen, p=p, scale=scale)

    return augment


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    cache = require_cache(ctx, "soft")
    augment = erasing_augment(ctx, float(params["p"]),
                              (float(params["scale_min"]), float(params["scale_max"])))
    model, history = fit(ctx, cache_inputs(ctx, cache), {"p": cache["answers"]},
                         distillation(params["temperature"]), cache["count"],
                         augment=augment)
    return AttackResult(model, cache["count"], history)
