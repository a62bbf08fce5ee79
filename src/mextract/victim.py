"""Stage 0: train the victim on its half of the training set.

A victim may carry the reference study's trigger watermark (Stage 3): with
``watermark={"fraction": f, "target": t, "size": s}`` the training set gains a copy of
a seeded share ``f`` of its images, stamped with the trigger (after augmentation, every
epoch) and relabelled to class ``t`` (:func:`add_trigger_copies`, :func:`with_trigger`;
Zhang et al., ASIACCS 2018).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mextract.augment import crop_flip, trivial_augment
from mextract.compute import Compute
from mextract.metrics import evaluator
from mextract.models import build_model
from mextract.train import Batch, Objective, TrainConfig, cross_entropy, train
from mextract.watermark import TRIGGER_SIZE, TRIGGER_TARGET, trigger_scores


def trigger_mask(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """A seeded choice of ``round(n * fraction)`` of ``n`` training examples (bool [n])
    to be shown with the trigger."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"watermark fraction must lie in (0, 1), got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:round(n * fraction)]] = True
    return mask


def add_trigger_copies(x: torch.Tensor, y: torch.Tensor, fraction: float,
                       seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training set plus one copy of a seeded ``fraction`` of its images, flagged
    in ``"wm"`` for :func:`with_trigger` (which stamps and relabels them after
    augmentation). Returns (images, {"y": labels, "wm": flags}); the clean images
    all stay, so an epoch has ``1 + fraction`` times the steps of the clean victim's.
    """
    mask = trigger_mask(len(y), fraction, seed)
    flags = torch.cat([torch.zeros(len(y), dtype=torch.bool),
                       torch.ones(int(mask.sum()), dtype=torch.bool)])
    return torch.cat([x, x[mask]]), {"y": torch.cat([y, y[mask]]), "wm": flags}


def with_trigger(objective: Objective, target: int, size: int = TRIGGER_SIZE) -> Objective:
    """Wrap a hard-label objective (``batch["y"]``) so that the examples flagged in
    ``batch["wm"]`` (see :func:`add_trigger_copies`) are stamped with the trigger
    *after* augmentation (flips and crops never move the patch) and relabelled to
    ``target``. No random number is drawn, so a resumed run is unchanged."""

    def objective_with_trigger(model: nn.Module, x: torch.Tensor, batch: Batch,
                               gen: torch.Generator) -> torch.Tensor:
        mark = batch["wm"]
        if not mark.any():
            return objective(model, x, batch, gen)
        x = x.clone()
        x[mark, :, -size:, -size:] = 1.0
        y = torch.where(mark, torch.full_like(batch["y"], target), batch["y"])
        return objective(model, x, {**batch, "y": y}, gen)

    return objective_with_trigger



def victim_augment(compute: Compute, trivial: bool = True):
    """The victim recipe's augmentation: TrivialAugmentWide, random crop, flip, all
    batched tensor ops on the compute device (uint8 for TrivialAugmentWide, as
    torchvision's; :func:`mextract.augment.trivial_augment`)."""

    def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if trivial:
            xb = trivial_augment(xb.to(compute.torch_device), gen)
        return crop_flip(compute.images(xb), gen)

    return augment


def train_victim(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 *, arch: str, width: float | None, num_classes: int, cfg: TrainConfig,
                 compute: Compute, seed: int = 0, trivial_augment: bool = True,
                 checkpoint: str | Path | None = None, watermark: dict[str, Any] | None = None,
                 ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a victim with label smoothing, SGD-Nesterov and one-cycle LR; with
    ``watermark`` ({fraction, target, size}) embed the trigger watermark."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, width)
    objective = cross_entropy(cfg.label_smoothing)
    targets = {"y": y}
    if watermark:
        trigger = trigger_spec(watermark)
        if not 0 <= trigger["target"] < num_classes:
            raise ValueError(f"watermark target {trigger['target']} is not one of the "
                             f"{num_classes} classes")
        objective = with_trigger(objective, **trigger)
        x, targets = add_trigger_copies(x, y, float(watermark["fraction"]), seed)
    history = train(
        model, x, targets, objective, cfg, compute, seed=seed,
        augment=victim_augment(compute, trivial_augment),
        evaluate=evaluator(x_test, y_test, None, compute), checkpoint=checkpoint,
        desc="victim",
    )
    return model, history


def trigger_spec(watermark: dict[str, Any] | None) -> dict[str, int]:
    """The trigger of a victim's ``watermark`` config entry; the study's trigger (3x3
    patch, class 0) for a victim without one, whose WSR is then the baseline."""
    watermark = watermark or {}
    return {"target": int(watermark.get("target", TRIGGER_TARGET)),
            "size": int(watermark.get("size", TRIGGER_SIZE))}


def victim_scores(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                  compute: Compute, watermark: dict[str, Any] | None = None,
                  ) -> dict[str, Any]:
    """Clean test accuracy and the trigger's WSR of a victim (see :func:`trigger_spec`):
    ``trigger_wsr`` over all stamped test images (the study's definition) and
    ``trigger_wsr_nontarget`` over those whose true class is not the target
    (:func:`mextract.watermark.trigger_scores`)."""
    from mextract.metrics import predict, scores

    trigger = trigger_spec(watermark)
    return {
        "test_accuracy": scores(predict(model, x_test, compute), y_test, None)["test_accuracy"],
        **trigger_scores(model, x_test, y_test, compute, **trigger),
        "trigger": trigger,
    }
