"""Where and how tensors are computed: device, bf16 autocast, channels_last, optional
``torch.compile``, and background preparation of training batches.

Measured on the 2-core AMD EPYC CPU these defaults were chosen on (docs/performance.md):
a channels_last training step of VGG-11-BN width/4 and ResNet-18 width 16 takes 1.35x
and 1.18x less CPU time than NCHW; bf16 autocast is ~10x *slower* there (no native
bf16), so ``amp="auto"`` leaves it off on such CPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mextract import defaults


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX). Without it,
    bf16 autocast is emulated and was measured 10x *slower* than fp32 (AMD EPYC
    without avx512_bf16, docs/performance.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_DEFAULTS = defaults.of("compute")  # config/schema.yaml, properties.compute


@dataclass
class Compute:
    """Compute settings shared by training, the victim API and evaluation.

    ``amp``: bf16 autocast: True, False or "auto" (on for CUDA, and on CPUs with
    native bf16, where it is 2-3x faster; off on CPUs without it, where it is ~10x
    slower); ``channels_last``: NHWC memory format for convolutions; ``compile``:
    ``torch.compile`` the model for training: True, False or "auto" (on for CUDA
    only; off by default: the first epoch pays the compilation);
    ``prefetch``: prepare the next training batch (slice + augmentation) in a
    background thread while the current one trains: True, False or "auto" (on for
    CUDA, where it hides the host-side work behind the GPU; off on the CPU, where
    the thread competes with the training step for the same cores; see
    docs/performance.md). ``prefetch`` never changes a result; ``compile`` may change
    float rounding (fused kernels).
    """

    device: str = _DEFAULTS["device"]
    amp: bool | str = _DEFAULTS["amp"]
    channels_last: bool = _DEFAULTS["channels_last"]
    compile: bool | str = _DEFAULTS["compile"]
    prefetch: bool | str = _DEFAULTS["prefetch"]

    def __post_init__(self) -> None:
        self.torch_device = resolve_device(self.device)
        cuda = self.torch_device.type == "cuda"
        if self.amp == "auto":
            self.amp = cuda or (self.torch_device.type == "cpu" and cpu_has_bf16())
        elif not isinstance(self.amp, bool):
            raise ValueError(f"compute.amp must be true, false or 'auto', got {self.amp!r}")
        for key in ("compile", "prefetch"):
            value = getattr(self, key)
            if value == "auto":
                setattr(self, key, cuda)
            elif not isinstance(value, bool):
                raise ValueError(f"compute.{key} must be true, false or 'auto', got {value!r}")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.torch_device, memory_format=self.memory_format)

    def compiled(self, model: nn.Module) -> nn.Module:
        """``torch.compile(model)`` when ``compile`` is on, else ``model`` itself. The
        compiled module shares the parameters; save ``model.state_dict()``, not its."""
        return torch.compile(model) if self.compile else model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float images -> float [0, 1] on the device in the chosen layout."""
        x = x.to(self.torch_device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return x.contiguous(memory_format=self.memory_format)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.amp:
            with torch.autocast(self.torch_device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def as_dict(self) -> dict[str, object]:
        return {"device": str(self.torch_device), "amp": self.amp,
                "channels_last": self.channels_last, "compile": self.compile,
                "prefetch": self.prefetch}
