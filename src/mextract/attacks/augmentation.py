"""Query-side augmentation for hard-label extraction, the reference study's Stage-2
"augmentation" strategy: RandomHorizontalFlip, RandomCrop(32, padding=4) and
RandomRotation(15) applied to pool images *before* they are sent to the API, so the
substitute learns from labelled views the plain pool does not contain (the
augmentation half of Papernot et al., 2017, "Practical Black-Box Attacks against
Machine Learning", with the standard CIFAR transforms instead of Jacobian steps).

Differs from the study: the study drew new views and re-queried the API every epoch
(25,000 x 50 = 1,250,000 queries). Here ``K = params["views"]`` views of each pool
image are drawn once from a recorded seed (``view_seed``), answered once by the
workflow's query-cache rule (query set ``views-k{K}-s{seed}``, pool size x K queries)
and regenerated from the seed when training, so rerunning training never re-queries.
The three transforms are one batched affine resampling
(:func:`mextract.augment.random_affine`: bilinear, zero fill) rounded back to 8 bits,
not torchvision's three successive per-image PIL-style transforms. The substitute's own
recipe augmentation (``crop_flip``) still applies on top of the answered views, as in
every other strategy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mextract.attacks.base import AttackContext, AttackResult, cache_inputs, fit, require_cache
from mextract.augment import random_affine
from mextract.train import cross_entropy

#: views drawn per generator block. Part of the query-set definition: each block of
#: this many consecutive views has its own generator seed, derived from (seed, block),
#: so the views do not depend on how a caller chunks work or on the thread count.
BLOCK = 2048


def _block_seed(seed: int, block: int) -> int:
    """Independent 63-bit seed for one block (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_views(pool: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K augmented views of every pool image: (uint8 views (N*K, C, H, W), int64 pool
    index of each view). View ``j`` of image ``i`` is row ``i * K + j``.

    Each view is a random flip, integer shift of up to 4 pixels (RandomCrop with
    padding 4) and rotation of up to 15 degrees, resampled bilinearly with zero fill
    and rounded to uint8. Deterministic in ``(pool, k, seed)``: blocks of
    :data:`BLOCK` views each draw from one ``torch.Generator`` seeded from
    ``(seed, block index)``.
    """
    if k < 1:
        raise ValueError(f"views must be >= 1, got {k}")
    if pool.dtype != torch.uint8:
        raise TypeError(f"make_views expects uint8 pool images, got {pool.dtype}")
    n = len(pool)
    index = torch.arange(n).repeat_interleave(k)
    views = torch.empty((n * k, *pool.shape[1:]), dtype=torch.uint8)
    gen = torch.Generator()
    for block, start in enumerate(range(0, n * k, BLOCK)):
        gen.manual_seed(_block_seed(seed, block))
        src = pool[index[start:start + BLOCK]].float()  # 0..255; zero fill stays black
        out = random_affine(src, gen, degrees=15.0, translate_px=4, flip=True)
        views[start:start + BLOCK] = out.round().clamp_(0, 255).to(torch.uint8)
    return views, index


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    cache = require_cache(ctx, "hard")
    expected = f"views-k{int(params['views'])}-s{int(params['view_seed'])}"
    if cache["query_set"] != expected:
        raise ValueError(f"augmentation with views={params['views']}, "
                         f"view_seed={params['view_seed']} needs the query set "
                         f"'{expected}', got '{cache['query_set']}'")
    inputs = cache_inputs(ctx, cache)  # regenerated from the recorded seed: no queries
    model, history = fit(ctx, inputs, {"y": cache["answers"]},
                         cross_entropy(ctx.train_cfg.label_smoothing), cache["count"])
    return AttackResult(model, cache["count"], history)
