"""Stage 0: train the victim on its half of the training set.

A victim may carry the reference study's trigger watermark (Stage 3): with
``watermark={"fraction": f, "target": t, "size": s}`` the training set gains a copy of
a seeded share ``f`` of its images, stamped with the trigger (after augmentation, every
epoch) and relabelled to class ``t`` (:func:`mextract.watermark.add_trigger_copies`,
:func:`mextract.watermark.with_trigger`; Zhang et al., ASIACCS 2018).
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
from mextract.train import TrainConfig, cross_entropy, train
from mextract.watermark import (
    TRIGGER_SIZE,
    TRIGGER_TARGET,
    add_trigger_copies,
    trigger_wsr,
    with_trigger,
)


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
    """Clean test accuracy and the trigger's WSR of a victim (see :func:`trigger_spec`)."""
    from mextract.metrics import predict, scores

    trigger = trigger_spec(watermark)
    return {
        "test_accuracy": scores(predict(model, x_test, compute), y_test, None)["test_accuracy"],
        "trigger_wsr": trigger_wsr(model, x_test, y_test, compute, **trigger),
        "trigger": trigger,
    }
