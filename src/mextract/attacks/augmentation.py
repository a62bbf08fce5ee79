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
(:func:`mextract.queries.make_views` with :func:`mextract.augment.random_affine`:
bilinear, zero fill) rounded back to 8 bits,
not torchvision's three successive per-image PIL-style transforms. The substitute's own
recipe augmentation (``crop_flip``) still applies on top of the answered views, as in
every other strategy.
"""

from __future__ import annotations

from typing import Any

from mextract.attacks.base import AttackContext, AttackResult, cache_inputs, fit, require_cache
from mextract.train import cross_entropy


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
