"""MARICH (Karmakar & Basu, NeurIPS 2023, "Marich: A Query-efficient Distributionally
Equivalent Model Extraction Attack using Public Data"), on the victim's soft labels.

Algorithm 1 of the paper, in rounds until the query budget is spent: query
``initial`` random pool images and train the substitute; then in each round

1. EntropySampling: the k / (gamma1 gamma2) unasked pool images on which the current
   substitute's output entropy is highest;
2. EntropyGradientSampling: k-means (``clusters`` centroids) on gradient embeddings of
   that entropy; keep the k / gamma2 images nearest to the centroids, round-robin;
3. LossSampling: the ``clusters`` answered images where substitute and victim disagree
   most (KL divergence); keep the k images nearest to them, round-robin;

query only those k images and fine-tune the substitute (``round_epochs`` epochs of KD
at temperature ``temperature``) on everything answered. The final substitute is
trained afresh on all answered images with the experiment's recipe
(:func:`mextract.attacks.base.fit`, KD loss, :func:`mextract.train.distillation`).

Differences from the paper and the authors' code: soft labels with a KD loss (the
paper trains on labels); the entropy gradient is taken w.r.t. the last linear layer
in closed form (dH/dz_k = -p_k (log p_k + H), outer the penultimate features) and
PCA-reduced to ``embed_dim`` before k-means, instead of autograd gradients w.r.t. the
input image; the round size is fixed by the budget (the authors grow it 1% per round)
and every round selects exactly its share; per-round training is a short fine-tune
plus one full training at the end, instead of ``epochs`` per round; ``candidates`` > 0
scores only a random subset of the unasked pool per round (default 0: all of it). See
:mod:`mextract.attacks.selection` for the shared loop and the query log.
"""

from __future__ import annotations

from typing import Any

import torch

from mextract.attacks.base import AttackContext, AttackResult
from mextract.attacks.selection import RoundState, marich_select, run_rounds
from mextract.train import distillation


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    def select(state: RoundState, k: int) -> torch.Tensor:
        return marich_select(state, k, gamma1=float(params["gamma1"]),
                             gamma2=float(params["gamma2"]), clusters=int(params["clusters"]),
                             embed_dim=int(params["embed_dim"]))

    return run_rounds(ctx, params, strategy="marich", kind="soft",
                      objective=distillation(float(params["temperature"])), select=select)
