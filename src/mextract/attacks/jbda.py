"""JBDA: Jacobian-based dataset augmentation (Papernot, McDaniel, Goodfellow, Jha,
Celik & Swami, AsiaCCS 2017, "Practical Black-Box Attacks against Machine Learning",
Algorithm 1), and its JBDA-TR variant.

A small seed set (``seed_size`` pool images drawn uniformly, seeded) is answered by
the victim; then, while the budget lasts, each *substitute epoch* rho

1. trains a fresh substitute on everything answered so far (``round_epochs`` epochs
   of the experiment's recipe, :func:`mextract.attacks.base.fit`);
2. makes one synthetic image per answered one, and asks the victim about all of them
   (the set doubles):

   * ``variant: jbda`` (the paper): x + lambda_rho * sign(dF_O(x)/dx), the sign of
     the substitute's Jacobian row for the victim's label O(x) (F = softmax output):
     a step towards the victim's decision boundary region where the substitute's
     output for that class changes most;
   * ``variant: jbda_tr``: x - lambda_rho * sign(d CE(F(x), t)/dx), a targeted FGSM
     step towards a class t drawn uniformly among the others (the "targeted random"
     Jacobian augmentation T-RND of Juuti, Szyller, Marchal & Asokan, "PRADA:
     Protecting against DNN Model Stealing Attacks", EuroS&P 2019, called JBDA-TR by
     Orekondy et al., "Prediction Poisoning", ICLR 2020; one step instead of PRADA's
     iterated FGSM).

   lambda_rho = ``step`` * (-1)^floor(rho / tau) with ``tau`` > 0 (the paper's periodic
   step size), a constant ``step`` with ``tau: 0`` (the default of the reference
   implementation, github.com/tribhuvanesh/prediction-poisoning,
   ``defenses/adversary/jacobian.py``, whose per-round training from scratch this
   follows too). Synthetic images are clipped to [0, 1] and rounded to 8 bits, as any
   API query.

The last augmentation is cut to the queries left (a seeded random subset, as the
reference cuts its last augmentation to the budget), so exactly ``budget`` queries are
asked, every synthetic image counted by the API. The final substitute is trained
afresh on all answered images with the experiment's recipe: cross-entropy on hard
labels (the paper), KD at ``temperature`` on soft answers. Jacobians are taken in one
batched autograd call per chunk of images (the substitute in eval mode), not per
image. The query log holds the images (they are synthetic, not pool indices), the
answers and each image's round; a rerun with the same key asks nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mextract.api import quantize
from mextract.attacks.base import AttackContext, AttackResult, fit
from mextract.attacks.random_queries import draw
from mextract.attacks.selection import round_log_store
from mextract.compute import Compute
from mextract.train import Batch, Objective, cross_entropy, distillation

VARIANTS = ("jbda", "jbda_tr")
#: images per autograd call of the augmentation
CHUNK = 512


def step_size(step: float, tau: int, rho: int) -> float:
    """lambda_rho: ``step`` with the sign flipped every ``tau`` substitute epochs
    (tau = 0: never)."""
    return step * (-1.0) ** (rho // tau) if tau > 0 else step


def augment(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lam: float,
            variant: str, compute: Compute, gen: torch.Generator) -> torch.Tensor:
    """One synthetic uint8 image per image (see the module docstring); ``labels`` are
    the victim's (arg-max) labels, ``gen`` draws JBDA-TR's target classes."""
    if variant not in VARIANTS:
        raise ValueError(f"jbda: variant must be one of {VARIANTS}, got {variant!r}")
    model.eval()
    out = []
    for start in range(0, len(images), CHUNK):
        x = compute.images(images[start:start + CHUNK]).requires_grad_(True)
        y = labels[start:start + CHUNK].to(x.device)
        logits = model(x).float()
        if variant == "jbda":
            objective = torch.softmax(logits, 1).gather(1, y[:, None]).sum()
            sign = 1.0
        else:
            classes = logits.shape[1]
            shift = torch.randint(1, classes, (len(y),), generator=gen).to(y.device)
            objective = F.cross_entropy(logits, (y + shift) % classes, reduction="sum")
            sign = -1.0
        (grad,) = torch.autograd.grad(objective, x)
        out.append(quantize((x.detach() + sign * lam * grad.sign()).cpu()))
    return torch.cat(out)


def _targets(answers: torch.Tensor, kind: str, temperature: float,
             smoothing: float) -> tuple[Batch, Objective]:
    if kind == "soft":
        return {"p": answers.float()}, distillation(temperature)
    return {"y": answers.long()}, cross_entropy(smoothing)


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    budget = int(params["budget"])
    variant = str(params["variant"])
    if variant not in VARIANTS:
        raise ValueError(f"jbda: variant must be one of {VARIANTS}, got {variant!r}")
    temperature = float(params["temperature"])
    smoothing = ctx.train_cfg.label_smoothing
    round_cfg = replace(ctx.train_cfg, epochs=int(params["round_epochs"]))
    store = round_log_store(ctx, "jbda", params, round_cfg)
    log = store.reuse()
    if log is None:
        api = store.api
        kind = "soft" if api.mode == "soft" else "hard"
        seed_idx = draw(len(ctx.pool), min(int(params["seed_size"]), budget), ctx.seed)
        images = ctx.pool[seed_idx]
        answers = api.query(images)
        rounds = torch.zeros(len(images), dtype=torch.int64)
        gen = torch.Generator().manual_seed(ctx.seed)
        rho = 0
        while len(images) < budget:
            targets, objective = _targets(answers, kind, temperature, smoothing)
            model, _ = fit(ctx, images, targets, objective, store.count, cfg=round_cfg,
                           tag=f"jbda-round{rho}", evaluate=False)
            labels = answers.argmax(1) if kind == "soft" else answers.long()
            lam = step_size(float(params["step"]), int(params["tau"]), rho)
            new = augment(model, images, labels, lam, variant, ctx.compute, gen)
            left = budget - len(images)
            if len(new) > left:  # the last augmentation: a random subset fits the budget
                new = new[torch.randperm(len(new), generator=gen)[:left].sort().values]
            rho += 1
            images = torch.cat([images, new])
            answers = torch.cat([answers, api.query(new)])
            rounds = torch.cat([rounds, torch.full((len(new),), rho, dtype=torch.int64)])
        log = store.save({"kind": kind, "query_set": f"jbda-{variant}", "images": images,
                          "answers": answers, "round": rounds}, complete=True)
    queries = int(log["count"])
    targets, objective = _targets(log["answers"], log["kind"], temperature, smoothing)
    model, history = fit(ctx, log["images"], targets, objective, queries)
    sizes = torch.bincount(log["round"]).tolist()
    return AttackResult(model, queries, history, query_log=log,
                        extra={**store.extra(log), "answers": log["kind"],
                               "variant": variant, "substitute_epochs": len(sizes) - 1,
                               "round_sizes": sizes})
