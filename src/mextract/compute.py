"""Where and how tensors are computed: device, bf16 autocast, channels_last."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


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


@dataclass
class Compute:
    """Compute settings shared by training, the victim API and evaluation.

    ``amp``: bf16 autocast: True, False or "auto" (on for CUDA, and on CPUs with
    native bf16, where it is 2-3x faster; off on CPUs without it, where it is ~10x
    slower); ``channels_last``: NHWC memory format for convolutions.
    """

    device: str = "auto"
    amp: bool | str = "auto"
    channels_last: bool = True

    def __post_init__(self) -> None:
        self.torch_device = resolve_device(self.device)
        if self.amp == "auto":
            self.amp = self.torch_device.type == "cuda" or (
                self.torch_device.type == "cpu" and cpu_has_bf16())
        elif not isinstance(self.amp, bool):
            raise ValueError(f"compute.amp must be true, false or 'auto', got {self.amp!r}")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.torch_device, memory_format=self.memory_format)

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
                "channels_last": self.channels_last}
