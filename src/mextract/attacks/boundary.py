"""Decision-boundary probing on hard labels, the reference study's Stage-2 "boundary
probing" strategy: pairs of pool images that the victim labels differently, a binary
search along the straight line x(t) = (1 - t) x_a + t x_b for the point where the
victim's label flips, and the images found there added to the training set with the
API's labels. Points near the victim's decision boundary carry the most information
about it (the idea behind hard-label boundary attacks: Brendel et al., ICLR 2018,
"Decision-Based Adversarial Attacks"; and label-only extraction of the boundary:
Tramer et al., USENIX Security 2016, "Stealing Machine Learning Models via Prediction
APIs", their line-search retraining).

The search keeps a bracket [lo, hi] in t with label(lo) = label(x_a) and
label(hi) != label(x_a); each step asks the API for the midpoint of every pair's
bracket in one batched call, so after ``steps`` steps each bracket is 2^-steps wide and
contains a label flip. Both ends of the final bracket that were actually asked (each
within 2^-steps of the flip in t) join the training set with the labels the API
returned; an end never moved is x_a or x_b itself, already in the pool. Images are
sent, and stored, as the 8-bit images the API receives; after 10 steps the two ends
differ by at most 255 / 2^10 < 1 grey level per pixel before rounding, so more steps
mostly re-ask the same 8-bit images.

Queries: the pool's labels come from the shared hard-label cache of the pool (which
``basic`` and ``mixup`` share); each of the ``pairs * steps`` search steps is one
counted query to the live API. The query log (pairs, every asked t and answer, the
added images and labels) is kept by :mod:`mextract.querylog` in
``<workdir>/query_log.pt`` and reused by a rerun with the same parameters, seed, pool,
pool cache and API fingerprint (victim weights, mode, defence layers), which then asks
nothing and reports the logged count (``extra["queries_from_log"]``).
:mod:`mextract.attacks.random_boundary` is its equal-budget control: the same pairs,
``steps`` uniformly random points on each segment instead of a binary search.

Differs from the study: the study re-asked its whole training set every epoch
(1,250,000 queries); here the pool is asked once (cache) and the searches once
(pairs * steps queries, 10,000 for the defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mextract.api import VictimAPI
from mextract.attacks.base import AttackContext, AttackResult, cache_inputs, fit, require_cache
from mextract.querylog import QueryLogStore, cache_digest
from mextract.train import cross_entropy

Query = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Probe:
    """Outcome of :func:`probe` for P pairs and S steps."""

    t_lo: torch.Tensor  #: float64 [P]: bracket end with the start label
    t_hi: torch.Tensor  #: float64 [P]: bracket end with another label
    x_lo: torch.Tensor  #: uint8 [P, C, H, W]: image at t_lo as sent (x_a if never asked)
    x_hi: torch.Tensor  #: uint8 [P, C, H, W]: image at t_hi as sent (x_b if never asked)
    y_lo: torch.Tensor  #: int64 [P]
    y_hi: torch.Tensor  #: int64 [P]
    asked_lo: torch.Tensor  #: bool [P]: x_lo was sent to the API (t_lo > 0)
    asked_hi: torch.Tensor  #: bool [P]: x_hi was sent to the API (t_hi < 1)
    t_trace: torch.Tensor  #: float64 [S, P]: every asked t
    y_trace: torch.Tensor  #: int64 [S, P]: every answer


def interpolate(xa: torch.Tensor, xb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """uint8 images on the line x(t) = (1 - t) x_a + t x_b, rounded to 8 bits (what an
    image API receives); ``t`` has one entry per pair."""
    w = t.to(torch.float32)[:, None, None, None]
    mixed = (1.0 - w) * xa.float() + w * xb.float()
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def probe(query: Query, xa: torch.Tensor, xb: torch.Tensor, ya: torch.Tensor,
          yb: torch.Tensor, steps: int) -> Probe:
    """Batched binary search for a label flip on the segment from each x_a to x_b.

    ``query`` answers a batch of uint8 images with labels (the API's ``query``);
    it is called ``steps`` times with all P midpoints at once. ``ya``/``yb``: the
    known labels of x_a and x_b (must differ).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if bool((ya == yb).any()):
        raise ValueError("every pair must have two different labels")
    p = len(xa)
    lo = torch.zeros(p, dtype=torch.float64)
    hi = torch.ones(p, dtype=torch.float64)
    x_lo, x_hi = xa.clone(), xb.clone()
    y_lo, y_hi = ya.clone().long(), yb.clone().long()
    asked_lo = torch.zeros(p, dtype=torch.bool)
    asked_hi = torch.zeros(p, dtype=torch.bool)
    t_trace, y_trace = [], []
    for _ in range(steps):
        mid = (lo + hi) / 2
        x_mid = interpolate(xa, xb, mid)
        y_mid = query(x_mid).long().cpu()
        same = y_mid == y_lo  # y_lo stays the start label ya throughout
        lo = torch.where(same, mid, lo)
        hi = torch.where(same, hi, mid)
        img = same[:, None, None, None]
        x_lo = torch.where(img, x_mid, x_lo)
        x_hi = torch.where(img, x_hi, x_mid)
        y_hi = torch.where(same, y_hi, y_mid)
        asked_lo |= same
        asked_hi |= ~same
        t_trace.append(mid)
        y_trace.append(y_mid)
    return Probe(lo, hi, x_lo, x_hi, y_lo, y_hi, asked_lo, asked_hi,
                 torch.stack(t_trace), torch.stack(y_trace))


def sample_pairs(labels: torch.Tensor, n_pairs: int, seed: int) -> torch.Tensor:
    """``n_pairs`` (a, b) index pairs with ``labels[a] != labels[b]``, int64 [P, 2]:
    a uniform over all images, b uniform over the images of the other classes."""
    labels = labels.long().cpu()
    n = len(labels)
    counts = torch.bincount(labels)
    if n == 0 or int((counts > 0).sum()) < 2:
        raise ValueError("boundary probing needs pool images of at least two labels")
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    a = torch.randint(n, (n_pairs,), generator=gen)
    la = labels[a]
    others = n - counts[la]
    u = (torch.rand(n_pairs, generator=gen, dtype=torch.float64) * others).long()
    u = torch.minimum(u, others - 1)
    pos = torch.where(u < starts[la], u, u + counts[la])  # skip a's own class block
    return torch.stack([a, order[pos]], dim=1)


def check_live_api(api: VictimAPI, params: dict[str, Any], strategy: str) -> None:
    """A hard-label API with room for ``pairs * steps`` more queries (checked before
    the first one is asked)."""
    if api.mode != "hard":
        raise ValueError(f"{strategy} needs hard labels; the API answers {api.mode}")
    need = int(params["pairs"]) * int(params["steps"])
    if api.budget is not None and api.queries + need > api.budget:
        raise ValueError(f"{strategy} needs pairs x steps = {need} queries; the API budget "
                         f"is {api.budget} ({api.queries} already answered)")


def _search(api: VictimAPI, images: torch.Tensor, labels: torch.Tensor,
            params: dict[str, Any]) -> dict[str, Any]:
    check_live_api(api, params, "boundary probing")
    n_pairs, steps = int(params["pairs"]), int(params["steps"])
    pairs = sample_pairs(labels, n_pairs, int(params["pair_seed"]))
    a, b = pairs[:, 0], pairs[:, 1]
    before = api.queries
    found = probe(api.query, images[a], images[b], labels[a], labels[b], steps)
    if api.queries - before != n_pairs * steps:
        raise RuntimeError(f"boundary probing asked {api.queries - before} queries, "
                           f"expected pairs x steps = {n_pairs * steps}")
    images_new = torch.cat([found.x_lo[found.asked_lo], found.x_hi[found.asked_hi]])
    labels_new = torch.cat([found.y_lo[found.asked_lo], found.y_hi[found.asked_hi]])
    return {
        "params": {k: params[k] for k in ("pairs", "steps", "pair_seed")},
        "pairs": pairs, "t_lo": found.t_lo, "t_hi": found.t_hi,
        "t_trace": found.t_trace, "y_trace": found.y_trace,
        "images": images_new, "labels": labels_new,
    }


def log_store(ctx: AttackContext, cache: dict[str, Any], params: dict[str, Any],
              strategy: str = "boundary") -> QueryLogStore:
    """The query-log store of a job that probes segments between pool images
    (:mod:`mextract.querylog`): the store's key plus the shared pool cache whose labels
    choose the pairs (:func:`mextract.querylog.cache_digest`)."""
    return QueryLogStore.for_context(ctx, strategy, params, cache=cache_digest(cache))


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    cache = require_cache(ctx, "hard")
    images, labels = cache_inputs(ctx, cache), cache["answers"].long()
    store = log_store(ctx, cache, params)
    log = store.reuse()
    if log is None:
        log = store.save(_search(store.api, images, labels, params), complete=True)
    return fit_pool_and_points(ctx, images, labels, cache, store, log, "boundary_points")


def fit_pool_and_points(ctx: AttackContext, images: torch.Tensor, labels: torch.Tensor,
                        cache: dict[str, Any], store: Any, log: dict[str, Any],
                        points_key: str) -> AttackResult:
    """Train on the pool cache's images and labels plus the log's asked points (boundary
    probing and its random baseline); queries = the cache's count plus the log's."""
    queries = int(cache["count"]) + int(log["count"])
    model, history = fit(ctx, torch.cat([images, log["images"]]),
                         {"y": torch.cat([labels, log["labels"]])},
                         cross_entropy(ctx.train_cfg.label_smoothing), queries)
    return AttackResult(model, queries, history, query_log=log,
                        extra={**store.extra(log), points_key: len(log["labels"])})
