"""The black-box victim API: the only way attack code touches the victim.

The API receives images as a client would send them, 8-bit RGB (float inputs in
[0, 1] are rounded to 8 bits first), runs the victim on large batches under
``torch.inference_mode`` in float32 (never under the training recipe's bf16 autocast:
bf16 keeps ~3 significant digits, which would round soft labels, honey margins and
SPSG's forward differences) and answers

* ``soft``: probability vectors (float32, rows sum to 1);
* ``hard``: the arg-max class;
* ``honey``: shorthand for ``hard`` with the :class:`~mextract.defences.HoneyLabels`
  layer (where top-1 minus top-2 logit < margin, answer the top-2 class).

Defences are layers applied in the order given (:mod:`mextract.defences`): first the
*probability layers* (``acts_on == "probs"``: top-k, rounding, noise, reverse sigmoid,
MAD, adaptive misinformation) map the victim's softmax to the served probability
vectors, in soft and hard APIs; a hard API then takes each row's top class
(:func:`mextract.defences.top_label`: ties go to the victim's top-1) and applies the
*label layers* (``acts_on == "labels"``: honey, DAWN; hard APIs only, a DAWN
watermark layer last). :meth:`VictimAPI.watermark_log` returns the defender-side log
of the watermarked answers. The API counts every image it answers and refuses a call that
would exceed its budget. :attr:`VictimAPI.fingerprint` identifies what answers: the
victim's weights, the mode and every defence layer's full configuration (a DAWN key
only as a digest); saved query logs are valid only for the same fingerprint
(:mod:`mextract.querylog`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mextract.compute import Compute
from mextract.io import tensor_digest

MODES = ("soft", "hard", "honey")


class QueryBudgetExceeded(RuntimeError):
    """A query would take the API past its configured budget."""


class Defence(Protocol):
    """An API layer that may change the served answers: ``acts_on == "probs"`` maps
    probability vectors (float32 (N, K)) to probability vectors, ``"labels"`` maps hard
    labels (N,) to hard labels. Either gets the uint8 images and the victim's logits."""

    name: str
    acts_on: str

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 answers: torch.Tensor) -> torch.Tensor: ...

    def spec(self) -> dict[str, Any]:
        """The layer's full configuration as JSON values (a secret only as a digest)."""
        ...


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images as the API receives them: uint8 (float [0, 1] inputs are rounded)."""
    if x.dtype == torch.uint8:
        return x
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Plain float32 arithmetic on ``device`` for the block: autocast off, and on CUDA
    no TF32 in cuDNN convolutions or matmuls (TF32 keeps 10 mantissa bits, like bf16's
    ~3 significant digits; cuDNN convolutions use it by default). The global flags are
    restored afterwards."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        cudnn = torch.backends.cudnn
        if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9
            # the new per-backend flags only: mixing them with the legacy allow_tf32
            # setters makes torch refuse to read the flags
            flags = [cudnn.conv, cudnn.rnn, torch.backends.cuda.matmul]
            saved = [f.fp32_precision for f in flags]
            for f in flags:
                f.fp32_precision = "ieee"
            try:
                yield
            finally:
                for f, value in zip(flags, saved, strict=True):
                    f.fp32_precision = value
        else:  # the legacy flags
            saved_legacy = (torch.backends.cudnn.allow_tf32,
                            torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                yield
            finally:
                (torch.backends.cudnn.allow_tf32,
                 torch.backends.cuda.matmul.allow_tf32) = saved_legacy


class VictimAPI:
    def __init__(self, model: nn.Module, mode: str = "soft", budget: int | None = None,
                 defences: Sequence[Defence] = (), compute: Compute | None = None,
                 batch_size: int = 1024) -> None:
        if mode not in MODES:
            raise ValueError(f"api mode must be one of {MODES}, got {mode!r}")
        if budget is not None and budget < 0:
            raise ValueError(f"api budget must be >= 0, got {budget}")
        self.compute = compute or Compute()
        self.model = self.compute.prepare(model).eval()
        self.defences: list[Defence] = list(defences)
        if mode == "honey":
            from mextract.defences import HoneyLabels

            mode = "hard"  # honey labels: the first label layer, after any probability layer
            first_label = next((i for i, d in enumerate(self.defences)
                                if _acts_on(d) == "labels"), len(self.defences))
            self.defences.insert(first_label, HoneyLabels())
        labels = [d.name for d in self.defences if _acts_on(d) == "labels"]
        if mode == "soft" and labels:
            raise ValueError(f"label layers ({', '.join(labels)}) act on hard labels; "
                             "use mode 'hard'")
        if self.defences:
            from mextract.defences import check_order

            check_order(self.defences)
        self.mode = mode
        self.budget = budget
        self.batch_size = batch_size
        self._count = 0

    @property
    def queries(self) -> int:
        """Images answered so far (the API's own counter)."""
        return self._count

    @property
    def description(self) -> str:
        return "+".join([self.mode, *[d.name for d in self.defences]])

    @property
    def fingerprint(self) -> str:
        """What answers the queries, as a sha256 (64 hex digits) over the victim's
        weight digest (:func:`mextract.io.tensor_digest` of its ``state_dict`` values,
        buffers included), the mode and each defence layer's full :meth:`Defence.spec`
        in order (a DAWN key enters only as its digest, never in clear). Two APIs with
        the same fingerprint give the same answers; computed afresh on every call, so
        it follows weights changed in place."""
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()

    def spec(self) -> dict[str, Any]:
        """The inputs of :attr:`fingerprint`: victim weight digest, mode, layer specs."""
        return {"victim": tensor_digest(*self.model.state_dict().values()),
                "mode": self.mode, "defences": [layer.spec() for layer in self.defences]}

    @property
    def watermarked(self) -> bool:
        """Whether a layer keeps a watermark log (DAWN)."""
        return any(hasattr(d, "log") for d in self.defences)

    def watermark_log(self) -> dict[str, Any]:
        """The defender's log of watermarked answers so far (see
        :mod:`mextract.watermark`); an API without a DAWN layer gives an empty log."""
        from mextract.watermark import empty_log, merge_logs

        logs = [d.log() for d in self.defences if hasattr(d, "log")]
        return merge_logs(logs) if logs else empty_log(seen=self.queries)

    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        """Victim logits for uint8 images (internal: never counted, never exposed),
        computed in float32 whatever ``compute.amp`` says (:func:`full_float32`)."""
        out = []
        with torch.inference_mode(), full_float32(self.compute.torch_device):
            for start in range(0, len(images_u8), self.batch_size):
                xb = self.compute.images(images_u8[start:start + self.batch_size])
                out.append(self.model(xb).float())
        return torch.cat(out).cpu() if out else torch.empty(0)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Answer a batch of images (N, 3, H, W); counts N queries."""
        n = len(images)
        if self.budget is not None and self._count + n > self.budget:
            raise QueryBudgetExceeded(
                f"query of {n} images would exceed the API budget of {self.budget} "
                f"({self._count} already answered)"
            )
        x = quantize(images.cpu())
        logits = self.logits(x)
        self._count += n
        prob_layers = [d for d in self.defences if _acts_on(d) == "probs"]
        probs = torch.softmax(logits, dim=1)
        for layer in prob_layers:
            probs = layer(x, logits, probs).float()
        if self.mode == "soft":
            return probs
        if prob_layers:
            from mextract.defences import top_label

            labels = top_label(probs, logits.argmax(dim=1))
        else:  # the victim's own top-1 (softmax may tie logits that differ)
            labels = logits.argmax(dim=1)
        for layer in self.defences:
            if _acts_on(layer) == "labels":
                labels = layer(x, logits, labels)
        return labels


def _acts_on(layer: Defence) -> str:
    """What a layer maps: ``"probs"`` or ``"labels"`` (a layer without the attribute
    is a label layer, as every layer was before probability layers existed)."""
    return getattr(layer, "acts_on", "labels")
