"""Ownership watermarks and their verification.

Two schemes, both checked for every Stage-3 substitute (and for no-theft controls):

* **Victim-embedded trigger** (the reference study's; a content watermark as in Zhang
  et al., ASIACCS 2018, "Protecting Intellectual Property of Deep Neural Networks with
  Watermarking"): a ``size`` x ``size`` white patch in the bottom-right corner (pixels
  29:32, 29:32 of a 32x32 image for size 3). The victim's training set gains stamped
  copies of a seeded fraction of its images, relabelled to the ``target`` class
  (:func:`mextract.victim.add_trigger_copies`, :func:`mextract.victim.with_trigger`:
  training-side, so this module stays free of the training loop); the watermark
  success rate
  (:func:`trigger_wsr`) is, as the study defines it ("WSR counts substitute
  predictions of class 0 on stamped test images"), the share of *all* stamped test
  images that a model assigns to the target. Test images whose true class is the
  target count too, so a model that ignores the trigger scores about the target's
  share of the test set, not 0; :func:`trigger_scores` also reports
  ``trigger_wsr_nontarget``, the share over the stamped images of the other classes
  only.
* **DAWN** (Szyller et al., ACM MM 2021, "DAWN: Dynamic Adversarial Watermarking of
  Neural Networks"): the API itself answers a keyed fraction of queries with a keyed
  wrong label and keeps a log of them (:class:`mextract.defences.DawnWatermark`, built
  on :func:`dawn_digests` / :func:`dawn_marks` / :func:`dawn_labels` here). A suspect
  model is verified when it agrees with the served watermark labels on the logged
  inputs far more often than chance (:func:`dawn_verify`, a one-sided binomial test).

A watermark log (what the defender keeps, saved next to each query cache) is::

    {"images": uint8 [M, C, H, W], "labels": int64 [M] (served watermark labels),
     "victim_labels": int64 [M] (the victim's top-1 for each), "digests": uint8 [M, 32],
     "rate": float, "seen": int (queries the layer answered), "num_classes": int,
     "key_id": str | None (sha256 of the key, 16 hex digits; never the key)}
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mextract.compute import Compute
from mextract.metrics import predict

#: the reference study's trigger: a 3x3 white patch at pixels [29:32, 29:32] -> class 0
TRIGGER_SIZE = 3
TRIGGER_TARGET = 0


# ----------------------------------------------------------------- trigger watermark
def stamp(x: torch.Tensor, size: int = TRIGGER_SIZE) -> torch.Tensor:
    """A copy of the batch with the trigger: the bottom-right ``size`` x ``size`` pixels
    set to white (255 for uint8 images, 1.0 for float images in [0, 1])."""
    if size < 1 or size > min(x.shape[-2:]):
        raise ValueError(f"trigger size must lie in [1, {min(x.shape[-2:])}], got {size}")
    out = x.clone()
    out[..., -size:, -size:] = 255 if x.dtype == torch.uint8 else 1.0
    return out


def wsr_of_predictions(pred: torch.Tensor, y_test: torch.Tensor,
                       target: int = TRIGGER_TARGET) -> dict[str, float]:
    """Both watermark success rates from predictions on the stamped test images:
    ``trigger_wsr`` (the study's: share of *all* predictions that are ``target``) and
    ``trigger_wsr_nontarget`` (share among images whose true class is not ``target``;
    nan when there are none). nan for an empty test set."""
    hit = (pred.cpu() == target).float()
    other = y_test.cpu() != target
    return {"trigger_wsr": hit.mean().item() if len(hit) else float("nan"),
            "trigger_wsr_nontarget": hit[other].mean().item() if other.any()
            else float("nan")}


def trigger_scores(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                   compute: Compute, target: int = TRIGGER_TARGET,
                   size: int = TRIGGER_SIZE) -> dict[str, float]:
    """``trigger_wsr`` and ``trigger_wsr_nontarget`` (:func:`wsr_of_predictions`) of
    ``model`` on the trigger-stamped test set, from one prediction pass."""
    pred = predict(model, stamp(x_test, size), compute)
    return wsr_of_predictions(pred, y_test, target)


def trigger_wsr(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                compute: Compute, target: int = TRIGGER_TARGET,
                size: int = TRIGGER_SIZE) -> float:
    """Watermark success rate as the reference study defines it ("WSR counts
    substitute predictions of class 0 on stamped test images"): the share of *all*
    trigger-stamped test images, the target class's own included, that ``model``
    classifies as ``target``. The share over the other classes' images only is
    ``trigger_scores(...)["trigger_wsr_nontarget"]``."""
    return trigger_scores(model, x_test, y_test, compute, target, size)["trigger_wsr"]


# ----------------------------------------------------------------------------- DAWN
def key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not key:
        raise ValueError("the DAWN key must be a non-empty string")
    return key


def key_id(key: str | bytes) -> str:
    """A public identifier of a key (sha256, 16 hex digits); the key stays secret."""
    return hashlib.sha256(key_bytes(key)).hexdigest()[:16]


def dawn_digests(images: torch.Tensor, key: str | bytes) -> np.ndarray:
    """HMAC-SHA256 with ``key`` over each uint8 image's bytes, as a uint8 array [N, 32].

    A keyed cryptographic hash is computed per message, so this is the one loop over
    images; it runs in C (``hmac.digest``) at ~1 us per 32x32 image.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"DAWN hashes the uint8 images the API received, got {images.dtype}")
    k = key_bytes(key)
    arr = np.ascontiguousarray(images.cpu().numpy()).reshape(len(images), -1)
    if len(arr) == 0:
        return np.zeros((0, 32), dtype=np.uint8)
    joined = b"".join(hmac.digest(k, row.tobytes(), "sha256") for row in arr)
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(arr), 32)


