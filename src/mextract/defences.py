"""Defence layers of the victim API (each maps served hard labels to served labels).

Layers compose in the order a config lists them (``apis.<name>.defences``), each
seeing the uint8 images the API received, the victim's logits and the labels the
layers before it chose:

* ``honey`` (:class:`HoneyLabels`): the reference study's honey labels;
* ``dawn`` (:class:`DawnWatermark`): DAWN's keyed API watermark (Szyller et al.,
  ACM MM 2021), which keeps a defender-side log of the watermarked answers. It must be
  the last layer, so that the labels it logs are the labels served.

Every layer has ``spec()``: its full configuration as JSON values, the input of
:attr:`mextract.api.VictimAPI.fingerprint` (which decides whether a saved query log
still describes the API). A secret enters only as a digest: DAWN's key as its
:func:`mextract.watermark.key_id`, never in clear.
"""

from __future__ import annotations

from typing import Any

import torch

from mextract import watermark


class HoneyLabels:
    """The reference study's honey labels: where the victim's top-1 minus top-2 logit
    is below ``margin``, answer the top-2 class (a wrong label) instead of the top-1."""

    def __init__(self, margin: float = 1.5) -> None:
        if margin < 0:
            raise ValueError(f"honey margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.name = f"honey(margin={self.margin:g})"

    def spec(self) -> dict[str, Any]:
        """Full configuration: ``{"type": "honey", "margin": m}``."""
        return {"type": "honey", "margin": self.margin}

    def low_margin(self, logits: torch.Tensor) -> torch.Tensor:
        top2 = logits.topk(2, dim=1)
        return (top2.values[:, 0] - top2.values[:, 1]) < self.margin

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        second = logits.topk(2, dim=1).indices[:, 1]
        return torch.where(self.low_margin(logits), second, labels)


class DawnWatermark:
    """DAWN: Dynamic Adversarial Watermarking of Neural Networks (Szyller et al.,
    ACM MM 2021). An HMAC-SHA256 of each query's bytes under the defender's secret
    ``key`` selects a share ``rate`` of all queries; those are answered with a keyed
    pseudo-random label other than the victim's top-1, and each such (input, served
    label) pair is recorded in the defender's watermark log (:meth:`log`). The same
    input always gets the same answer, so asking again reveals nothing. A model
    trained on the answers inherits the wrong labels; one that never saw them agrees
    with them at chance (:func:`mextract.watermark.dawn_verify`).

    The log keeps each distinct input once, however often it was asked.
    """

    def __init__(self, key: str, rate: float = 0.005) -> None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"DAWN rate must lie in (0, 1), got {rate}")
        self._key = watermark.key_bytes(key)
        self.rate = float(rate)
        self.key_id = watermark.key_id(self._key)
        self.name = f"dawn(rate={self.rate:g})"
        self.seen = 0
        self.num_classes = 0
        self.image_shape: tuple[int, ...] | None = None
        self._entries: list[dict[str, torch.Tensor]] = []
        self._logged: set[bytes] = set()

    def spec(self) -> dict[str, Any]:
        """Full configuration: type, rate and the key's public digest (``key_id``,
        sha256 of the key); the key itself never leaves the layer."""
        return {"type": "dawn", "rate": self.rate, "key_id": self.key_id}

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        self.num_classes = logits.shape[1]
        self.image_shape = tuple(images.shape[1:])
        digests = watermark.dawn_digests(images, self._key)
        mark = watermark.dawn_marks(digests, self.rate)
        if not mark.any():
            return labels
        top1 = logits.argmax(dim=1)
        wrong = watermark.dawn_labels(digests, top1, self.num_classes)
        served = torch.where(mark, wrong, labels.cpu())
        new = []  # marked inputs not logged before (a loop over the few marked rows)
        for i in mark.nonzero().flatten().tolist():
            digest = digests[i].tobytes()
            if digest not in self._logged:
                self._logged.add(digest)
                new.append(i)
        if new:
            idx = torch.tensor(new)
            self._entries.append({"images": images[idx].cpu(), "labels": served[idx],
                                  "victim_labels": top1[idx].cpu(),
                                  "digests": torch.from_numpy(digests[new].copy())})
        return served.to(labels.device)

    def log(self) -> dict[str, Any]:
        """The defender's watermark log (format: :mod:`mextract.watermark`)."""
        log = watermark.empty_log(self.image_shape or (3, 32, 32), self.rate,
                                  self.num_classes, self._key, self.seen)
        if self._entries:
            for field in ("images", "labels", "victim_labels", "digests"):
                log[field] = torch.cat([e[field] for e in self._entries])
        return log


def build_defences(specs: list[dict] | None) -> list:
    """Defence layers from config entries such as ``{"type": "honey", "margin": 1.5}``
    or ``{"type": "dawn", "rate": 0.005, "key": "..."}``."""
    layers = []
    for spec in specs or []:
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in LAYERS:
            raise ValueError(f"unknown defence type {kind!r}; known: {sorted(LAYERS)}")
        layers.append(LAYERS[kind](**spec))
    check_order(layers)
    return layers


def check_order(layers: list) -> None:
    """A DAWN layer must come last: a later layer would change labels it has logged."""
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, DawnWatermark):
            raise ValueError(f"the DAWN layer must be the last defence layer (it is "
                             f"number {i + 1} of {len(layers)}), so that the labels it "
                             "logs are the labels served")


def dawn_key(specs: list[dict] | None) -> str | None:
    """The key of the DAWN layer in an API's defence list (None without one)."""
    for spec in specs or []:
        if spec.get("type") == "dawn":
            return spec["key"]
    return None


#: defence layer classes by config ``type``
LAYERS: dict[str, type] = {"honey": HoneyLabels, "dawn": DawnWatermark}
