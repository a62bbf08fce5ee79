"""Pool-based query selection for the adaptive strategies, and the round loop they share.

Used by :mod:`mextract.attacks.marich` (soft labels) and
:mod:`mextract.attacks.active_learning` (hard labels). Both follow the same loop:

1. query ``initial`` random pool images, train the substitute on the answers;
2. in each round, score the pool images not yet asked under the current substitute,
   select a batch with a strategy-specific rule, query only that batch, and fine-tune
   the substitute on everything answered so far;
3. train a fresh substitute on all answered images with the experiment's recipe.

Selection is batched: one forward pass over the candidates gives softmax outputs and
penultimate features; last-layer gradient embeddings come in closed form (no
per-sample autograd), are reduced with PCA and clustered with scikit-learn's k-means.

References:

* Karmakar & Basu, NeurIPS 2023, "Marich: A Query-efficient Distributionally
  Equivalent Model Extraction Attack using Public Data" (Algorithm 1:
  EntropySampling, EntropyGradientSampling, LossSampling).
* Ash, Zhang, Krishnamurthy, Langford & Agarwal, ICLR 2020, "Deep Batch Active
  Learning by Diverse, Uncertain Gradient Lower Bounds" (BADGE): the gradient of the
  cross-entropy against the predicted label w.r.t. the last layer is
  ``(p - onehot(argmax p)) outer h``.

Query log (:mod:`mextract.querylog`, ``<workdir>/query_log.pt``): the loop saves what
it asked and the answers (pool indices, answers, round of each, per-round history)
after every round, a partial log also with the substitute's weights and the candidate
generator's state. The key is the store's (strategy, parameters, seed, pool, the API's
fingerprint) plus the substitute, the per-round recipe and the augmentation. A rerun
that finds a *complete* log with the same key reuses it without calling the API and
only trains the final substitute (``extra["queries_from_log"]``; the result reports
the logged count, ``extra["logged_queries"]``); one that finds a *partial* log resumes
after its last round and asks only the rounds left (``extra["replayed_queries"]``: the
queries taken from the partial log).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from torch import nn
from tqdm import tqdm

from mextract.attacks.base import (
    AttackContext,
    AttackResult,
    capped_budget,
    default_augment,
    fit,
)
from mextract.compute import Compute
from mextract.io import tensor_digest
from mextract.models import feature_extractor
from mextract.querylog import QueryLogStore
from mextract.train import Objective, TrainConfig, train


# ---------------------------------------------------------------- substitute outputs
def substitute_outputs(model: nn.Module, images: torch.Tensor, compute: Compute,
                       batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities (N, C), penultimate features (N, D)) of ``model`` for
    uint8 images, both float32 on the CPU; one batched pass in inference mode."""
    model = compute.prepare(model)
    was_training = model.training
    model.eval()
    body, head = feature_extractor(model)
    probs, feats = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            xb = compute.images(images[start:start + batch_size])
            with compute.autocast():
                h = body(xb)
                z = head(h)
            feats.append(h.float().cpu())
            probs.append(torch.softmax(z.float(), dim=1).cpu())
    model.train(was_training)
    if not probs:
        return torch.empty(0, head.out_features), torch.empty(0, head.in_features)
    return torch.cat(probs), torch.cat(feats)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of a probability matrix."""
    return torch.special.entr(probs.double()).sum(dim=1).float()


def _outer(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Row-wise outer products (N, C) x (N, D) -> (N, C * D), the layout of a
    ``Linear(D, C)`` weight's gradient flattened."""
    return (g[:, :, None] * h[:, None, :]).flatten(1)


def badge_embedding(probs: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Gradient of CE(z, argmax p) w.r.t. the last layer's weight (BADGE, Ash et al.
    2020), in closed form: dL/dz = p - onehot(argmax p), dL/dW = dL/dz outer h."""
    g = probs.clone()
    g[torch.arange(len(g)), probs.argmax(dim=1)] -= 1.0
    return _outer(g, feats)


def entropy_gradient_embedding(probs: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Gradient of the output entropy H(softmax(z)) w.r.t. the last layer's weight,
    in closed form: dH/dz_k = -p_k (log p_k + H), dH/dW = dH/dz outer h."""
    logp = probs.clamp_min(1e-30).log()
    g = -probs * (logp + entropy(probs)[:, None])
    return _outer(g, feats)


