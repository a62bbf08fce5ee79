"""mixup on hard labels (Zhang et al., ICLR 2018, "mixup: Beyond Empirical Risk
Minimization"), the reference study's best Stage-2 strategy.

Per training batch: lam ~ Beta(alpha, alpha) (alpha = 1 by default), a random
permutation ``perm`` of the batch, inputs ``lam * x + (1 - lam) * x[perm]`` and loss
``lam * CE(out, y) + (1 - lam) * CE(out, y[perm])``, with ``y`` the labels the API
returned for the *original* images. One lam per batch, as in the paper's reference
implementation. lam and perm are drawn from the training loop's generator, so a run is
reproducible from its seed and resumes exactly from a checkpoint.

Differs from the study: the labels are the shared hard-label cache of the pool (every
pool image asked once, the cache ``basic`` uses), so mixup adds no queries; the study
re-asked the same images every epoch (1,250,000 queries) of a deterministic API. The
mixed images are never sent to the API.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mextract.attacks.base import AttackContext, AttackResult, cache_inputs, fit, require_cache
from mextract.train import Batch, Objective


def sample_beta(alpha: float, gen: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from ``gen``: G1 / (G1 + G2) with
    G1, G2 ~ Gamma(alpha, 1) independent."""
    g = torch._standard_gamma(torch.full((2,), float(alpha), device=gen.device),
                              generator=gen).double()
    total = g.sum()
    if total <= 0:  # both gamma draws underflowed (only for tiny alpha)
        return 0.5
    return float(g[0] / total)


def mixup(alpha: float = 1.0, label_smoothing: float = 0.0) -> Objective:
    """mixup objective on hard labels ``batch["y"]`` for :func:`mextract.train.train`."""

    def objective(model: nn.Module, x: torch.Tensor, batch: Batch,
                  gen: torch.Generator) -> torch.Tensor:
        lam = sample_beta(alpha, gen)
        perm = torch.randperm(len(x), generator=gen, device=gen.device).to(x.device)
        out = model(lam * x + (1.0 - lam) * x[perm])
        y = batch["y"]
        return (lam * F.cross_entropy(out, y, label_smoothing=label_smoothing)
                + (1.0 - lam) * F.cross_entropy(out, y[perm], label_smoothing=label_smoothing))

    return objective


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    cache = require_cache(ctx, "hard")
    model, history = fit(ctx, cache_inputs(ctx, cache), {"y": cache["answers"]},
                         mixup(float(params["alpha"]), ctx.train_cfg.label_smoothing),
                         cache["count"])
    return AttackResult(model, cache["count"], history)
