"""Evaluation: predictions, test accuracy, fidelity to the victim."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mextract.compute import Compute


def predict_logits(model: nn.Module, images: torch.Tensor, compute: Compute,
                   batch_size: int = 1024) -> torch.Tensor:
    """Logits (float32, on the CPU) of ``model`` for uint8 or float images."""
    model = compute.prepare(model).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            xb = compute.images(images[start:start + batch_size])
            with compute.autocast():
                out.append(model(xb).float().cpu())
    return torch.cat(out)


def predict(model: nn.Module, images: torch.Tensor, compute: Compute,
            batch_size: int = 1024) -> torch.Tensor:
    return predict_logits(model, images, compute, batch_size).argmax(dim=1)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions where two label vectors agree (nan when empty)."""
    if len(a) == 0:
        return float("nan")
    return (a == b).float().mean().item()


def scores(pred: torch.Tensor, y_true: torch.Tensor,
           victim_pred: torch.Tensor | None) -> dict[str, float]:
    """Test accuracy; fidelity (agreement with the victim on the test set); fidelity on
    the test images the victim gets wrong (separates copying from being accurate)."""
    out = {"test_accuracy": agreement(pred, y_true)}
    if victim_pred is not None:
        wrong = victim_pred != y_true
        out["fidelity"] = agreement(pred, victim_pred)
        out["fidelity_on_victim_errors"] = agreement(pred[wrong], victim_pred[wrong])
    return out


def evaluator(x_test: torch.Tensor, y_test: torch.Tensor, victim_pred: torch.Tensor | None,
              compute: Compute) -> Callable[[nn.Module], dict[str, float]]:
    """A function model -> scores on a fixed test set."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        result = scores(predict(model, x_test, compute), y_test, victim_pred)
        model.train(was_training)
        return result

    return evaluate
