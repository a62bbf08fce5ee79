"""No-theft control: the substitute's architecture and recipe trained on the attacker
pool's *true* labels, with zero queries to the API.

Two accurate models agree on most test images even without theft, so every attack's
fidelity is read against this control's (the fidelity gain), and fidelity on the
images the victim gets wrong separates copying from merely being accurate.
"""

from __future__ import annotations

from typing import Any

from mextract.attacks.base import AttackContext, AttackResult, fit
from mextract.train import cross_entropy


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    if ctx.pool_labels is None:
        raise ValueError("the control needs the pool's true labels")
    model, history = fit(ctx, ctx.pool, {"y": ctx.pool_labels},
                         cross_entropy(ctx.train_cfg.label_smoothing), 0)
    return AttackResult(model, 0, history)
