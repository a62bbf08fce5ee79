"""DFME: data-free model extraction (Truong, Maini, Walls & Papernot, CVPR 2021,
"Data-Free Model Extraction"; reference code github.com/cake-lab/datafree-model-
extraction, ``dfme/train.py``, ``dfme/approximate_gradients.py``,
``dfme/network/gan.py``). No pool image is ever asked: a generator makes the queries.

A generator G (the reference's ``GeneratorA``: linear layer to ngf*2 x S/4 x S/4,
two nearest-neighbour upsamplings with 3x3 conv + BatchNorm + LeakyReLU(0.2), a conv
to 3 channels, BatchNorm without affine parameters and tanh, mapped to [0, 1] images)
and the student S (the experiment's substitute architecture) play a game on the
disagreement D(x) = mean_c |S(x)_c - V(x)_c|, the L1 distance between the student's
logits and the victim's logits. The API answers probabilities; the victim's logits are
recovered as log-probabilities, mean-corrected (log p - mean_c log p, the reference's
``logit_correction: mean``; probabilities are clamped at 1e-12 before the log).
Each iteration:

1. ``g_iter`` generator steps: a batch x = G(z), z ~ N(0, I_nz); the gradient of the
   batch's mean disagreement w.r.t. x is estimated by forward differences along
   ``m`` random unit directions u_j (uniform on the sphere of dimension d = 3 S^2):

       g(x) = d / m * sum_j (D(x + eps u_j) - D(x)) / |delta_j| * delta_j / |delta_j|

   (asking the victim about x and the m shifted copies: batch * (m + 1) queries), and
   G ascends it (Adam, ``lr_g``) through x (``x.backward(-g)``, the reference's
   ``fake.backward(approx_grad_wrt_x)`` of the negated loss);
2. ``d_iter`` student steps: a fresh batch G(z) asked once (batch queries), S trained
   with L1 on the victim's corrected logits (SGD, ``lr_s``, momentum 0.9, weight decay
   5e-4).

So one iteration costs batch * (g_iter * (m + 1) + d_iter) queries and the job runs
floor(budget / that) iterations (the reference's ``cost_per_iteration`` and budget
loop); :func:`planned` gives both numbers and the API's counter equals their product.
Both learning rates drop by 0.3 at 10%, 30% and 50% of the iterations (the
reference's multistep schedule, per iteration instead of per epoch).

Differences from the reference, for an API that takes 8-bit images: its eps = 1e-3
steps (in the generator's pre-tanh space) move a pixel by ~1e-5, which 8-bit rounding
erases, so the steps are taken in image space with ``eps`` = 0.5 by default (the
per-pixel rms of a step is eps / sqrt(d), ~2.3 grey levels at 32x32x3) and each
difference is divided along the step the victim actually saw after rounding,
delta_j = q(x + eps u_j) - q(x), instead of eps u_j; the student sees the same
rounded images. The reference's hyperparameters are kept as defaults (batch 256,
m = 1, g_iter 1, d_iter 5, lr_s 0.1, lr_g 1e-4, nz 256, ngf 64); its 20M-query
CIFAR-10 budget is far beyond a CPU run, where the student stays close to chance.

The result is the student of the game (the paper's output), not a substitute
retrained with the experiment's recipe: the generated images are not kept (at the
paper's budget they would not fit in memory), only a digest of the student steps' answers. The query
log therefore holds the student's weights, its history and the iteration count; a
rerun with the same key reloads the student and asks nothing. A killed job starts
again (no partial logs).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mextract.api import VictimAPI, quantize
from mextract.attacks.base import AttackContext, AttackResult
from mextract.attacks.selection import round_log_store
from mextract.compute import Compute
from mextract.train import TrainConfig

#: milestones of the multistep schedule (fractions of the iterations) and its factor
MILESTONES = (0.1, 0.3, 0.5)
GAMMA = 0.3
#: probabilities are clamped here before the log
MIN_PROB = 1e-12


class Generator(nn.Module):
    """DFME's generator (the reference's GeneratorA), with [0, 1] image output."""

    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32) -> None:
        super().__init__()
        self.init = image_size // 4
        self.project = nn.Linear(nz, ngf * 2 * self.init ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, padding=1), nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, padding=1), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(len(z), -1, self.init, self.init)
        return (torch.tanh(self.body(h)) + 1) / 2


def planned(budget: int, batch: int, m: int, g_iter: int, d_iter: int) -> tuple[int, int]:
    """(iterations, queries) a budget buys: cost = batch * (g_iter * (m + 1) + d_iter)
    per iteration, floor(budget / cost) iterations, queries = iterations * cost."""
    cost = batch * (g_iter * (m + 1) + d_iter)
    iterations = budget // cost
    return iterations, iterations * cost


def victim_logits(probs: torch.Tensor) -> torch.Tensor:
    """Logits recovered from probabilities: log p, mean-corrected over the classes."""
    logp = probs.float().clamp_min(MIN_PROB).log()
    return logp - logp.mean(1, keepdim=True)


def disagreement(student: nn.Module, images: torch.Tensor, answers: torch.Tensor,
                 compute: Compute) -> torch.Tensor:
    """Per-image mean |S(x) - V(x)| over the classes (no gradient)."""
    with torch.no_grad():
        s = student(compute.images(images)).float().cpu()
    return (s - victim_logits(answers)).abs().mean(1)


def estimate_gradient(x: torch.Tensor, student: nn.Module, api: VictimAPI, compute: Compute,
                      m: int, eps: float, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-difference estimate of d mean(D) / dx for float images ``x`` [B, C, H, W]
    in [0, 1] (one API call of B * (m + 1) images); returns (gradient, D(x))."""
    b, dim = len(x), x[0].numel()
    u = torch.randn(b, m, dim, generator=gen)
    u = u / u.norm(dim=2, keepdim=True)
    base = quantize(x)
    shifted = quantize((x.reshape(b, 1, dim) + eps * u).reshape(b * m, *x.shape[1:]))
    asked = torch.cat([shifted, base])
    student.eval()
    d = disagreement(student, asked, api.query(asked), compute)
    d_shift, d_base = d[:b * m].view(b, m), d[b * m:]
    delta = (shifted.float() - base.float().repeat_interleave(m, 0)).view(b, m, dim) / 255
    norm2 = delta.pow(2).sum(2)
    slope = torch.where(norm2 > 0, (d_shift - d_base[:, None]) / norm2.clamp_min(1e-12),
                        torch.zeros_like(norm2))
    grad = dim * (slope[..., None] * delta).mean(1) / b  # of the batch mean
    return grad.view_as(x), d_base


