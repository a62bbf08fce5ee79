"""The strategy registry: names, modules, query sets and parameter defaults.

Kept free of torch so that the workflow can validate a config (unknown strategy,
unknown parameter: :func:`mextract.config.param_schema` turns an entry's defaults and
limits into the JSON Schema of its ``params``) and fingerprint a strategy's code
without importing the library.
Each strategy module exposes ``run(ctx: AttackContext, params: dict) -> AttackResult``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """One registry entry (keyword-only: ``Strategy(name=..., module=..., ...)``)."""

    name: str
    module: str
    #: "soft" or "hard": the kind of answer the strategy needs; "any": either (it follows
    #: its API); None: never queries
    answers: str | None
    #: True when the strategy queries the live API inside its job (needs the victim model)
    adaptive: bool = False
    #: the shared query cache it trains from, a template filled with its parameters:
    #: "pool" = every pool image answered once; None = no shared cache
    cache: str | None = None
    #: parameter defaults; a config may set only these keys
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    #: inclusive (low, high) limits of numeric parameters; None = open. Numeric
    #: parameters without an entry must be >= 0.
    limits: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    #: the equal-budget random baseline of an adaptive selection strategy: the strategy
    #: that spends the same queries on uniformly random inputs, and the parameters it
    #: copies from this one (the workflow adds one such experiment per adaptive one)
    baseline: str | None = None
    baseline_params: tuple[str, ...] = ()

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(self.module.rsplit(".", 1)[1] + ".py")


_SELECTION_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "budget": (1, None), "rounds": (1, None), "initial": (2, None), "round_epochs": (1, None)}

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy(name="control", module="mextract.attacks.control", answers=None,
                 summary="no theft: trained on the pool's true labels, zero queries"),
        Strategy(name="kd", module="mextract.attacks.kd", answers="soft", cache="pool",
                 defaults={"temperature": 3.0},
                 summary="knowledge distillation on the victim's soft labels",
                 limits={"temperature": (1e-6, None)}),
        Strategy(name="basic", module="mextract.attacks.basic", answers="hard", cache="pool",
                 summary="cross-entropy on the victim's hard labels"),
        # ---- equal-budget random baselines of the adaptive strategies
        Strategy(name="random", module="mextract.attacks.random_queries", answers="any",
                 adaptive=True, defaults={"budget": 1000, "temperature": 3.0},
                 summary="uniformly random pool images up to the budget (KD on soft "
                         "answers, cross-entropy on hard labels)",
                 limits={"budget": (1, None), "temperature": (1e-6, None)}),
        Strategy(name="random_boundary", module="mextract.attacks.random_boundary",
                 answers="hard", adaptive=True, cache="pool",
                 defaults={"pairs": 1000, "steps": 10, "pair_seed": 0},
                 summary="boundary's pairs and budget, at uniformly random points of each "
                         "segment instead of a binary search",
                 limits={"steps": (1, 30), "pairs": (1, None)}),
        # ---- Stage 1: soft labels
        Strategy(name="random_erasing", module="mextract.attacks.random_erasing",
                 answers="soft", cache="pool",
                 defaults={"temperature": 3.0, "p": 0.5, "scale_min": 0.02, "scale_max": 0.33},
                 summary="KD on RandomErasing copies of the clean, answered images",
                 limits={"p": (0, 1), "scale_min": (0, 1), "scale_max": (0, 1),
                         "temperature": (1e-6, None)}),
        Strategy(name="marich", module="mextract.attacks.marich", answers="soft", adaptive=True,
                 defaults={"budget": 4785, "rounds": 8, "initial": 500, "temperature": 3.0,
                           "gamma1": 0.8, "gamma2": 0.8, "clusters": 10, "round_epochs": 3,
                           "embed_dim": 32, "candidates": 0},
                 summary="MARICH: entropy, gradient-embedding k-means and loss-based selection",
                 limits={**_SELECTION_LIMITS, "temperature": (1e-6, None),
                         "gamma1": (0.01, 1), "gamma2": (0.01, 1), "clusters": (1, None)},
                 baseline="random", baseline_params=("budget", "temperature")),
        Strategy(name="spsg", module="mextract.attacks.spsg", answers="soft", adaptive=True,
                 defaults={"budget": 3203, "n_segments": 16, "compactness": 10.0,
                           "epsilon": 0.1, "temperature": 3.0, "grad_weight": 0.1,
                           "purify": 0.1, "rounds": 4, "kd_perturbed": True,
                           "probe_share": 0.1},
                 summary="SPSG: superpixel sample gradients from forward differences",
                 limits={"budget": (1, None), "n_segments": (2, 255),
                         "compactness": (1e-6, None), "epsilon": (1 / 255, 0.5),
                         "temperature": (1e-6, None), "purify": (0, 1), "rounds": (1, None),
                         "probe_share": (0, 1)},
                 baseline="random", baseline_params=("budget", "temperature")),
        # ---- Stage 2: hard labels
        Strategy(name="augmentation", module="mextract.attacks.augmentation", answers="hard",
                 cache="views-k{views}-s{view_seed}", defaults={"views": 2, "view_seed": 0},
                 summary="K seeded augmented views (flip, crop, rotation) of each pool image",
                 limits={"views": (1, None)}),
        Strategy(name="boundary", module="mextract.attacks.boundary", answers="hard",
                 adaptive=True, cache="pool",
                 defaults={"pairs": 1000, "steps": 10, "pair_seed": 0},
                 summary="binary search for label flips between pool images of different labels",
                 limits={"steps": (1, 30), "pairs": (1, None)},
                 baseline="random_boundary", baseline_params=("pairs", "steps", "pair_seed")),
        Strategy(name="active_learning", module="mextract.attacks.active_learning",
                 answers="hard", adaptive=True,
                 defaults={"budget": 3000, "rounds": 6, "initial": 500, "shortlist": 4.0,
                           "round_epochs": 2, "embed_dim": 32, "candidates": 10000},
                 summary="MARICH-style active learning on hard labels",
                 limits={**_SELECTION_LIMITS, "shortlist": (1, None)},
                 baseline="random", baseline_params=("budget",)),
        Strategy(name="mixup", module="mextract.attacks.mixup", answers="hard", cache="pool",
                 defaults={"alpha": 1.0},
                 summary="mixup of pool images with the API's labels (no extra queries)",
                 limits={"alpha": (1e-6, None)}),
        # ---- beyond the study: attacks from the literature (live API, any attacker pool)
        Strategy(name="knockoff", module="mextract.attacks.knockoff", answers="any",
                 adaptive=True,
                 defaults={"budget": 1000, "temperature": 1.0, "sampling": "random"},
                 summary="KnockoffNets, random: uniformly random pool images up to the "
                         "budget (KD at temperature 1 = soft-label cross-entropy)",
                 limits={"budget": (1, None), "temperature": (1e-6, None)}),
        Strategy(name="knockoff_adaptive", module="mextract.attacks.knockoff",
                 answers="soft", adaptive=True,
                 defaults={"budget": 1000, "temperature": 1.0, "sampling": "adaptive",
                           "arms": 10, "step_size": 20, "bandit_lr": 0.5,
                           "reward": "all", "window": 100, "sgd_steps": 1},
                 summary="KnockoffNets, adaptive: a gradient bandit over k-means arms of "
                         "the pool, rewarded by certainty, diversity and loss",
                 limits={"budget": (1, None), "temperature": (1e-6, None),
                         "arms": (1, None), "step_size": (1, None),
                         "bandit_lr": (1e-9, None), "window": (1, None)},
                 baseline="knockoff", baseline_params=("budget", "temperature")),
        Strategy(name="jbda", module="mextract.attacks.jbda", answers="any", adaptive=True,
                 defaults={"budget": 1200, "seed_size": 150, "step": 0.1, "tau": 0,
                           "round_epochs": 5, "variant": "jbda", "temperature": 3.0},
                 summary="JBDA: a seed set grown by Jacobian-based augmentation "
                         "(variant jbda_tr: towards random target classes)",
                 limits={"budget": (2, None), "seed_size": (2, None),
                         "step": (1 / 255, 1), "round_epochs": (1, None),
                         "temperature": (1e-6, None)}),
        Strategy(name="dfme", module="mextract.attacks.dfme", answers="soft", adaptive=True,
                 defaults={"budget": 20_000_000, "batch_size": 256, "m": 1, "eps": 0.5,
                           "g_iter": 1, "d_iter": 5, "lr_s": 0.1, "lr_g": 1e-4,
                           "nz": 256, "ngf": 64},
                 summary="DFME: data-free, a generator against the student, the victim's "
                         "gradient from forward differences",
                 limits={"budget": (1, None), "batch_size": (2, None), "m": (1, None),
                         "eps": (1e-6, None), "g_iter": (1, None), "d_iter": (1, None),
                         "lr_s": (1e-9, None), "lr_g": (1e-9, None), "nz": (1, None),
                         "ngf": (1, None)}),
    ]
}


def query_set(strategy: str, params: dict[str, Any]) -> str | None:
    """Name of the shared query cache a strategy trains from (None: none)."""
    s = get(strategy)
    if s.cache is None:
        return None
    return s.cache.format(**{**s.defaults, **params})


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


def load(name: str) -> Any:
    """Import and return the strategy's module (it has ``run``)."""
    return importlib.import_module(get(name).module)
