"""Defence layers of the victim API (each maps served hard labels to served labels)."""

from __future__ import annotations

import torch


class HoneyLabels:
    """The reference study's honey labels: where the victim's top-1 minus top-2 logit
    is below ``margin``, answer the top-2 class (a wrong label) instead of the top-1."""

    def __init__(self, margin: float = 1.5) -> None:
        if margin < 0:
            raise ValueError(f"honey margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.name = f"honey(margin={self.margin:g})"

    def low_margin(self, logits: torch.Tensor) -> torch.Tensor:
        top2 = logits.topk(2, dim=1)
        return (top2.values[:, 0] - top2.values[:, 1]) < self.margin

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        second = logits.topk(2, dim=1).indices[:, 1]
        return torch.where(self.low_margin(logits), second, labels)


def build_defences(specs: list[dict] | None) -> list:
    """Defence layers from config entries such as ``{"type": "honey", "margin": 1.5}``."""
    layers = []
    for spec in specs or []:
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in LAYERS:
            raise ValueError(f"unknown defence type {kind!r}; known: {sorted(LAYERS)}")
        layers.append(LAYERS[kind](**spec))
    return layers


#: defence layer classes by config ``type``
LAYERS: dict[str, type] = {"honey": HoneyLabels}