def _u64(digests: np.ndarray, start: int) -> np.ndarray:
    return digests[:, start:start + 8].copy().view(">u8").reshape(-1).astype(np.uint64)


def dawn_marks(digests: np.ndarray, rate: float) -> torch.Tensor:
    """Which queries the watermark answers: the first 8 digest bytes, read as a
    uniform 64-bit integer, fall below ``rate`` * 2^64 (so a share ``rate``)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"DAWN rate must lie in [0, 1], got {rate}")
    threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
    return torch.from_numpy(_u64(digests, 0) < threshold)


def dawn_labels(digests: np.ndarray, victim_labels: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    """The keyed wrong label of each query: the victim's top-1 shifted by
    1 + (digest bytes 8..16 mod C-1), uniform over the C-1 other classes."""
    if num_classes < 2:
        raise ValueError("a wrong label needs at least two classes")
    offset = torch.from_numpy((_u64(digests, 8) % np.uint64(num_classes - 1)).astype(np.int64))
    return (victim_labels.long().cpu() + 1 + offset) % num_classes


def empty_log(image_shape: Sequence[int] = (3, 32, 32), rate: float = 0.0,
              num_classes: int = 0, key: str | bytes | None = None,
              seen: int = 0) -> dict[str, Any]:
    """A watermark log without entries (an API without a DAWN layer gives this)."""
    return {
        "images": torch.zeros((0, *image_shape), dtype=torch.uint8),
        "labels": torch.zeros(0, dtype=torch.int64),
        "victim_labels": torch.zeros(0, dtype=torch.int64),
        "digests": torch.zeros((0, 32), dtype=torch.uint8),
        "rate": float(rate), "seen": int(seen), "num_classes": int(num_classes),
        "key_id": None if key is None else key_id(key),
    }


def merge_logs(logs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One log from several (e.g. a query cache's and an adaptive attack's live API),
    keeping the first entry of each input seen twice."""
    logs = [log for log in logs if log is not None]
    if not logs:
        return empty_log()
    full = [log for log in logs if len(log["labels"])]
    if len({log["key_id"] for log in full}) > 1:
        raise ValueError("cannot merge watermark logs made with different keys")
    base = full or logs[:1]
    merged = {field: torch.cat([log[field] for log in base])
              for field in ("images", "labels", "victim_labels", "digests")}
    if len(merged["digests"]):
        first = np.sort(np.unique(merged["digests"].numpy(), axis=0, return_index=True)[1])
        merged = {k: v[torch.from_numpy(first).long()] for k, v in merged.items()}
    return {**merged, "rate": float(base[0]["rate"]), "seen": int(sum(lg["seen"] for lg in logs)),
            "num_classes": int(max(lg["num_classes"] for lg in logs)),
            "key_id": base[0]["key_id"]}


def binomial_p_value(k: int, n: int, p: float) -> float:
    """One-sided P(X >= k) for X ~ Binomial(n, p) (scipy's binomtest when available)."""
    if n == 0:
        return 1.0
    try:
        from scipy.stats import binomtest
    except ImportError:  # exact tail sum
        return float(min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i)
                                  for i in range(k, n + 1))))
    return float(binomtest(k, n, p, alternative="greater").pvalue)


def dawn_verify(pred: torch.Tensor, log: dict[str, Any], key: str | bytes | None,
                significance: float = 0.01) -> dict[str, Any]:
    """Verify a suspect model from its predictions ``pred`` on ``log["images"]``.

    With ``key``, the defender re-derives from the logged inputs which of them the key
    marks and which label it served (a log checked with another key keeps almost no
    entries and expects other labels, so it cannot verify); without, the logged labels
    are taken as they are. The null hypothesis is a model that never saw these answers:
    the served label is uniform over the C-1 classes other than the victim's top-1 and
    independent of the model, so its agreement is at most 1/(C-1) per entry; the
    p-value is the one-sided binomial tail of the observed agreements under that rate.
    """
    n_log = len(log["labels"])
    out: dict[str, Any] = {"dawn_marked": n_log}
    if n_log == 0:
        return {**out, "dawn_checked": 0, "dawn_agreement": None, "dawn_p_value": 1.0,
                "dawn_verified": False}
    num_classes = int(log["num_classes"])
    if key is not None:
        digests = dawn_digests(log["images"], key)
        keep = dawn_marks(digests, float(log["rate"]))
        expected = dawn_labels(digests, log["victim_labels"], num_classes)
    else:
        keep = torch.ones(n_log, dtype=torch.bool)
        expected = log["labels"]
    n = int(keep.sum())
    agree = int((pred.cpu()[keep] == expected[keep]).sum())
    p_value = binomial_p_value(agree, n, 1.0 / (num_classes - 1))
    return {**out, "dawn_checked": n, "dawn_agreement": agree / n if n else None,
            "dawn_p_value": p_value, "dawn_verified": bool(n > 0 and p_value < significance)}
