"""Bring your own victim: load a user's model instead of training one.

A victim entry with ``source`` (config/schema.yaml, ``$defs/victim``) names a file:

* ``type: state_dict``: weights of a built-in architecture (the entry's ``arch`` and
  ``width``, :func:`mextract.models.build_model`), loaded with
  ``torch.load(..., weights_only=True)`` (tensors only, never pickled code). The
  state_dict is of the built-in :class:`~mextract.models.Classifier` (which normalises
  inside, as the workflow's own victims do) or of its backbone alone (keys without the
  ``net.`` prefix: then ``mean``/``std`` below normalise).
* ``type: torchscript``: a ``torch.jit.save`` file, loaded with :func:`torch.jit.load`.
  **A TorchScript file is code**: loading runs nothing arbitrary in Python, but the
  model computes whatever its author scripted; load only files you trust.

``input_size`` (pixels, square; or [H, W]), ``mean`` and ``std`` (per channel; the
backbone-only state_dict and TorchScript models receive normalised inputs) and
``classes`` (names, their number the model's outputs) describe the model. The pipeline
hands every model float images in [0, 1] at the data set's size (32x32, see
:mod:`mextract.data`); :class:`Adapter` resizes them to ``input_size`` (bilinear,
antialiased, as torchvision's ``Resize``) and normalises them before the user's model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mextract.io import checksum_path, load_artifact, verify_artifact
from mextract.models import Classifier, build_model

SOURCE_TYPES = ("state_dict", "torchscript")


class Adapter(nn.Module):
    """[0, 1] float images at any size -> resized to ``size`` -> (x - mean) / std ->
    ``model``. ``mean``/``std`` None: no normalisation (the model does its own)."""

    def __init__(self, model: nn.Module, size: Sequence[int] | None = None,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.model = model
        self.size = tuple(int(s) for s in size) if size else None
        normalise = mean is not None or std is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0, 0.0, 0.0)).view(1, -1, 1, 1)
                             if normalise else None)
        self.register_buffer("std", torch.tensor(std or (1.0, 1.0, 1.0)).view(1, -1, 1, 1)
                             if normalise else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=True)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.model(x)


def input_size(source: Mapping[str, Any]) -> tuple[int, int] | None:
    size = source.get("input_size")
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def num_classes_of(source: Mapping[str, Any], default: int | None = None) -> int:
    """The model's number of classes: its ``classes`` names, else ``default``."""
    if source.get("classes"):
        return len(source["classes"])
    if default is None:
        raise ValueError("the victim's source gives no 'classes'; the number of classes "
                         "is unknown")
    return int(default)


def load_byo(path: str | Path, victim_cfg: Mapping[str, Any],
             num_classes: int | None = None) -> nn.Module:
    """The user's model of a victim entry with ``source``, wrapped in :class:`Adapter`,
    in eval mode. ``path``: the model file (default: ``source.path``); a state_dict is
    loaded ``weights_only`` (verified against its ``.sha256`` sidecar when it has one).
    Raises ValueError when its number of outputs differs from the classes."""
    source = victim_cfg["source"]
    path = Path(path or source["path"])
    kind = source["type"]
    n = num_classes_of(source, num_classes)
    if kind == "torchscript":
        if checksum_path(path).exists():
            verify_artifact(path)
        model: nn.Module = torch.jit.load(str(path), map_location="cpu")
    elif kind == "state_dict":
        state = load_artifact(path, verify=checksum_path(path).exists())
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        built = build_model(victim_cfg.get("arch", "resnet18"), n, victim_cfg.get("width"))
        if any(k.startswith("net.") for k in state):
            built.load_state_dict(state)
            model = built
        else:  # the backbone alone: normalised by the source's mean/std
            built.net.load_state_dict(state)
            model = built.net
    else:
        raise ValueError(f"unknown victim source type {kind!r} ({', '.join(SOURCE_TYPES)})")
    mean, std = source.get("mean"), source.get("std")
    if isinstance(model, Classifier):
        mean = std = None  # a built-in Classifier's state_dict brings its own mean/std
    adapter = Adapter(model, input_size(source), mean, std).eval()
    with torch.inference_mode():
        size = input_size(source) or (32, 32)
        outputs = adapter(torch.zeros(1, 3, *size)).shape[-1]
    if outputs != n:
        raise ValueError(f"the model in '{path}' has {outputs} outputs but the victim's "
                         f"classes number {n}")
    return adapter


def is_byo(victim_cfg: Mapping[str, Any] | None) -> bool:
    return bool(victim_cfg) and "source" in victim_cfg  # type: ignore[operator]