def reduce_dim(emb: torch.Tensor, dim: int, seed: int = 0) -> np.ndarray:
    """PCA projection of embeddings to at most ``dim`` components (0: unchanged), so
    that k-means runs on low-dimensional points."""
    x = emb.numpy().astype(np.float32, copy=False)
    k = min(dim, x.shape[0] - 1, x.shape[1])
    if dim <= 0 or k >= x.shape[1] or k < 1:
        return x
    return PCA(n_components=k, svd_solver="randomized", random_state=seed).fit_transform(x)


def round_robin_nearest(dist: np.ndarray, k: int) -> np.ndarray:
    """Distinct columns chosen by anchors in turn: the nearest column of every anchor
    (row), then the second nearest of every anchor, ..., until ``k`` distinct columns.

    ``dist``: (anchors, candidates). Returns up to ``k`` candidate positions in
    selection order. One argsort, no Python loop over candidates.
    """
    k = min(k, dist.shape[1])
    if k <= 0 or dist.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    seq = np.argsort(dist, axis=1, kind="stable").T.reshape(-1)  # rank-major order
    _, first = np.unique(seq, return_index=True)
    return seq[np.sort(first)][:k].astype(np.int64)


def kmeans_distances(x: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """k-means (k-means++ seeding, one run) on ``x``; distances (clusters, N) from every
    centroid to every point."""
    clusters = max(1, min(clusters, len(x)))
    km = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(x)
    return km.transform(x).T


def top_entropy(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` rows with the highest entropy (EntropySampling)."""
    return torch.topk(entropy(probs), min(k, len(probs))).indices


# ---------------------------------------------------------------- selection rules
@dataclass
class RoundState:
    """What a selection rule sees in one round (the attacker's side only)."""

    model: nn.Module  #: the current substitute
    pool: torch.Tensor  #: uint8 attacker pool
    candidates: torch.Tensor  #: pool indices that may be selected (not yet asked)
    probs: torch.Tensor  #: substitute softmax outputs on the candidates
    feats: torch.Tensor  #: substitute penultimate features on the candidates
    queried: torch.Tensor  #: pool indices asked so far
    answers: torch.Tensor  #: the API's answers to them
    compute: Compute
    seed: int


Select = Callable[[RoundState, int], torch.Tensor]


def per_sample_loss(model: nn.Module, images: torch.Tensor, answers: torch.Tensor,
                    compute: Compute) -> torch.Tensor:
    """Disagreement of the substitute with the victim's answers, per image: KL(victim ||
    substitute) for soft answers, cross-entropy for hard labels."""
    probs, _ = substitute_outputs(model, images, compute)
    logq = probs.clamp_min(1e-12).log()
    if answers.dtype.is_floating_point:
        p = answers.float()
        return (torch.special.xlogy(p, p) - p * logq).sum(dim=1)
    return -logq.gather(1, answers.long()[:, None]).squeeze(1)


def marich_select(state: RoundState, k: int, *, gamma1: float, gamma2: float, clusters: int,
                  embed_dim: int) -> torch.Tensor:
    """One round of MARICH (Karmakar & Basu 2023, Algorithm 1), returning ``k`` pool
    indices: EntropySampling keeps the k/(gamma1 gamma2) candidates of highest
    entropy; EntropyGradientSampling keeps gamma1 of those, chosen round-robin nearest
    to the centroids of ``clusters``-means on entropy-gradient embeddings;
    LossSampling keeps gamma2 of those (= k), chosen round-robin nearest (input-space
    L2, as in the authors' code) to the ``clusters`` answered images on which the
    substitute disagrees most with the victim."""
    n_ent = min(len(state.candidates), math.ceil(k / (gamma1 * gamma2)))
    n_grad = min(n_ent, max(k, math.ceil(k / gamma2)))
    top = top_entropy(state.probs, n_ent)
    emb = entropy_gradient_embedding(state.probs[top], state.feats[top])
    dist = kmeans_distances(reduce_dim(emb, embed_dim, state.seed), clusters, state.seed)
    grad_pos = top[torch.from_numpy(round_robin_nearest(dist, n_grad))]

    loss = per_sample_loss(state.model, state.pool[state.queried], state.answers,
                           state.compute)
    anchors = state.queried[torch.topk(loss, min(clusters, len(loss))).indices]
    cand = state.candidates[grad_pos]
    d = torch.cdist(_flat(state.pool[anchors]), _flat(state.pool[cand]))
    loss_pos = grad_pos[torch.from_numpy(round_robin_nearest(d.numpy(), k))]
    return state.candidates[loss_pos]


def badge_kmeans_select(state: RoundState, k: int, *, shortlist: float,
                        embed_dim: int) -> torch.Tensor:
    """Entropy shortlist (``shortlist`` x k candidates of highest entropy), then k-means
    with k clusters on PCA-reduced BADGE gradient embeddings; each centroid's nearest
    shortlisted image is selected (duplicates go to the next nearest)."""
    top = top_entropy(state.probs, max(k, math.ceil(k * shortlist)))
    emb = badge_embedding(state.probs[top], state.feats[top])
    dist = kmeans_distances(reduce_dim(emb, embed_dim, state.seed), k, state.seed)
    pos = torch.from_numpy(round_robin_nearest(dist, k))
    if len(pos) < k:  # fewer distinct nearest points than clusters: fill by entropy
        rest = torch.ones(len(top), dtype=torch.bool)
        rest[pos] = False
        pos = torch.cat([pos, rest.nonzero().squeeze(1)[:k - len(pos)]])
    return state.candidates[top[pos]]


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).float().div_(255.0)


# ---------------------------------------------------------------- the round loop
def round_sizes(budget: int, initial: int, rounds: int) -> list[int]:
    """Queries per step: ``initial`` random ones, then the rest split evenly over
    ``rounds`` (earlier rounds take the remainder); zero-size rounds are dropped."""
    initial = min(initial, budget)
    base, extra = divmod(budget - initial, rounds)
    sizes = [base + (1 if r < extra else 0) for r in range(rounds)]
    return [initial] + [s for s in sizes if s > 0]


def round_log_store(ctx: AttackContext, strategy: str, params: dict[str, Any],
                    round_cfg: TrainConfig) -> QueryLogStore:
    """The query-log store of a round-loop job. Besides strategy, parameters, seed,
    pool and the API's fingerprint (:mod:`mextract.querylog`), the rounds' selections
    depend on the substitute (architecture and seeded initial weights), the per-round
    training recipe and the substitute-side augmentation."""
    with torch.random.fork_rng(devices=[]):  # leave the global generator as it was
        torch.manual_seed(ctx.seed)
        sub = ctx.new_substitute()
    substitute = (f"{type(getattr(sub, 'net', sub)).__name__}:"
                  f"{sum(p.numel() for p in sub.parameters())}:"
                  f"{tensor_digest(*sub.state_dict().values())}")
    return QueryLogStore.for_context(ctx, strategy, params, substitute=substitute,
                                     round_cfg=round_cfg.as_dict(), augment=ctx.augment)


def run_rounds(ctx: AttackContext, params: dict[str, Any], *, strategy: str, kind: str,
               objective: Objective, select: Select) -> AttackResult:
    """The shared adaptive loop (see the module docstring). ``kind``: "soft" (targets
    ``p``) or "hard" (targets ``y``). Params used: budget, initial, rounds,
    round_epochs, candidates (0: score every unasked pool image each round)."""
    budget = capped_budget(ctx, strategy, int(params["budget"]))
    sizes = round_sizes(budget, int(params["initial"]), int(params["rounds"]))
    round_cfg = replace(ctx.train_cfg, epochs=int(params["round_epochs"]))
    target = "p" if kind == "soft" else "y"
    store = round_log_store(ctx, strategy, params, round_cfg)
    api_kind = "soft" if store.api.mode == "soft" else "hard"
    if api_kind != kind:
        raise ValueError(f"{strategy} needs {kind} answers; the API answers "
                         f"{store.api.description}")

    log = store.reuse()
    if log is None:
        log = _select_rounds(ctx, store, sizes, round_cfg, objective, select, kind,
                             int(params.get("candidates", 0)))
    queried, answers = log["indices"], log["answers"]
    queries = int(log["count"])
    model, final = fit(ctx, ctx.pool[queried], {target: answers}, objective, queries,
                       tag="final")
    history = list(log["history"]) + [{**row, "phase": "final"} for row in final]
    extra: dict[str, Any] = {"rounds_run": len(sizes) - 1, **store.extra(log)}
    extra["budget_requested"] = int(params["budget"])
    return AttackResult(model, queries, history, query_log=log, extra=extra)


def _one_cycle_safe(cfg: TrainConfig, n: int) -> TrainConfig:
    """``cfg``, unless its one-cycle schedule is degenerate for ``n`` examples:
    OneCycleLR divides by zero when pct_start x total steps == 1 (e.g. 2 epochs of 2
    steps at pct_start 0.25); then the warm-up is made one step longer."""
    total = cfg.epochs * max(1, math.ceil(n / cfg.batch_size))
    if total > 1 and math.isclose(cfg.pct_start * total, 1.0):
        return replace(cfg, pct_start=2.0 / total)
    return cfg


def _select_rounds(ctx: AttackContext, store: QueryLogStore, sizes: list[int],
                   round_cfg: TrainConfig, objective: Objective, select: Select, kind: str,
                   candidates: int) -> dict[str, Any]:
    """Query ``sizes[0]`` random images, then one selected batch per round; returns the
    complete query log. A partial log (with the substitute's weights and the
    candidate generator's state after the last finished round) is saved after every
    round; a rerun with the same key resumes from it and asks only the rounds left."""
    api = store.api
    strategy = store.strategy
    n_pool = len(ctx.pool)
    gen = torch.Generator().manual_seed(ctx.seed)
    target = "p" if kind == "soft" else "y"
    augment = default_augment(ctx)
    torch.manual_seed(ctx.seed)
    model = ctx.new_substitute()
    prior = store.resume()
    if prior is None:
        queried = torch.randperm(n_pool, generator=gen)[:sizes[0]]
        answers = api.query(ctx.pool[queried])
        round_of = torch.zeros(len(queried), dtype=torch.long)
        history: list[dict[str, Any]] = []
        next_round = 1
    else:
        queried, answers, round_of = prior["indices"], prior["answers"], prior["round"]
        history = list(prior["history"])
        model.load_state_dict(prior["resume"]["model"])
        gen.set_state(prior["resume"]["generator"])
        next_round = int(prior["resume"]["next_round"])

    def save(complete: bool, next_round: int) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": kind, "query_set": f"adaptive:{strategy}",
                                  "indices": queried, "answers": answers,
                                  "round": round_of, "history": history}
        if not complete:  # what a resumed job needs to continue exactly
            record["resume"] = {"model": {k: v.detach().cpu() for k, v in
                                          model.state_dict().items()},
                                "generator": gen.get_state(), "next_round": next_round}
        return store.save(record, complete=complete)

    if prior is None:
        save(False, 1)
    for r, size in enumerate(tqdm(sizes[1:], desc=f"{strategy} rounds", unit="round",
                                  mininterval=2.0), start=1):
        if r < next_round:  # done by the job whose partial log was resumed
            continue
        t0 = time.perf_counter()
        train(model, ctx.pool[queried], {target: answers}, objective,
              _one_cycle_safe(round_cfg, len(queried)), ctx.compute, seed=ctx.seed + r,
              augment=augment, desc=f"round {r}")
        t1 = time.perf_counter()
        scores = ctx.evaluate(model)
        t2 = time.perf_counter()
        history.append({"round": r - 1, "phase": "round", "queries": store.count,
                        "labelled": len(queried), "train_time_s": round(t1 - t0, 3),
                        "eval_time_s": round(t2 - t1, 3), **scores})
        free = torch.ones(n_pool, dtype=torch.bool)
        free[queried] = False
        cand = free.nonzero().squeeze(1)
        if 0 < candidates < len(cand):  # score a random subset of the unasked images
            keep = torch.randperm(len(cand), generator=gen)[:max(candidates, size)]
            cand = cand[keep.sort().values]
        probs, feats = substitute_outputs(model, ctx.pool[cand], ctx.compute)
        state = RoundState(model, ctx.pool, cand, probs, feats, queried, answers,
                           ctx.compute, ctx.seed + r)
        picked = select(state, size)
        if len(picked) != size or len(torch.unique(picked)) != size or not free[picked].all():
            raise RuntimeError(f"selection returned {len(picked)} images, expected {size} "
                               "distinct unasked pool images")
        history[-1]["select_time_s"] = round(time.perf_counter() - t2, 3)
        new = api.query(ctx.pool[picked])
        queried = torch.cat([queried, picked])
        answers = torch.cat([answers, new])
        round_of = torch.cat([round_of, torch.full((size,), r, dtype=torch.long)])
        save(False, r + 1)
    return save(True, len(sizes))
