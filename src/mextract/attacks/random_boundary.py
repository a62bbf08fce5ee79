"""Equal-budget control of boundary probing (strategy ``random_boundary``).

:mod:`mextract.attacks.boundary` spends ``pairs * steps`` queries on a binary search for
the victim's label flip on the segment between two pool images of different labels
(the idea of hard-label boundary attacks: Brendel et al., ICLR 2018; Tramer et al.,
USENIX Security 2016). This control asks the same number of queries about the same
kind of images, without the search: on the segments of the *same* pairs
(:func:`boundary.sample_pairs` with the same ``pairs`` and ``pair_seed``), ``steps``
points x(t) = (1 - t) x_a + t x_b with t ~ U(0, 1) drawn independently, rounded to 8
bits like boundary's (:func:`boundary.interpolate`). Whatever boundary probing gains
over this control comes from searching, not from asking about mixtures of pool
images.

Like boundary, it trains on the shared hard-label cache of the pool (whose labels
choose the pairs) plus every asked image with the API's label, with cross-entropy and
the recipe's label smoothing. Queries: the cache's count plus exactly
``pairs * steps`` live queries, one batched call of ``pairs`` images per step. The t
draws come from a generator seeded with the experiment's seed. The query log (pairs,
every t, the asked images and answers; :mod:`mextract.querylog`) is reused by a rerun
with the same parameters, seed, pool, cache and API fingerprint.
"""

from __future__ import annotations

from typing import Any

import torch

from mextract.api import VictimAPI
from mextract.attacks import boundary
from mextract.attacks.base import AttackContext, AttackResult, cache_inputs, require_cache


def random_points(n_pairs: int, steps: int, seed: int) -> torch.Tensor:
    """t ~ U(0, 1), float64 [steps, pairs] (row s: the points asked in step s)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(steps, n_pairs, generator=gen, dtype=torch.float64)


def _ask(api: VictimAPI, images: torch.Tensor, labels: torch.Tensor, params: dict[str, Any],
         seed: int) -> dict[str, Any]:
    boundary.check_live_api(api, params, "random_boundary")
    n_pairs, steps = int(params["pairs"]), int(params["steps"])
    pairs = boundary.sample_pairs(labels, n_pairs, int(params["pair_seed"]))
    xa, xb = images[pairs[:, 0]], images[pairs[:, 1]]
    t = random_points(n_pairs, steps, seed)
    asked, answers = [], []
    for s in range(steps):  # one batched call per step, as boundary probing asks
        x = boundary.interpolate(xa, xb, t[s])
        asked.append(x)
        answers.append(api.query(x).long().cpu())
    return {"params": {k: params[k] for k in ("pairs", "steps", "pair_seed")},
            "pairs": pairs, "t": t, "y": torch.stack(answers),
            "images": torch.cat(asked), "labels": torch.cat(answers)}


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    cache = require_cache(ctx, "hard")
    images, labels = cache_inputs(ctx, cache), cache["answers"].long()
    store = boundary.log_store(ctx, cache, params, strategy="random_boundary")
    log = store.reuse()
    if log is None:
        log = store.save(_ask(store.api, images, labels, params, ctx.seed), complete=True)
    return boundary.fit_pool_and_points(ctx, images, labels, cache, store, log,
                                        "random_points")
