"""What every strategy receives and returns."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mextract.api import VictimAPI
from mextract.augment import crop_flip
from mextract.compute import Compute
from mextract.queries import cache_images
from mextract.train import Augment, Batch, Objective, TrainConfig, train


@dataclass
class AttackContext:
    """Everything an attack may use. The attacker never sees the victim's weights or
    the pool's true labels (``pool_labels`` is only for the no-theft control)."""

    pool: torch.Tensor  #: uint8 attacker pool images (N, 3, H, W)
    num_classes: int
    new_substitute: Callable[[], nn.Module]
    train_cfg: TrainConfig
    compute: Compute
    evaluate: Callable[[nn.Module], dict[str, float]]
    seed: int = 0
    #: shared query cache (non-adaptive strategies): see mextract.queries
    cache: dict[str, Any] | None = None
    #: the live API (adaptive strategies only)
    api: VictimAPI | None = None
    pool_labels: torch.Tensor | None = None
    #: folder for checkpoints and query logs of this experiment
    workdir: Path = field(default_factory=lambda: Path("."))
    #: substitute-side augmentation of training images: "crop_flip" or "none"
    augment: str = "crop_flip"

    def checkpoint(self, tag: str = "train") -> Path:
        return self.workdir / f"checkpoint-{tag}.pt"


@dataclass
class AttackResult:
    model: nn.Module
    #: queries answered by the API for this experiment (the API's / cache's own count)
    queries: int
    #: per-epoch (or per-round) rows: epoch, loss, queries, test_accuracy, fidelity
    history: list[dict[str, Any]]
    #: adaptive strategies: what was asked and answered, saved as a cache file
    query_log: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_augment(ctx: AttackContext) -> Augment:
    """The substitute recipe's augmentation of (already answered) training images."""
    if ctx.augment == "none":
        return lambda xb, gen: ctx.compute.images(xb)
    if ctx.augment == "crop_flip":
        return lambda xb, gen: crop_flip(ctx.compute.images(xb), gen)
    raise ValueError(f"unknown substitute augment {ctx.augment!r} (crop_flip, none)")


def fit(ctx: AttackContext, inputs: torch.Tensor, targets: Batch, objective: Objective,
        queries: int, *, augment: Augment | None = None, tag: str = "train",
        cfg: TrainConfig | None = None, model: nn.Module | None = None,
        evaluate: bool = True) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a fresh substitute (or ``model``) with the experiment's recipe; ``augment``
    defaults to the recipe's substitute-side augmentation."""
    if model is None:
        torch.manual_seed(ctx.seed)
        model = ctx.new_substitute()
    history = train(model, inputs, targets, objective, cfg or ctx.train_cfg, ctx.compute,
                    seed=ctx.seed, augment=augment or default_augment(ctx),
                    evaluate=ctx.evaluate if evaluate else None,
                    checkpoint=ctx.checkpoint(tag), desc=tag,
                    extra_log={"queries": queries})
    return model, history


def capped_budget(ctx: AttackContext, strategy: str, budget: int) -> int:
    """What a pool-selection strategy (each pool image asked at most once) can spend:
    ``budget``, or the pool's size when that is smaller, with a warning in the job's log
    (its stderr); the metrics keep ``budget_requested`` beside the queries spent."""
    n = len(ctx.pool)
    if budget > n:
        print(f"WARNING: {strategy}: params.budget = {budget} exceeds the attacker pool of "
              f"{n} images; spending {n} (metrics: budget_requested, queries)",
              file=sys.stderr)
    return min(budget, n)


def require_cache(ctx: AttackContext, kind: str) -> dict[str, Any]:
    if ctx.cache is None:
        raise ValueError("this strategy trains from a shared query cache, but none was given")
    if ctx.cache["kind"] != kind:
        raise ValueError(f"this strategy needs {kind} answers; the cache holds "
                         f"{ctx.cache['kind']} answers ({ctx.cache.get('api')})")
    return ctx.cache


def cache_inputs(ctx: AttackContext, cache: dict[str, Any]) -> torch.Tensor:
    """The images the cache's answers belong to."""
    return cache_images(ctx.pool, cache)
