"""Process set-up for workflow jobs: logging to a file, threads, determinism."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mextract.compute import Compute


@contextlib.contextmanager
def logged(log: str | Path | None) -> Iterator[None]:
    """Send stdout and stderr (tqdm bars, warnings, tracebacks) to ``log``."""
    if not log:
        yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", buffering=1) as f, contextlib.redirect_stderr(f), \
            contextlib.redirect_stdout(f):
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc(file=f)
            raise


def setup(compute_cfg: dict, threads: int, seed: int = 0) -> Compute:
    """Seed every RNG, set the thread count, and return the compute settings.

    Determinism on the CPU needs a fixed thread count (reductions split work by
    thread); on CUDA some kernels stay non-deterministic (see docs/determinism.md).
    """
    torch.set_num_threads(max(1, int(threads)))
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Compute(device=compute_cfg.get("device", "auto"), amp=compute_cfg.get("amp", "auto"),
                   channels_last=compute_cfg.get("channels_last", True))


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
