"""SPSG: SuperPixel Sample Gradient model stealing (Zhao et al., CVPR 2024, "Fully
Exploiting Every Real Sample: SuperPixel Sample Gradient Model Stealing"), the
reference study's Stage-1 strategy 4.

Each real sample ("base image") is cut into SLIC superpixels (Achanta et al., 2012;
scikit-image, ``n_segments=16``, ``compactness=10``). The victim answers the base image
and one copy per superpixel in which that superpixel's pixels are shifted by
``epsilon`` (SuperPixel Gradient Querying). The forward differences of the victim's
tempered soft output ``q = softmax(log p / T)``::

    G[k, c] = (q_c(x + delta_k) - q_c(x)) / (s_k * epsilon)

estimate the victim's input gradient summed over superpixel ``k`` (``s_k`` = +-1, the
shift's direction: down for bright superpixels, up for dark ones, so the shift is not
lost to clipping). Sample Gradient Purification keeps the large, reliable components:
entries whose answer difference is below the float32 noise floor of the answers, or
below ``purify`` times the image's largest entry, are set to zero, and the rest is
scaled to max-abs 1. A probed base image costs ``1 + K`` queries (``K`` its superpixel
count: SLIC returns up to about ``n_segments``, 9-12 on the digits demo), so the
study's 3,203 queries buy only about 188 base images if every image is probed.

**Budget split** (``probe_share``): a share of the budget goes to probed base images
(``1 + K`` queries each), the rest to plain base images answered once (KD examples, as
in ``random``). Probing everything (``probe_share: 1``, the paper's use of "every real
sample") spends 16 of every 17 queries on near-copies of 188 images. Measured on
CIFAR-10 (JPEG copy; cifar10-cpu recipe: VGG-11-BN width/4, 10 epochs; a 77.0% ResNet-18
width-16 victim; seed 0; 3,203 queries; one round; script /work/runs/spsg/trial.py of
the session of 2026-12-01), fidelity / test accuracy:

=====================================  ==============  =============
setting                                fidelity        test acc.
=====================================  ==============  =============
random, 3,203 pool images              57.57%          53.18%
probe_share 0.25, grad_weight 0.1      55.59%          50.78%
probe_share 0.25, grad_weight 0        55.49%          51.13%
probe_share 0.1, grad_weight 0.1       56.43%          51.48%
=====================================  ==============  =============

(probe_share 1 with grad_weight 1, the earlier default, reached 43.92% in the earlier
workflow run of this config.) Every query spent on a perturbed copy instead of a new
image costs fidelity; the gradient term adds nothing measurable at weight 0.1, and at
weight 1 it made training diverge on the digits demo whenever few probed images were
in a batch (15.8% test accuracy at ``probe_share: 1``, 25.3% at 0.1, against 88.1%
with no probes). The defaults (``probe_share: 0.1``, ``grad_weight: 0.1``) keep SPSG's
gradient queries while spending about 90% of the budget on distinct images; the
workflow reports SPSG beside its equal-budget random baseline.

The substitute is trained with

    loss = KD(substitute(aug(x)), p(x))  +  grad_weight * (1 - cos(J_sub v, G~ v))

where the KD term (Hinton et al., 2015, temperature ``T``) covers every answered image
(base and perturbed: each is a labelled example the attacker paid for; with
``kd_perturbed: false`` only the base images, as in the paper) and the gradient term
covers the base images in the batch, unaugmented, with the substitute in eval mode
(BatchNorm's running statistics: per-image gradients of the function that is tested).
``J_sub v`` is the substitute's input gradient of ``<v, softmax(z/T)>`` (autograd with
``create_graph=True``) pooled per superpixel along the very perturbations the victim
was asked about, ``G~`` the purified estimate, ``v ~ N(0, I_C)`` a fresh random class
projection per image and step (one double-backward per step instead of one per class;
its expectation covers the full Jacobian).

Base images are drawn uniformly at random from the pool (the paper's setting: a fixed,
small set of real samples; the choice does not depend on the substitute). The budget
is spent in ``rounds`` equal slices; after each slice a fresh substitute is trained on
everything answered so far and evaluated, which gives the fidelity-vs-queries curve
(``history`` rows carry ``round`` and ``queries``). All perturbed copies of a slice go
to the API in one call.

Differs from Zhao et al.: their purification thresholds and normalisation constants,
their choice of output (we use KD's tempered probabilities) and their gradient loss are
replaced by the relative threshold, max-abs scaling and cosine loss above; they match
the full gradient, we a random class projection of it; and by default the perturbed
copies also serve as KD examples. KD on a base image and its copies already fits the
victim's forward differences themselves, so the gradient term adds least there: on
the digits demo it raised test accuracy when training on base images only and made
no clear difference with the copies included, at about twice the training time (the
double backward through the convolutions dominates).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mextract.api import VictimAPI, quantize
from mextract.attacks.base import AttackContext, AttackResult, fit
from mextract.querylog import QueryLogStore
from mextract.train import Batch, Objective, kd_loss

#: version of SPSG's query-log fields and of the perturbation recipe training
#: regenerates from them; part of the log's key (:func:`log_store`), so a log of another
#: version is never reused (the store's own layout: :data:`mextract.querylog.FORMAT`)
LOG_FORMAT = 2
#: answer differences below this are float32 rounding, not signal
NOISE_FLOOR = 1e-6


# ---------------------------------------------------------------------------- queries
def superpixels(images: torch.Tensor, n_segments: int = 16,
                compactness: float = 10.0) -> torch.Tensor:
    """SLIC label maps (N, H, W) uint8, labels 0..K_i-1, for uint8 images (N, 3, H, W).

    scikit-image's SLIC works on one image at a time, so this is a per-image loop; it
    runs once per base image, outside training.
    """
    from skimage.segmentation import slic

    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.zeros(arr.shape[:3], dtype=np.uint8)
    for i, img in enumerate(arr):
        labels = slic(img, n_segments=n_segments, compactness=compactness, start_label=0,
                      channel_axis=-1)
        dense = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
        if dense.max() > 255:
            raise ValueError(f"SLIC gave {dense.max() + 1} superpixels; at most 256 fit")
        out[i] = dense
    return torch.from_numpy(out)


def segment_counts(seg: torch.Tensor) -> torch.Tensor:
    """Number of superpixels K_i of each label map (N,)."""
    return seg.flatten(1).amax(1).long() + 1


def perturb(images: torch.Tensor, seg: torch.Tensor, epsilon: float,
            k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The superpixel-perturbed copies the victim is asked about.

    Returns (uint8 copies (N, k_max, 3, H, W), directions s (N, k_max) of +-1): copy k
    of image i has superpixel k shifted by ``s * epsilon`` (down where the
    superpixel's mean intensity is above 1/2), clipped and rounded to 8 bits like any
    API query. Copies for k >= K_i equal the image and are never sent.
    """
    x = images.float() / 255.0
    masks = F.one_hot(seg.long(), k_max).permute(0, 3, 1, 2).to(x.dtype)  # (N, K, H, W)
    area = masks.sum((2, 3)).clamp_min(1.0)
    mean = torch.einsum("nchw,nkhw->nk", x, masks) / (x.shape[1] * area)
    sign = torch.where(mean > 0.5, -1.0, 1.0)
    shifted = x[:, None] + (epsilon * sign)[:, :, None, None, None] * masks[:, :, None]
    return quantize(shifted), sign


