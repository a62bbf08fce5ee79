"""Run one extraction experiment end to end (used by the workflow's attack rule)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mextract.api import VictimAPI
from mextract.attacks import registry
from mextract.attacks.base import AttackContext, AttackResult
from mextract.compute import Compute
from mextract.defences import build_defences
from mextract.metrics import evaluator
from mextract.models import build_model
from mextract.train import TrainConfig


def make_api(victim: nn.Module | None, api_cfg: dict[str, Any], compute: Compute) -> VictimAPI:
    """A victim API from its config entry (mode, defences, budget)."""
    if victim is None:
        raise ValueError("an API needs the victim model")
    return VictimAPI(victim, mode=api_cfg["mode"], budget=api_cfg.get("budget"),
                     defences=build_defences(api_cfg.get("defences")), compute=compute,
                     batch_size=int(api_cfg.get("batch_size", 1024)))


def run_experiment(*, strategy: str, params: dict[str, Any], data: dict[str, Any],
                   split: dict[str, torch.Tensor], victim_test_pred: torch.Tensor,
                   substitute: dict[str, Any], train_cfg: dict[str, Any], compute: Compute,
                   seed: int, workdir: str | Path, cache: dict[str, Any] | None = None,
                   victim: nn.Module | None = None, api_cfg: dict[str, Any] | None = None,
                   ) -> tuple[AttackResult, dict[str, Any]]:
    """Build the attacker's context, run the strategy, score the substitute."""
    t0 = time.perf_counter()
    info = registry.get(strategy)
    params = {**info.defaults, **(params or {})}
    num_classes = len(data["classes"])
    cfg = TrainConfig.from_dict(train_cfg)
    api = None
    if info.adaptive:
        api_cfg = dict(api_cfg or {})
        if "budget" in params:  # the API itself enforces the strategy's budget
            api_cfg["budget"] = int(params["budget"])
        api = make_api(victim, api_cfg, compute)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = AttackContext(
        pool=data["x_train"][split["pool"]],
        pool_labels=data["y_train"][split["pool"]] if strategy == "control" else None,
        num_classes=num_classes,
        new_substitute=lambda: build_model(substitute["arch"], num_classes,
                                           substitute.get("width")),
        train_cfg=cfg, compute=compute,
        evaluate=evaluator(data["x_test"], data["y_test"], victim_test_pred, compute),
        seed=seed, cache=cache, api=api, workdir=workdir,
        augment=train_cfg.get("augment", "crop_flip"),
    )
    result = registry.load(strategy).run(ctx, params)
    if api is not None and result.queries != api.queries + (cache or {}).get("count", 0):
        raise RuntimeError(f"{strategy} reported {result.queries} queries but the API "
                           f"answered {api.queries}")
    final = ctx.evaluate(result.model)
    metrics = {
        "strategy": strategy,
        "params": params,
        "api": (api.description if api is not None else (cache or {}).get("api", "none")),
        "queries": int(result.queries),
        **final,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "compute": compute.as_dict(),
        **result.extra,
    }
    return result, metrics


def load_victim(path: str | Path, victim_cfg: dict[str, Any], num_classes: int) -> nn.Module:
    """Rebuild a victim from its config entry and load its weights (weights_only)."""
    from mextract.io import load_artifact

    model = build_model(victim_cfg["arch"], num_classes, victim_cfg.get("width"))
    model.load_state_dict(load_artifact(path))
    return model.eval()
