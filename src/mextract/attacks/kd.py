"""Soft-label knowledge distillation (Hinton et al., 2015, "Distilling the Knowledge in a
Neural Network"), the reference study's Stage-1 baseline.

loss = KL(softmax(victim/T) || softmax(substitute/T)) * T^2 with T = 3. The victim's
tempered distribution is recovered from the API's probabilities (softmax(log p / T)),
so no logits leave the API. Differs from the study: every pool image is asked once
and cached (the study re-asked the same images every epoch of a deterministic API).
"""

from __future__ import annotations

from typing import Any

from mextract.attacks.base import AttackContext, AttackResult, cache_inputs, fit, require_cache
from mextract.train import distillation


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    cache = require_cache(ctx, "soft")
    model, history = fit(ctx, cache_inputs(ctx, cache), {"p": cache["answers"]},
                         distillation(params["temperature"]), cache["count"])
    return AttackResult(model, cache["count"], history)
