"""Process set-up for workflow jobs: logging to a file, threads, determinism.

Determinism (docs/determinism.md): on the CPU, a job's numbers depend only on its
config, its seed and its thread count (``compute.threads``), so two runs with the same
config give bit-identical weights and metrics. Wall-clock fields (:data:`TIMING_KEYS`)
necessarily differ; :func:`without_timings` drops them before comparing. On CUDA,
``compute.deterministic: true`` additionally selects deterministic kernels.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import os
import platform
import random
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mextract import defaults
from mextract.io import write_text

if TYPE_CHECKING:
    from mextract.compute import Compute

# torch (and numpy) are imported inside the functions that use them: the report jobs
# (tables, plots, run summary) log through :func:`logged` and never touch a tensor,
# and importing torch costs each of them about 2 s of a 2-core machine.

#: metrics/history/table fields that measure wall-clock time: the only fields that
#: differ between two runs of the same config on the same machine and thread count.
TIMING_KEYS: frozenset[str] = frozenset({"wall_time_s", "train_time_s"})

#: cuBLAS needs a fixed workspace to be deterministic (set before CUDA starts).
CUBLAS_WORKSPACE = ":4096:8"


def job_header() -> str:
    """One line naming where a job runs: host, pid, SLURM job id, visible GPUs."""
    fields = {
        "host": platform.node(),
        "pid": os.getpid(),
        "start": datetime.datetime.now().isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # the version of a torch this job has imported (report jobs import none)
        "torch": getattr(sys.modules.get("torch"), "__version__", None),
    }
    return "# mextract job: " + " ".join(f"{k}={v}" for k, v in fields.items()
                                         if v is not None)


def check_device(name: str) -> str:
    """Whether ``compute.device`` works in this job: resolve it and compute on it once.
    The workflow's ``check_device`` job runs this before any GPU job of a run with an
    explicit CUDA device, so that a device that fails stops the run before Snakemake
    removes any finished output. Raises an error naming the config key; returns a line
    describing the device."""
    import torch

    from mextract.compute import resolve_device

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise RuntimeError(
                f"config key 'compute.device': '{name}', but torch {torch.__version__} "
                f"(CUDA {torch.version.cuda or 'none'}) sees {count} usable GPU(s) in "
                "this job; use 'auto' or 'cpu', or run where the GPU is")
    device = resolve_device(name)
    x = torch.ones(8, 8, device=device)
    if float((x @ x).sum()) != 512.0:
        raise RuntimeError(f"config key 'compute.device': '{name}' computed a wrong result")
    if device.type == "cuda":
        return f"{name}: {torch.cuda.get_device_name(device)}"
    return f"{name}: {device}"


@contextlib.contextmanager
def quick_imports() -> Iterator[None]:
    """Import a job's modules with the cyclic garbage collector paused, then freeze them.

    torch, torchvision and the library leave about 330,000 tracked objects; the
    collector runs hundreds of times while they load, and every later full collection
    walks them all again. Pausing it during the imports and moving what they created to
    the permanent generation (:func:`gc.freeze`) saved 2.3 s of a 15.4 s demo attack job
    on a 2-core AMD EPYC, with bit-identical weights (docs/performance.md). Workflow
    scripts wrap their imports in it; nothing else changes (the collector runs again
    afterwards, for the objects the job itself creates).
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def blamed(entry: str | None) -> Iterator[None]:
    """A failure inside names the config entry (``experiments.kd``, ``victims.clean``)
    whose job it is: a non-finite loss (a learning rate or a temperature the config
    check could not rule out) is re-raised with the key in its message; any other
    error gets a note naming the entry (shown under its traceback)."""
    if entry is None:
        yield
        return
    try:
        yield
    except FloatingPointError as err:
        raise FloatingPointError(
            f"config key '{entry}': {err}; the entry's training recipe ('train': lr, "
            "batch size) or its parameters made the loss non-finite") from err
    except Exception as err:
        err.add_note(f"(in the job of config key '{entry}')")
        raise


@contextlib.contextmanager
def logged(log: str | Path | None, entry: str | None = None) -> Iterator[None]:
    """Send stdout and stderr (tqdm bars, warnings, tracebacks) to ``log``, after a
    :func:`job_header` line (so a cluster job's log names its SLURM job id). A failure
    names the config ``entry`` whose job it is (:func:`blamed`)."""
    if not log:
        with blamed(entry):
            yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", buffering=1) as f, contextlib.redirect_stderr(f), \
            contextlib.redirect_stdout(f):
        print(job_header(), flush=True)
        try:
            with blamed(entry):
                yield
        except BaseException:
            import traceback

            traceback.print_exc(file=f)
            raise


def set_deterministic(enabled: bool) -> None:
    """Select deterministic kernels (CUDA convolutions, cuBLAS, scatter/index ops).

    On the CPU every kernel this library uses is already deterministic for a fixed
    thread count. On CUDA this sets ``torch.use_deterministic_algorithms`` (with
    ``warn_only``: ops without a deterministic kernel warn instead of failing),
    disables the cuDNN autotuner and fixes the cuBLAS workspace; it costs speed. See
    the PyTorch reproducibility notes,
    https://pytorch.org/docs/stable/notes/randomness.html.
    """
    import torch

    if not enabled:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(compute_cfg: dict, threads: int, seed: int = 0) -> Compute:
    """Seed every RNG, set the thread count, and return the compute settings.

    Determinism on the CPU needs a fixed thread count (reductions split work by
    thread); on CUDA some kernels stay non-deterministic unless
    ``compute_cfg["deterministic"]`` is true (see docs/determinism.md).
    """
    import torch

    from mextract.compute import Compute

    cfg = {**defaults.of("compute"), **compute_cfg}
    torch.set_num_threads(max(1, int(threads)))
    set_deterministic(bool(cfg["deterministic"]))
    seed_everything(seed)
    return Compute(device=cfg["device"], amp=cfg["amp"], channels_last=cfg["channels_last"],
                   compile=cfg["compile"], prefetch=cfg["prefetch"])


def discard_stale_checkpoints(key_file: str | Path, settings: Any,
                              pattern: str = "checkpoint*.pt*") -> list[Path]:
    """Delete checkpoints that an earlier, unfinished run wrote for other settings.

    A training resumes from a checkpoint whose data size and training config match
    (mextract.train), but a killed job rerun after a change of, say, the KD
    temperature, the augmentation or the library code must start over. ``settings``
    (JSON-able: a rule's params, which include its code fingerprint) is hashed into
    ``key_file``; when the stored hash differs or is missing, the files matching
    ``pattern`` beside ``key_file`` are deleted. Returns the deleted paths.
    """
    key_file = Path(key_file)
    digest = hashlib.sha256(
        json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    old = key_file.read_text().strip() if key_file.exists() else None
    deleted: list[Path] = []
    if old != digest:
        for path in sorted(key_file.parent.glob(pattern)):
            if path.is_file() and path != key_file:
                path.unlink()
                deleted.append(path)
        write_text(digest + "\n", key_file)
    return deleted


def without_timings(record: Any) -> Any:
    """``record`` (a metrics dict, a list of history rows, nested) without the
    wall-clock fields of :data:`TIMING_KEYS`: what two equal runs must agree on."""
    if isinstance(record, Mapping):
        return {k: without_timings(v) for k, v in record.items() if k not in TIMING_KEYS}
    if isinstance(record, list):
        return [without_timings(v) for v in record]
    return record


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