def directions(images: torch.Tensor, seg: torch.Tensor, epsilon: float,
               k_max: int) -> torch.Tensor:
    """u_k = (perturbed_k - x) / (s_k epsilon) as float (N, k_max, 3, H, W): about the
    superpixel's indicator, exactly the displacement the victim saw (after rounding and
    clipping). <grad, u_k> is the gradient pooled (summed) over superpixel k."""
    pert, sign = perturb(images, seg, epsilon, k_max)
    delta = (pert.float() - images[:, None].float()) / 255.0
    return delta / (epsilon * sign)[:, :, None, None, None]


def tempered(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): the victim's distribution at KD's temperature."""
    return torch.softmax(p.float().clamp_min(1e-12).log() / float(temperature), dim=-1)


def estimate_gradients(p_base: torch.Tensor, p_pert: torch.Tensor, sign: torch.Tensor,
                       counts: torch.Tensor, epsilon: float,
                       temperature: float) -> torch.Tensor:
    """Superpixel-level gradient estimate G (N, K, C) from forward differences of the
    tempered answers: p_base (N, C), p_pert (N, K, C), sign (N, K); rows k >= K_i are
    zero."""
    k_max = p_pert.shape[1]
    diff = tempered(p_pert, temperature) - tempered(p_base, temperature)[:, None]
    valid = torch.arange(k_max)[None, :] < counts[:, None]
    diff = torch.where((diff.abs() > NOISE_FLOOR) & valid[:, :, None], diff, 0.0)
    return diff / (epsilon * sign)[:, :, None]


def purify(grads: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sample Gradient Purification: per image, zero the entries below ``threshold``
    times the largest magnitude and scale the rest to max-abs 1 (all-zero estimates
    stay zero and are left out of the gradient loss)."""
    flat = grads.flatten(1)
    scale = flat.abs().amax(1, keepdim=True)
    keep = flat.abs() >= threshold * scale
    out = torch.where(keep & (scale > 0), flat / scale.clamp_min(1e-30), 0.0)
    return out.view_as(grads)


