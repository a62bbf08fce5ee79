"""MARICH-style active learning on hard labels (the reference study's Stage-2
"active learning": entropy selection plus k-means on gradient embeddings for
diversity; Karmakar & Basu, NeurIPS 2023, "Marich: A Query-efficient Distributionally
Equivalent Model Extraction Attack using Public Data", with the gradient embeddings
of Ash et al., ICLR 2020, "Deep Batch Active Learning by Diverse, Uncertain Gradient
Lower Bounds" (BADGE)).

Query ``initial`` random pool images, train the substitute; then in each round shortlist
the ``shortlist`` x k unasked pool images of highest substitute entropy, embed them by
the last-layer gradient of the cross-entropy against the predicted label, in closed
form ((softmax p - onehot(argmax p)) outer penultimate features), reduce to
``embed_dim`` with PCA, run k-means with k clusters and query the image nearest each
centroid; fine-tune on everything answered (``round_epochs`` epochs, cross-entropy).
The final substitute is trained afresh on all answered labels with the experiment's
recipe.

Differences: the study's implementation (3-4 hours for 3,000 queries) computed
per-sample gradients; here every step is batched (one forward pass over the
candidates per round, closed-form embeddings, k-means on low-dimensional points).
``candidates`` > 0 (default 10,000) scores only a random subset of the unasked pool
per round, as Yoo & Kweon (CVPR 2019, "Learning Loss for Active Learning") do; 0
scores the whole pool. Unlike MARICH proper (:mod:`mextract.attacks.marich`) there is
no loss-based sampling step, and the k-means has one cluster per query (BADGE-like)
rather than a few clusters sampled round-robin. See :mod:`mextract.attacks.selection`.
"""

from __future__ import annotations

from typing import Any

import torch

from mextract.attacks.base import AttackContext, AttackResult
from mextract.attacks.selection import RoundState, badge_kmeans_select, run_rounds
from mextract.train import cross_entropy


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    def select(state: RoundState, k: int) -> torch.Tensor:
        return badge_kmeans_select(state, k, shortlist=float(params["shortlist"]),
                                   embed_dim=int(params["embed_dim"]))

    return run_rounds(ctx, params, strategy="active_learning", kind="hard",
                      objective=cross_entropy(ctx.train_cfg.label_smoothing), select=select)