def _lr_at(base: float, it: int, iterations: int) -> float:
    return base * GAMMA ** sum(it >= int(f * iterations) for f in MILESTONES)


def _student_recipe(params: dict[str, Any]) -> TrainConfig:
    """The student's SGD recipe (part of the query log's key)."""
    return TrainConfig(epochs=1, batch_size=int(params["batch_size"]),
                       lr=float(params["lr_s"]), momentum=0.9, weight_decay=5e-4,
                       label_smoothing=0.0, pct_start=0.25, eval_every=1)


def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    batch, m = int(params["batch_size"]), int(params["m"])
    g_iter, d_iter = int(params["g_iter"]), int(params["d_iter"])
    iterations, _ = planned(int(params["budget"]), batch, m, g_iter, d_iter)
    if iterations < 1:
        raise ValueError(f"dfme: a budget of {params['budget']} queries buys no iteration "
                         f"(one costs batch * (g_iter * (m + 1) + d_iter) = "
                         f"{batch * (g_iter * (m + 1) + d_iter)})")
    store = round_log_store(ctx, "dfme", params, _student_recipe(params))
    torch.manual_seed(ctx.seed)
    student = ctx.compute.prepare(ctx.new_substitute())
    log = store.reuse()
    if log is None:
        history, digest = play(ctx, params, student, store.api, iterations)
        log = store.save({"kind": "soft", "query_set": "dfme", "iterations": iterations,
                          "answers_sha256": digest, "student": student.state_dict(),
                          "history": history}, complete=True)
    else:
        student.load_state_dict(log["student"])
    student.eval()
    return AttackResult(student, int(log["count"]), list(log["history"]), query_log=log,
                        extra={**store.extra(log), "answers": "soft",
                               "iterations": int(log["iterations"])})


def play(ctx: AttackContext, params: dict[str, Any], student: nn.Module, api: VictimAPI,
         iterations: int) -> tuple[list[dict[str, Any]], str]:
    """The generator-student game (module docstring); trains ``student`` in place.
    Returns the history rows and the sha256 of the student steps' answers, in order."""
    if api.mode != "soft":
        raise ValueError(f"dfme needs soft answers; the API gives {api.description}")
    compute = ctx.compute
    batch, m = int(params["batch_size"]), int(params["m"])
    nz, eps = int(params["nz"]), float(params["eps"])
    lr_s, lr_g = float(params["lr_s"]), float(params["lr_g"])
    device = compute.torch_device
    generator = Generator(nz, int(params["ngf"]), int(ctx.pool.shape[-1])).to(device)
    opt_s = torch.optim.SGD(student.parameters(), lr=lr_s, momentum=0.9, weight_decay=5e-4)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g)
    gen = torch.Generator().manual_seed(ctx.seed)
    sha = hashlib.sha256()
    history: list[dict[str, Any]] = []
    checkpoints = {max(1, round(iterations * k / 5)) for k in range(1, 6)}
    d_mean = loss_s = torch.zeros(())
    for it in tqdm(range(iterations), desc="dfme", unit="it", mininterval=2.0):
        for group, base in ((opt_s, lr_s), (opt_g, lr_g)):
            for g in group.param_groups:
                g["lr"] = _lr_at(base, it, iterations)
        generator.train()
        for _ in range(int(params["g_iter"])):
            x = generator(torch.randn(batch, nz, generator=gen).to(device))
            grad, d = estimate_gradient(x.detach().cpu(), student, api, compute, m, eps, gen)
            opt_g.zero_grad(set_to_none=True)
            x.backward(-grad.to(device))  # ascend the estimated disagreement
            opt_g.step()
            d_mean = d.mean()
        student.train()
        for _ in range(int(params["d_iter"])):
            with torch.no_grad():
                images = quantize(generator(torch.randn(batch, nz, generator=gen).to(device))
                                  .cpu())
            answers = api.query(images)
            sha.update(answers.numpy().tobytes())
            target = victim_logits(answers).to(device)
            loss_s = F.l1_loss(student(compute.images(images)).float(), target)
            opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            opt_s.step()
        if it + 1 in checkpoints:
            student.eval()
            history.append({"iteration": it + 1, "queries": api.queries,
                            "loss": float(loss_s.detach()),
                            "disagreement": float(d_mean),
                            **ctx.evaluate(student)})
            student.train()
    student.eval()
    return history, sha.hexdigest()
