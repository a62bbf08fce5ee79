"""Hard-label extraction, the reference study's Stage-2 baseline (as in Papernot et al.,
2017, "Practical Black-Box Attacks against Machine Learning", without their Jacobian
data augmentation): cross-entropy on the labels the API returned for the pool.

Differs from the study: every pool image is asked once and cached; the study re-asked
the same images every epoch (1,250,000 queries), which a deterministic API answers
identically.
"""

from __future__ import annotations

from typing import Any

from mextract.attacks.base import AttackContext, AttackResult, cache_inputs, fit, require_cache
from mextract.train import cross_entropy


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    cache = require_cache(ctx, "hard")
    model, history = fit(ctx, cache_inputs(ctx, cache), {"y": cache["answers"]},
                         cross_entropy(ctx.train_cfg.label_smoothing), cache["count"])
    return AttackResult(model, cache["count"], history)
