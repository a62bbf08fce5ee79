"""Equal-budget random baseline (strategy ``random``): ``budget`` distinct pool images
drawn uniformly at random, asked once through the live API, and a substitute trained
on the answers with the experiment's recipe.

It is the control that an adaptive selection strategy (MARICH, Karmakar & Basu,
NeurIPS 2023; hard-label active learning, Ash et al., ICLR 2020; SPSG, Zhao et al.,
CVPR 2024) must beat at the same number of queries: the "random" selection baseline
of active-learning model extraction (Pal et al., AAAI 2020, "ActiveThief: Model
Extraction Using Active Learning and Unannotated Public Data"). It follows the API's mode: on soft
answers the substitute is distilled (Hinton et al., 2015; :func:`mextract.train.
distillation` at ``temperature``), on hard labels it is trained with cross-entropy and
the recipe's label smoothing.

The draw is a ``torch.randperm`` of the pool from a generator seeded with the
experiment's seed (no Python loop over images). Queries: exactly ``budget``, counted
by the API; a budget larger than the pool is refused before anything is asked. The
query log (drawn indices and answers, :mod:`mextract.querylog`) is reused by a rerun
with the same parameters, seed, pool and API fingerprint, which then asks nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from mextract.attacks.base import AttackContext, AttackResult, capped_budget, fit
from mextract.querylog import QueryLogStore
from mextract.train import cross_entropy, distillation


def draw(pool_size: int, budget: int, seed: int) -> torch.Tensor:
    """``budget`` distinct pool indices, uniformly at random (seeded); int64 [budget]."""
    if budget < 1:
        raise ValueError(f"random: budget must be >= 1, got {budget}")
    if budget > pool_size:
        raise ValueError(f"random: a budget of {budget} distinct images exceeds the pool "
                         f"of {pool_size} images")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(pool_size, generator=gen)[:budget]


def fit_answers(ctx: AttackContext, images: torch.Tensor, answers: torch.Tensor,
                kind: str, temperature: float, queries: int) -> tuple[Any, list[dict]]:
    """Train the substitute on answered pool images: distillation at ``temperature`` on
    soft answers, cross-entropy on hard labels (also KnockoffNets' final training)."""
    if kind == "soft":
        targets = {"p": answers.float()}
        objective = distillation(temperature)
    else:
        targets = {"y": answers.long()}
        objective = cross_entropy(ctx.train_cfg.label_smoothing)
    return fit(ctx, images, targets, objective, queries)


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    budget = capped_budget(ctx, "random", int(params["budget"]))
    store = QueryLogStore.for_context(ctx, "random", params)
    api = store.api
    kind = "soft" if api.mode == "soft" else "hard"
    log = store.reuse()
    if log is None:
        indices = draw(len(ctx.pool), budget, ctx.seed)
        answers = api.query(ctx.pool[indices])
        log = store.save({"kind": kind, "query_set": "random", "indices": indices,
                          "answers": answers}, complete=True)
    queries = int(log["count"])
    model, history = fit_answers(ctx, ctx.pool[log["indices"]], log["answers"], kind,
                                 float(params["temperature"]), queries)
    return AttackResult(model, queries, history, query_log=log,
                        extra={**store.extra(log), "answers": kind,
                               "budget_requested": int(params["budget"])})
