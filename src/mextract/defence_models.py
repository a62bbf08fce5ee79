"""The models that defence layers hold, trained by the defender on its own data.

The defender's data is the victim's training half (images and true labels); the
defender also owns the victim. Two kinds (:data:`mextract.defence_specs.MODEL_KINDS`),
each trained with :func:`mextract.train.train` from a spec ``{arch, width, epochs,
lr, batch_size}`` (``config/schema.yaml``, ``$defs/defence_model``):

* ``surrogate`` (for :class:`mextract.defences.MAD`): the defender's stand-in for the
  attacker's model F_A, whose last-layer gradients MAD steers. The attacker's model is
  unknown; MAD's perturbation only needs the surrogate's softmax p_s on the queries
  (:func:`mextract.defences.gradient_cosine`), and the attacker's model, as it trains,
  moves towards the victim's answers. So the surrogate is the attacker's architecture
  (the spec's; the study's substitutes are VGG-11 variants) *distilled from the
  victim's soft labels* on the defender's data for a few epochs: a model like the one
  an extraction attack produces part-way through, not a random network (whose p_s
  carries no information about the victim's classes). Orekondy et al.'s reference code
  (github.com/tribhuvanesh/prediction-poisoning, ``bb_mad.py``) takes a proxy model
  given by path and falls back to the victim itself; we do not use the victim: with
  p_s = y the gradient (p_s - y) h^T of the unperturbed answer is zero and the
  angular objective is undefined.
* ``misinformation`` (for :class:`mextract.defences.AdaptiveMisinformation`): trained,
  as in Kariyappa & Qureshi (CVPR 2020), to put low probability on the correct class,
  loss -log(1 - p_y) (:func:`misinformation_loss`), from a fresh network.

Both train with plain SGD steps of the library's loop (no augmentation), on the
device of ``compute``. :func:`save_defence_model` / :func:`load_defence_model` keep
the weights with their kind and spec (an atomic, checksummed artifact).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mextract.api import full_float32
from mextract.compute import Compute
from mextract.defence_specs import MODEL_KINDS, model_defaults
from mextract.io import load_artifact, save_artifact
from mextract.models import build_model
from mextract.train import Batch, TrainConfig, distillation, train

KINDS = tuple(MODEL_KINDS.values())


def misinformation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p_y), p = softmax(logits), computed stably as
    logsumexp(z) - logsumexp(z without class y)."""
    z = logits.float()
    others = z.masked_fill(F.one_hot(y.long(), z.shape[1]).bool(), float("-inf"))
    return (torch.logsumexp(z, dim=1) - torch.logsumexp(others, dim=1)).mean()


def _misinformation_objective(model: nn.Module, x: torch.Tensor, batch: Batch,
                              gen: torch.Generator) -> torch.Tensor:
    return misinformation_loss(model(x), batch["y"])


def victim_probs(victim: nn.Module, images_u8: torch.Tensor, compute: Compute,
                 batch_size: int = 1024) -> torch.Tensor:
    """The victim's softmax on the defender's images (float32, CPU), computed as the
    API computes it (float32, no autocast)."""
    victim = compute.prepare(victim).eval()
    out = []
    with torch.inference_mode(), full_float32(compute.torch_device):
        for start in range(0, len(images_u8), batch_size):
            xb = compute.images(images_u8[start:start + batch_size])
            out.append(torch.softmax(victim(xb).float(), dim=1).cpu())
    return torch.cat(out)


def train_defence_model(kind: str, spec: Mapping[str, Any], x_train_u8: torch.Tensor,
                        y_train: torch.Tensor, victim: nn.Module, compute: Compute,
                        seed: int = 0) -> nn.Module:
    """Train a defence model of ``kind`` (``surrogate`` or ``misinformation``) from
    ``spec`` (missing keys take the schema's defaults) on the defender's data
    ``x_train_u8`` (uint8 (N, 3, H, W)) with true labels ``y_train``; ``victim`` gives
    the soft labels a surrogate is distilled from. Returns the model in eval mode."""
    if kind not in KINDS:
        raise ValueError(f"defence model kind must be one of {KINDS}, got {kind!r}")
    spec = {**model_defaults(), **dict(spec)}
    spec.pop("kind", None)
    num_classes = victim_probs(victim, x_train_u8[:1], compute).shape[1]
    torch.manual_seed(seed)
    model = build_model(spec["arch"], num_classes, spec["width"])
    cfg = TrainConfig(epochs=int(spec["epochs"]), batch_size=int(spec["batch_size"]),
                      lr=float(spec["lr"]))
    if kind == "surrogate":
        targets = {"p": victim_probs(victim, x_train_u8, compute)}
        objective = distillation(temperature=1.0)
    else:
        targets = {"y": y_train.long()}
        objective = _misinformation_objective
    train(model, x_train_u8, targets, objective, cfg, compute, seed=seed,
          desc=f"defence model ({kind})")
    return model.cpu().eval()


def save_defence_model(model: nn.Module, path: str | Path, kind: str,
                       spec: Mapping[str, Any], num_classes: int) -> None:
    """Write a defence model's weights with its kind, spec and class count."""
    save_artifact({"kind": kind, "spec": dict(spec), "num_classes": int(num_classes),
                   "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, path)


def load_defence_model(path: str | Path, spec: Mapping[str, Any],
                       num_classes: int) -> nn.Module:
    """A defence model saved by :func:`save_defence_model` (or a bare ``state_dict``),
    rebuilt from ``spec`` (arch, width; defaults filled in) for ``num_classes``
    classes; eval mode, on the CPU. Raises ValueError when the file was saved for
    another spec or class count."""
    spec = {**model_defaults(), **dict(spec)}
    spec.pop("kind", None)
    state = load_artifact(path)
    if "state_dict" in state:
        saved = {k: v for k, v in state["spec"].items() if k != "kind"}
        if saved != spec or int(state["num_classes"]) != int(num_classes):
            raise ValueError(f"{path}: saved for spec {saved} with {state['num_classes']} "
                             f"classes, asked for {spec} with {num_classes}")
        state = state["state_dict"]
    model = build_model(spec["arch"], int(num_classes), spec["width"])
    model.load_state_dict(state)
    return model.eval()
