"""KnockoffNets (Orekondy, Schiele & Fritz, CVPR 2019, "Knockoff Nets: Stealing
Functionality of Black-Box Models"): query images of an attacker pool that need not
come from the victim's distribution, train a "knockoff" on the answers.

Two registry entries share this module, told apart by the ``sampling`` parameter:

* ``knockoff`` (``sampling: random``): ``budget`` distinct pool images drawn uniformly
  (the paper's *random* strategy), asked in one call;
* ``knockoff_adaptive`` (``sampling: adaptive``): the paper's *adaptive* strategy
  (Sect. 4.1.2), a gradient bandit over the arms of a hierarchy of the pool. The
  paper's arms are the pool's (ImageNet) classes; this pool has no labels, so the arms
  are ``arms`` k-means clusters (scikit-learn) of the pool images downsampled to 8x8
  pixels. Each step draws ``step_size`` arms from the policy pi = softmax(H), one
  unasked image from each drawn arm (uniformly), asks them in one call, and scores
  each answer with the paper's rewards:

  - certainty: the answer's top-1 minus top-2 probability;
  - diversity: sum_k max(0, y_k - mean of y_k over the last ``window`` answers);
  - loss: the cross-entropy of the online knockoff's prediction against the answer
    (before it has trained on it);

  ``reward: all`` (default) sums the three after scaling each to [0, 1] by the
  minimum and maximum it has taken so far (the paper sums them; the loss is unbounded,
  hence the scaling). The preferences follow Sutton & Barto's gradient bandit
  (Reinforcement Learning, 2nd ed., Sect. 2.8), averaged over a step's draws:
  H_a += bandit_lr * mean_i (r_i - r_mean) (1[a = a_i] - pi_a), with r_mean the mean of
  all earlier rewards. An arm with no unasked image left is masked out of pi. After
  each step the online knockoff (the experiment's substitute architecture) takes
  ``sgd_steps`` SGD steps of KD on random batches of everything answered. Its
  equal-budget baseline (added by the workflow) is ``knockoff``, the paper's random
  strategy on the same pool.

Both variants then train the final substitute afresh on every answered image with
the experiment's recipe (:func:`mextract.attacks.base.fit`): KD at ``temperature``
on soft answers (the paper's soft-label cross-entropy is KD at temperature 1, the
default), cross-entropy on hard labels (``knockoff`` only; the adaptive rewards need
probabilities). Queries: exactly ``budget``, counted by the API; a budget larger than
the pool is refused before anything is asked. The query log (pool indices, answers,
the final policy) is reused by a rerun with the same key (:mod:`mextract.querylog`);
a killed adaptive job starts again (no partial logs).

The reference implementation (github.com/tribhuvanesh/knockoffnets) ships only the
random adversary (its ``adversary/adaptive.py`` samples at random); the adaptive
strategy here follows the paper's text. Differences: clusters instead of class
labels as arms, a one-level hierarchy, batched steps, and the [0, 1] scaling.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from mextract.attacks.base import AttackContext, AttackResult
from mextract.attacks.random_queries import draw, fit_answers
from mextract.attacks.selection import round_log_store
from mextract.querylog import QueryLogStore
from mextract.train import kd_loss

SAMPLING = ("random", "adaptive")
REWARDS = ("all", "cert", "div", "loss")


# --------------------------------------------------------------------- the bandit
class GradientBandit:
    """Sutton & Barto's gradient bandit over ``arms`` arms (preferences H, softmax
    policy, the mean of all earlier rewards as baseline), seeded."""

    def __init__(self, arms: int, lr: float, seed: int = 0) -> None:
        self.preferences = torch.zeros(arms, dtype=torch.float64)
        self.lr = float(lr)
        self.mean_reward = 0.0
        self.seen = 0
        self.gen = torch.Generator().manual_seed(int(seed))

    def policy(self, available: torch.Tensor | None = None) -> torch.Tensor:
        """pi = softmax(H) over the arms where ``available`` (bool) is True."""
        h = self.preferences
        if available is not None:
            h = h.masked_fill(~available, float("-inf"))
        return torch.softmax(h, dim=0)

    def draw(self, available: torch.Tensor | None = None) -> int:
        return int(torch.multinomial(self.policy(available), 1, generator=self.gen))

    def update(self, arms: torch.Tensor, rewards: torch.Tensor,
               available: torch.Tensor | None = None) -> None:
        """One step with draws ``arms`` (int64 [B]) and their ``rewards`` ([B])."""
        rewards = rewards.double()
        pi = self.policy(available)
        advantage = rewards - self.mean_reward
        onehot = F.one_hot(arms.long(), len(self.preferences)).double()
        grad = (advantage[:, None] * (onehot - pi[None])).mean(0)
        self.preferences += self.lr * torch.nan_to_num(grad)
        total = self.mean_reward * self.seen + float(rewards.sum())
        self.seen += len(rewards)
        self.mean_reward = total / self.seen


def pool_arms(pool: torch.Tensor, arms: int, seed: int) -> np.ndarray:
    """k-means cluster (0..arms-1) of each pool image, on 8x8 average-pooled pixels."""
    small = F.adaptive_avg_pool2d(pool.float() / 255.0, 8).flatten(1).numpy()
    k = min(int(arms), len(pool))
    return KMeans(n_clusters=k, n_init=3, random_state=int(seed)).fit_predict(small)


def rewards(answers: torch.Tensor, predicted: torch.Tensor,
            history: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's three rewards of soft ``answers`` [B, C]: certainty (top-1 minus
    top-2), diversity against the mean of ``history`` (earlier answers; the batch's own
    mean when there are none) and the loss of ``predicted`` (the knockoff's
    probabilities) against the answers."""
    top2 = answers.topk(2, dim=1).values
    recent = history if len(history) else answers
    div = (answers - recent.mean(0, keepdim=True)).clamp_min(0).sum(1)
    loss = -(answers * predicted.clamp_min(1e-12).log()).sum(1)
    return {"cert": top2[:, 0] - top2[:, 1], "div": div, "loss": loss}