def probe_counts(seg: torch.Tensor, probed: torch.Tensor | None = None) -> torch.Tensor:
    """Perturbed copies asked per base image (N,): its superpixel count K_i where it is
    probed, 0 where it is only answered as it is (``probed`` None: all probed)."""
    counts = segment_counts(seg)
    return counts if probed is None else counts * probed.long()


def ask(api: VictimAPI, images: torch.Tensor, seg: torch.Tensor, epsilon: float,
        probed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query the base images and the perturbed copies of the probed ones (``probed``
    None: all) in one API call.

    Returns (answers for the bases (N, C), answers for the copies (N, k_max, C), zero
    where k >= K_i or the image is not probed). Costs N + sum of the probed K_i queries.
    """
    counts = probe_counts(seg, probed)
    k_max = max(1, int(counts.max()))
    pert, _ = perturb(images, seg, epsilon, k_max)
    valid = torch.arange(k_max)[None, :] < counts[:, None]
    answers = api.query(torch.cat([images, pert[valid]]))
    n = len(images)
    p_pert = answers.new_zeros(n, k_max, answers.shape[1])
    p_pert[valid] = answers[n:]
    return answers[:n], p_pert


# --------------------------------------------------------------------------- training
def gradient_loss(model: nn.Module, images: torch.Tensor, seg: torch.Tensor,
                  target: torch.Tensor, epsilon: float, temperature: float,
                  gen: torch.Generator) -> torch.Tensor:
    """1 - cos(substitute's pooled gradient, purified victim estimate), both projected
    on a random class direction per image; mean over images with a non-zero target.

    ``images`` uint8 (B, 3, H, W) unaugmented, ``seg`` (B, H, W), ``target`` (B, K, C)
    on the model's device. The gradient pass runs the substitute in eval mode (BatchNorm
    with its running statistics, as at test time: per-image gradients, no update of the
    statistics from the few base images of a batch). Differentiable in the model's
    parameters (double backward).
    """
    k_max = target.shape[1]
    u = directions(images, seg, epsilon, k_max)
    x = (images.float() / 255.0).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    q = torch.softmax(logits.float() / float(temperature), dim=1)
    v = torch.randn(q.shape, generator=gen, device=q.device)
    (grad,) = torch.autograd.grad((q * v).sum(), x, create_graph=True)
    pred = torch.einsum("bchw,bkchw->bk", grad, u)
    goal = torch.einsum("bkc,bc->bk", target.float(), v)
    used = goal.abs().sum(1) > 0
    cos = F.cosine_similarity(pred, goal, dim=1, eps=1e-12)
    return torch.where(used, 1.0 - cos, 0.0).sum() / used.sum().clamp_min(1)


def spsg_objective(temperature: float, grad_weight: float, epsilon: float) -> Objective:
    """KD on every row of the (augmented) batch plus ``grad_weight`` times the gradient
    loss on the batch's base images (``batch["base"]``, unaugmented)."""

    def objective(model: nn.Module, x: torch.Tensor, batch: Batch,
                  gen: torch.Generator) -> torch.Tensor:
        loss = kd_loss(model(x), batch["p"], temperature)
        base = batch["base"]
        if grad_weight > 0 and bool(base.any()):
            loss = loss + grad_weight * gradient_loss(
                model, batch["x0"][base], batch["seg"][base], batch["target"][base],
                epsilon, temperature, gen)
        return loss

    return objective


def training_set(log: dict[str, Any], upto: int, params: dict[str, Any]
                 ) -> tuple[torch.Tensor, Batch]:
    """Inputs and targets from the log's rounds < ``upto``: base images (with their
    superpixel maps and purified gradient targets) followed by every perturbed copy."""
    sel = log["round"] < upto
    images, seg = log["images"][sel], log["segments"][sel]
    p_base, p_pert = log["answers"][sel], log["perturbed_answers"][sel]
    counts = probe_counts(seg, log["probed"][sel])
    k_max = p_pert.shape[1]
    eps, temp = float(params["epsilon"]), float(params["temperature"])
    pert, sign = perturb(images, seg, eps, k_max)
    target = purify(estimate_gradients(p_base, p_pert, sign, counts, eps, temp),
                    float(params["purify"]))
    base: Batch = {"p": p_base, "base": torch.ones(len(images), dtype=torch.bool),
                   "x0": images, "seg": seg, "target": target}
    if not params["kd_perturbed"]:
        return images, base
    valid = torch.arange(k_max)[None, :] < counts[:, None]
    copies = pert[valid]
    m = len(copies)
    extra: Batch = {"p": p_pert[valid], "base": torch.zeros(m, dtype=torch.bool),
                    "x0": copies, "seg": seg.new_zeros(m, *seg.shape[1:]),
                    "target": target.new_zeros(m, *target.shape[1:])}
    inputs = torch.cat([images, copies])
    return inputs, {k: torch.cat([base[k], extra[k]]) for k in base}


# ------------------------------------------------------------------------ query log
def log_store(ctx: AttackContext, params: dict[str, Any]) -> QueryLogStore:
    """The job's query-log store (:mod:`mextract.querylog`): strategy, parameters,
    seed, pool and the API's fingerprint (a retrained victim is asked again), plus
    :data:`LOG_FORMAT`, the version of the perturbation recipe that training
    regenerates from the log."""
    return QueryLogStore.for_context(ctx, "spsg", params, recipe=LOG_FORMAT)


def split_budget(budget: int, probe_share: float, rounds: int, r: int) -> tuple[int, int]:
    """Cumulative (probe, total) query goals after slice ``r`` of ``rounds``: a share
    ``probe_share`` of the budget goes to probed base images (1 + K queries each), the
    rest to base images answered as they are (1 query each)."""
    total = budget * (r + 1) // rounds
    return int(round(total * probe_share)), total


def collect(ctx: AttackContext, params: dict[str, Any]) -> dict[str, Any]:
    """Spend the budget: random base images, slice by slice; in each slice first the
    probed ones (up to the slice's probe share), then plain ones up to its goal."""
    if ctx.api is None:
        raise ValueError("spsg is adaptive and needs the live API")
    budget, rounds = int(params["budget"]), int(params["rounds"])
    share = float(params["probe_share"])
    n_seg, compact = int(params["n_segments"]), float(params["compactness"])
    eps = float(params["epsilon"])
    order = torch.randperm(len(ctx.pool), generator=torch.Generator().manual_seed(ctx.seed))
    start = ctx.api.queries
    parts: list[dict[str, torch.Tensor]] = []
    pos = 0
    probe_spent = 0  # queries spent on probed base images and their copies, cumulative
    for r in range(rounds):
        probe_goal, goal = split_budget(budget, share, rounds, r)
        chosen, segs = [], []
        spent = ctx.api.queries - start
        # this slice's probes: up to the probe goal, never past the slice's total goal
        allowed = min(probe_goal - probe_spent, goal - spent)
        used = 0
        while pos < len(order) and used < allowed:
            # SLIC costs milliseconds per image: segment about what the slice can buy
            cand = order[pos:pos + min(256, (allowed - used) // (1 + n_seg) + 8)]
            seg = superpixels(ctx.pool[cand], n_seg, compact)
            cost = 1 + segment_counts(seg)
            take = (used + cost.cumsum(0)) <= allowed
            n_take = int(take.long().cumprod(0).sum())  # the prefix that fits
            chosen.append(cand[:n_take])
            segs.append(seg[:n_take])
            used += int(cost[:n_take].sum())
            pos += n_take
            if n_take < len(cand):
                break
        n_probed = sum(len(c) for c in chosen)
        probe_spent += used
        spent += used
        n_plain = max(0, min(goal - spent, len(order) - pos))
        plain = order[pos:pos + n_plain]
        pos += n_plain
        chosen.append(plain)
        segs.append(torch.zeros(n_plain, *ctx.pool.shape[2:], dtype=torch.uint8))
        idx, seg = torch.cat(chosen), torch.cat(segs)
        if len(idx) == 0:
            continue
        probed = torch.arange(len(idx)) < n_probed
        p_base, p_pert = ask(ctx.api, ctx.pool[idx], seg, eps, probed)
        parts.append({"indices": idx, "segments": seg, "probed": probed, "answers": p_base,
                      "perturbed_answers": p_pert,
                      "round": torch.full((len(idx),), r, dtype=torch.int64)})
    if not parts:
        raise ValueError(f"spsg: a budget of {budget} queries buys no base image")
    k_max = max(p["perturbed_answers"].shape[1] for p in parts)
    for p in parts:
        pa = p["perturbed_answers"]
        p["perturbed_answers"] = F.pad(pa, (0, 0, 0, k_max - pa.shape[1]))
    log: dict[str, Any] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    log.update({"format": LOG_FORMAT, "params": dict(params), "seed": ctx.seed,
                "pool_size": len(ctx.pool), "images": ctx.pool[log["indices"]].clone(),
                "count": ctx.api.queries - start, "api": ctx.api.description})
    return log


# --------------------------------------------------------------------------------- run
def run(ctx: AttackContext, params: dict[str, Any]) -> AttackResult:
    store = log_store(ctx, params)
    log = store.reuse()
    from_log = log is not None
    if log is None:
        log = store.save(collect(ctx, params), complete=True)
    rounds = log["round"].unique().tolist()  # a slice too small for any base image is absent
    history: list[dict[str, Any]] = []
    objective = spsg_objective(float(params["temperature"]), float(params["grad_weight"]),
                               float(params["epsilon"]))
    model = None
    for r in rounds:
        last = r == rounds[-1]
        sel = log["round"] <= r
        queries = int((1 + probe_counts(log["segments"][sel], log["probed"][sel])).sum())
        inputs, targets = training_set(log, r + 1, params)
        cfg = ctx.train_cfg if last else dataclasses.replace(
            ctx.train_cfg, eval_every=max(1, ctx.train_cfg.epochs))
        model, rows = fit(ctx, inputs, targets, objective, queries, tag=f"round{r}", cfg=cfg)
        rows = [{**row, "round": r + 1, "base_images": int(sel.sum())} for row in rows]
        history.extend(rows if last else rows[-1:])
    assert model is not None
    count = int(log["count"])
    probed = log["probed"]
    extra: dict[str, Any] = {"base_images": len(log["indices"]),
                             "probed_images": int(probed.sum()),
                             "probe_queries": int((1 + probe_counts(log["segments"][probed]))
                                                  .sum()),
                             "mean_superpixels": float(segment_counts(log["segments"][probed])
                                                       .float().mean()) if probed.any()
                             else 0.0,
                             **store.extra(log)}
    if not from_log and count != store.asked:
        raise RuntimeError("spsg: the log's count differs from the API's counter")
    return AttackResult(model, count, history, query_log=log, extra=extra)
