"""One training loop for the victim and every substitute.

The training inputs stay a uint8 tensor on the compute device; each step slices a
batch from it, augments the whole batch with tensor ops, and calls an *objective*
(a loss of the model on the batch). SGD with Nesterov momentum and a one-cycle
learning-rate schedule, as in the reference study. A checkpoint (model, optimizer,
scheduler, RNG states, history) is written atomically after every epoch; a rerun
continues from it.

Randomness: the batch order and the objective draw from one seeded generator, the
augmentation from a second one (seeded from the same seed), so the augmented batch
of step i+1 can be prepared in a background thread while step i trains
(``Compute.prefetch``) without changing any result. The per-step loss stays on the
device and is read once per epoch (no host synchronisation per step on a GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mextract import defaults
from mextract.compute import Compute
from mextract.io import CorruptArtifactError, load_artifact, save_artifact

Batch = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, torch.Tensor, Batch, torch.Generator], torch.Tensor]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Evaluate = Callable[[nn.Module], dict[str, float]]


_DEFAULTS = defaults.of("train")  # config/schema.yaml, $defs.train


@dataclass
class TrainConfig:
    """One training recipe (the config's ``train`` entries; defaults from the schema)."""

    epochs: int = _DEFAULTS["epochs"]
    batch_size: int = _DEFAULTS["batch_size"]
    lr: float = _DEFAULTS["lr"]
    momentum: float = _DEFAULTS["momentum"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    label_smoothing: float = _DEFAULTS["label_smoothing"]
    pct_start: float = _DEFAULTS["pct_start"]
    eval_every: int = _DEFAULTS["eval_every"]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cross_entropy(label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy on hard labels ``batch["y"]``."""

    def objective(model: nn.Module, x: torch.Tensor, batch: Batch,
                  gen: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(x), batch["y"], label_smoothing=label_smoothing)

    return objective


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, batch mean.

    The API answers probabilities p = softmax(z); softmax(log p / T) equals
    softmax(z / T), so the teacher's tempered distribution is recovered exactly.
    """
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = F.softmax(teacher_probs.float().clamp_min(1e-12).log() / t, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * t * t


def distillation(temperature: float = 3.0) -> Objective:
    """KD on soft labels ``batch["p"]`` (probability vectors from the API)."""

    def objective(model: nn.Module, x: torch.Tensor, batch: Batch,
                  gen: torch.Generator) -> torch.Tensor:
        return kd_loss(model(x), batch["p"], temperature)

    return objective


def augment_seed(seed: int) -> int:
    """Seed of the augmentation generator of a training run with ``seed`` (a fixed
    odd-multiplier hash, so it never equals a nearby run seed)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) % (1 << 63)


def _rng_state(gen: torch.Generator, aug_gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"gen": gen.get_state(), "augment": aug_gen.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(gen: torch.Generator, aug_gen: torch.Generator,
                   state: Mapping[str, torch.Tensor]) -> None:
    gen.set_state(state["gen"])
    if "augment" in state:
        aug_gen.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train(model: nn.Module, inputs: torch.Tensor, targets: Batch, objective: Objective,
          cfg: TrainConfig, compute: Compute, *, seed: int = 0,
          augment: Augment | None = None, evaluate: Evaluate | None = None,
          checkpoint: str | Path | None = None, desc: str = "train",
          extra_log: Mapping[str, Any] | None = None,
          prefetch: bool | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place; return the per-epoch history.

    ``inputs``: uint8 images (N, 3, H, W); ``targets``: tensors indexed like inputs.
    ``augment`` maps a uint8 batch on the device to a float [0, 1] batch; it receives
    the run's augmentation generator (never the objective's).
    ``extra_log`` entries are copied into every history row (e.g. queries spent).
    ``prefetch``: prepare (slice + augment) the next batch in a background thread
    while the current one trains; ``None`` takes ``compute.prefetch``. The results are
    the same either way.
    """
    n = len(inputs)
    if n == 0:
        raise ValueError(f"{desc}: no training examples")
    device = compute.torch_device
    model = compute.prepare(model)
    forward = compute.compiled(model)  # the model itself unless compute.compile
    x_all = inputs.to(device)
    t_all = {k: v.to(device) for k, v in targets.items()}
    steps = max(1, math.ceil(n / cfg.batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=True, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps
    # OneCycleLR divides by (pct_start * total_steps - 1): nudge the exact zero case
    # (e.g. 4 steps with pct_start 0.25) by a millionth instead of failing
    pct_start = cfg.pct_start * (1 + 1e-6) if cfg.pct_start * total_steps == 1 else cfg.pct_start
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start)
    gen = torch.Generator(device=device).manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(augment_seed(seed))
    torch.manual_seed(seed)
    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0
    use_prefetch = compute.prefetch if prefetch is None else bool(prefetch)
    # Per-step host reads (loss.item(), the finiteness check) are free on the CPU and
    # stall a GPU's queue; elsewhere the epoch's losses are summed on the device.
    host_sync = device.type == "cpu"

    ckpt_path = Path(checkpoint) if checkpoint else None
    if ckpt_path is not None and ckpt_path.exists():
        try:
            state = load_artifact(ckpt_path, map_location=device)
        except CorruptArtifactError as err:
            tqdm.write(f"{desc}: ignoring unreadable checkpoint ({err})")
            state = None
        if state is not None and state.get("n") == n and state.get("cfg") == cfg.as_dict():
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(gen, aug_gen, state["rng"])
            start_epoch, elapsed = int(state["epoch"]), float(state["elapsed"])
            history = list(state["history"])
            tqdm.write(f"{desc}: resumed from '{ckpt_path}' after epoch {start_epoch}")

    def prepare(idx: torch.Tensor) -> torch.Tensor | None:
        """The augmented float batch of indices ``idx`` (None: too small to train on)."""
        if len(idx) < 2:  # BatchNorm needs two samples; the step count stays fixed
            return None
        xb = x_all[idx]
        xb = augment(xb, aug_gen) if augment is not None else compute.images(xb)
        return xb.contiguous(memory_format=compute.memory_format)

    pool = ThreadPoolExecutor(1, thread_name_prefix=f"{desc}-prefetch") if use_prefetch else None
    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, unit="epoch", mininterval=2.0,
               initial=start_epoch, total=cfg.epochs)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n, device=device, generator=gen)
            batches = [perm[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps)]
            # with prefetch, batch i + 1 is prepared while step i trains (one epoch ahead
            # at most, so a checkpoint always holds the augmentation generator's state)
            ahead: Future | None = pool.submit(prepare, batches[0]) if pool else None
            total = torch.zeros((), dtype=torch.float64, device=device)
            finite = torch.ones((), dtype=torch.bool, device=device)
            seen = 0
            for i, idx in enumerate(batches):
                if pool is not None and ahead is not None:
                    xb = ahead.result()
                    ahead = pool.submit(prepare, batches[i + 1]) if i + 1 < steps else None
                else:
                    xb = prepare(idx)
                if xb is None:
                    sched.step()
                    continue
                batch = {k: v[idx] for k, v in t_all.items()}
                with compute.autocast():
                    loss = objective(forward, xb, batch, gen)
                if host_sync and not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{desc}: loss became {loss.item()} in epoch {epoch + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss = loss.detach()
                total += loss.double() * len(idx)
                if not host_sync:
                    finite &= torch.isfinite(loss)
                seen += len(idx)
            if not bool(finite):
                raise FloatingPointError(f"{desc}: loss became non-finite in epoch {epoch + 1}")
            elapsed += time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": total.item() / max(seen, 1),
                                   "train_time_s": round(elapsed, 3)}
            if extra_log:
                row.update(extra_log)
            if evaluate is not None and ((epoch + 1) % cfg.eval_every == 0
                                         or epoch + 1 == cfg.epochs):
                row.update(evaluate(model))
            history.append(row)
            bar.set_postfix({k: (round(v, 4) if isinstance(v, float) else v)
                             for k, v in row.items()
                             if k in ("loss", "test_accuracy", "fidelity")})
            if ckpt_path is not None:
                save_artifact({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(),
                               "rng": _rng_state(gen, aug_gen),
                               "epoch": epoch + 1, "elapsed": elapsed, "history": history,
                               "n": n, "cfg": cfg.as_dict()}, ckpt_path)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    model.eval()
    return history
