"""Stage 0: train the victim on its half of the training set."""

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


def victim_augment(compute: Compute, trivial: bool = True):
    """The victim recipe's augmentation: TrivialAugmentWide, random crop, flip."""

    def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if trivial:
            xb = trivial_augment(xb.cpu(), gen).to(compute.torch_device)
        return crop_flip(compute.images(xb), gen)

    return augment


def train_victim(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 *, arch: str, width: float | None, num_classes: int, cfg: TrainConfig,
                 compute: Compute, seed: int = 0, trivial_augment: bool = True,
                 checkpoint: str | Path | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a victim with label smoothing, SGD-Nesterov and one-cycle LR."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, width)
    history = train(
        model, x, {"y": y}, cross_entropy(cfg.label_smoothing), cfg, compute, seed=seed,
        augment=victim_augment(compute, trivial_augment),
        evaluate=evaluator(x_test, y_test, None, compute), checkpoint=checkpoint,
        desc="victim",
    )
    return model, history
