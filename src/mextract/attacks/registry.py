"""The strategy registry: names, modules, query sets and parameter defaults.

Kept free of torch so that the workflow can validate a config (unknown strategy,
unknown parameter) and fingerprint a strategy's code without importing the library.
Each strategy module exposes ``run(ctx: AttackContext, params: dict) -> AttackResult``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Strategy:
    name: str
    module: str
    #: "soft" or "hard": the kind of answer the strategy needs; None: never queries
    answers: str | None
    #: True when the strategy queries the API inside its loop (needs the victim model)
    adaptive: bool
    #: the shared query cache it trains from, a template filled with its parameters:
    #: "pool" = every pool image answered once; None = no shared cache
    cache: str | None = None
    #: parameter defaults; a config may set only these keys
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    #: inclusive (low, high) limits of numeric parameters; None = open. Numeric
    #: parameters without an entry must be >= 0.
    limits: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(self.module.rsplit(".", 1)[1] + ".py")


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("control", "mextract.attacks.control", None, False, None, {},
                 "no theft: trained on the pool's true labels, zero queries"),
        Strategy("kd", "mextract.attacks.kd", "soft", False, "pool", {"temperature": 3.0},
                 "knowledge distillation on the victim's soft labels"),
        Strategy("basic", "mextract.attacks.basic", "hard", False, "pool", {},
                 "cross-entropy on the victim's hard labels"),
        # ---- Stage 1: soft labels
        Strategy("random_erasing", "mextract.attacks.random_erasing", "soft", False, "pool",
                 {"temperature": 3.0, "p": 0.5, "scale_min": 0.02, "scale_max": 0.33},
                 "KD on RandomErasing copies of the clean, answered images",
                 limits={"p": (0, 1), "scale_min": (0, 1), "scale_max": (0, 1)}),
        Strategy("marich", "mextract.attacks.marich", "soft", True, None,
                 {"budget": 4785, "rounds": 8, "initial": 500, "temperature": 3.0,
                  "gamma1": 0.8, "gamma2": 0.8, "clusters": 10, "round_epochs": 3,
                  "embed_dim": 32, "candidates": 0},
                 "MARICH: entropy, gradient-embedding k-means and loss-based selection",
                 limits={"budget": (1, None), "rounds": (1, None), "initial": (2, None),
                         "temperature": (1e-6, None), "gamma1": (0.01, 1), "gamma2": (0.01, 1),
                         "clusters": (1, None), "round_epochs": (1, None)}),
        Strategy("spsg", "mextract.attacks.spsg", "soft", True, None,
                 {"budget": 3203, "n_segments": 16, "compactness": 10.0, "epsilon": 0.1,
                  "temperature": 3.0, "grad_weight": 1.0, "purify": 0.1, "rounds": 4,
                  "kd_perturbed": True},
                 "SPSG: superpixel sample gradients from forward differences",
                 limits={"budget": (1, None), "n_segments": (2, 255),
                         "compactness": (1e-6, None), "epsilon": (1 / 255, 0.5),
                         "temperature": (1e-6, None), "purify": (0, 1),
                         "rounds": (1, None)}),
        # ---- Stage 2: hard labels
        Strategy("augmentation", "mextract.attacks.augmentation", "hard", False,
                 "views-k{views}-s{view_seed}", {"views": 2, "view_seed": 0},
                 "K seeded augmented views (flip, crop, rotation) of each pool image",
                 limits={"views": (1, None)}),
        Strategy("boundary", "mextract.attacks.boundary", "hard", True, "pool",
                 {"pairs": 1000, "steps": 10, "pair_seed": 0},
                 "binary search for label flips between pool images of different labels",
                 limits={"steps": (1, 30), "pairs": (1, None)}),
        Strategy("active_learning", "mextract.attacks.active_learning", "hard", True, None,
                 {"budget": 3000, "rounds": 6, "initial": 500, "shortlist": 4.0,
                  "round_epochs": 2, "embed_dim": 32, "candidates": 10000},
                 "MARICH-style active learning on hard labels",
                 limits={"budget": (1, None), "rounds": (1, None), "initial": (2, None),
                         "shortlist": (1, None), "round_epochs": (1, None)}),
        Strategy("mixup", "mextract.attacks.mixup", "hard", False, "pool", {"alpha": 1.0},
                 "mixup of pool images with the API's labels (no extra queries)",
                 limits={"alpha": (1e-6, None)}),
    ]
}


def query_set(strategy: str, params: dict[str, Any]) -> str | None:
    """Name of the shared query cache a strategy trains from (None: none)."""
    s = get(strategy)
    if s.cache is None:
        return None
    return s.cache.format(**{**s.defaults, **params})


def check_params(strategy: str, params: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with an experiment's parameters as (key, message) pairs."""
    s = get(strategy)
    problems = []
    for key, value in params.items():
        if key not in s.defaults:
            problems.append((key, f"unknown parameter for strategy '{strategy}' "
                                  f"(takes: {', '.join(sorted(s.defaults)) or 'none'})"))
            continue
        default = s.defaults[key]
        if isinstance(default, bool) or isinstance(value, bool):
            if not (isinstance(default, bool) and isinstance(value, bool)):
                problems.append((key, f"must be a boolean like the default {default!r}"))
            continue
        if isinstance(default, (int, float)):
            if not isinstance(value, (int, float)):
                problems.append((key, f"must be a number, got {value!r}"))
                continue
            if isinstance(default, int) and not float(value).is_integer():
                problems.append((key, f"must be an integer, got {value!r}"))
            low, high = s.limits.get(key, (0, None))
            if low is not None and value < low:
                problems.append((key, f"{value!r} is below the minimum {low}"))
            if high is not None and value > high:
                problems.append((key, f"{value!r} is above the maximum {high}"))
        elif not isinstance(value, type(default)):
            problems.append((key, f"must be of type {type(default).__name__}, got {value!r}"))
    return problems


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


def load(name: str) -> Any:
    """Import and return the strategy's module (it has ``run``)."""
    return importlib.import_module(get(name).module)