class RewardScale:
    """Each reward scaled to [0, 1] by the minimum and maximum it has taken so far."""

    def __init__(self) -> None:
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def __call__(self, parts: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        names = list(parts) if which == "all" else [which]
        total = torch.zeros_like(parts[names[0]], dtype=torch.float64)
        for name in names:
            r = parts[name].double()
            self.low[name] = min(self.low.get(name, float("inf")), float(r.min()))
            self.high[name] = max(self.high.get(name, float("-inf")), float(r.max()))
            span = self.high[name] - self.low[name]
            total += (r - self.low[name]) / span if span > 0 else torch.zeros_like(r)
        return total


# --------------------------------------------------------------------- strategies
def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    sampling = str(params.get("sampling", "random"))
    if sampling not in SAMPLING:
        raise ValueError(f"knockoff: sampling must be one of {SAMPLING}, got {sampling!r}")
    if sampling == "random":
        store = QueryLogStore.for_context(ctx, "knockoff", params)
        log = store.reuse()
        if log is None:
            indices = draw(len(ctx.pool), int(params["budget"]), ctx.seed)
            kind = "soft" if store.api.mode == "soft" else "hard"
            log = store.save({"kind": kind, "query_set": "knockoff-random", "indices": indices,
                              "answers": store.api.query(ctx.pool[indices])}, complete=True)
    else:
        if "step_size" not in params:
            raise ValueError("knockoff: adaptive sampling is the strategy knockoff_adaptive")
        store, log = adaptive(ctx, params)
    queries = int(log["count"])
    model, history = fit_answers(ctx, ctx.pool[log["indices"]], log["answers"], log["kind"],
                                 float(params["temperature"]), queries)
    extra = {**store.extra(log), "answers": log["kind"], "sampling": sampling}
    if "policy" in log:
        extra["arm_policy"] = [round(float(p), 4) for p in log["policy"]]
        extra["arm_counts"] = log["arm_counts"].tolist()
    return AttackResult(model, queries, history, query_log=log, extra=extra)


def adaptive(ctx: AttackContext, params: dict[str, Any]
             ) -> tuple[QueryLogStore, dict[str, Any]]:
    """The bandit's queries (see the module docstring): (store, complete log)."""
    budget, step = int(params["budget"]), int(params["step_size"])
    which = str(params["reward"])
    if which not in REWARDS:
        raise ValueError(f"knockoff: reward must be one of {REWARDS}, got {which!r}")
    if budget > len(ctx.pool):
        raise ValueError(f"knockoff: a budget of {budget} distinct images exceeds the pool "
                         f"of {len(ctx.pool)} images")
    online_cfg = replace(ctx.train_cfg, epochs=1)
    store = round_log_store(ctx, "knockoff", params, online_cfg)
    log = store.reuse()
    if log is not None:
        return store, log
    api = store.api
    if api.mode != "soft":
        raise ValueError("knockoff adaptive sampling needs soft answers (its rewards are "
                         f"probabilities); the API gives {api.description}")
    device = ctx.compute.torch_device
    arm_of = pool_arms(ctx.pool, int(params["arms"]), ctx.seed)
    n_arms = int(arm_of.max()) + 1
    rng = np.random.default_rng(ctx.seed)
    members = [list(rng.permutation(np.flatnonzero(arm_of == a))) for a in range(n_arms)]
    bandit = GradientBandit(n_arms, float(params["bandit_lr"]), ctx.seed)
    scale = RewardScale()
    torch.manual_seed(ctx.seed)
    model = ctx.compute.prepare(ctx.new_substitute())
    opt = torch.optim.SGD(model.parameters(), lr=online_cfg.lr, momentum=online_cfg.momentum,
                          weight_decay=online_cfg.weight_decay)
    gen = torch.Generator().manual_seed(ctx.seed)
    temperature = float(params["temperature"])
    asked: list[int] = []
    answers: list[torch.Tensor] = []
    window = int(params["window"])
    while len(asked) < budget:
        arms, picks = [], []
        at_start = torch.tensor([len(m) > 0 for m in members])
        for _ in range(min(step, budget - len(asked))):
            a = bandit.draw(torch.tensor([len(m) > 0 for m in members]))
            arms.append(a)
            picks.append(int(members[a].pop()))
        idx = torch.tensor(picks)
        x = ctx.pool[idx]
        model.eval()
        with torch.no_grad():
            predicted = torch.softmax(model(ctx.compute.images(x.to(device))).float(), 1).cpu()
        y = api.query(x)
        history = torch.cat(answers)[-window:] if answers else torch.empty(0, y.shape[1])
        r = scale(rewards(y, predicted, history), which)
        bandit.update(torch.tensor(arms), r, at_start)
        asked += picks
        answers.append(y)
        # online knockoff: a few KD steps on random batches of everything answered
        x_all, y_all = ctx.pool[torch.tensor(asked)], torch.cat(answers)
        model.train()
        for _ in range(int(params["sgd_steps"])):
            b = torch.randperm(len(asked), generator=gen)[:online_cfg.batch_size]
            if len(b) < 2:
                break
            loss = kd_loss(model(ctx.compute.images(x_all[b].to(device))),
                           y_all[b].to(device), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    indices = torch.tensor(asked)
    counts = torch.bincount(torch.from_numpy(arm_of)[indices], minlength=n_arms)
    log = store.save({"kind": "soft", "query_set": "knockoff-adaptive", "indices": indices,
                      "answers": torch.cat(answers), "policy": bandit.policy(),
                      "arm_counts": counts, "arms": torch.from_numpy(arm_of)}, complete=True)
    return store, log
