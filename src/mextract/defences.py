"""Defence layers of the victim API: probability layers, then label layers.

Layers compose in the order a config lists them (``apis.<name>.defences``; each
type's paper, formula and parameters: docs/defences.md). Every layer has ``acts_on``:

* ``"probs"``: a *probability layer*, ``layer(images_u8, logits, probs) -> probs``
  (float32 (N, K)); it sees the uint8 images the API received, the victim's logits
  and the probability vectors the layers before it served. These come first and may
  sit in soft or hard APIs:

  - ``topk`` (:class:`TopK`): only the k largest probabilities;
  - ``rounding`` (:class:`Rounding`): probabilities rounded to d decimals;
  - ``noise`` (:class:`Noise`): seeded additive noise, a function of the image bytes;
  - ``reverse_sigmoid`` (:class:`ReverseSigmoid`): Lee et al., IEEE S&P Workshops 2019;
  - ``mad`` (:class:`MAD`): prediction poisoning, Orekondy et al., ICLR 2020;
  - ``adaptive_misinformation`` (:class:`AdaptiveMisinformation`): Kariyappa &
    Qureshi, CVPR 2020.

* ``"labels"``: a *label layer*, ``layer(images_u8, logits, labels) -> labels``, only in
  hard APIs, after every probability layer:

  - ``honey`` (:class:`HoneyLabels`): the reference study's honey labels;
  - ``dawn`` (:class:`DawnWatermark`): DAWN's keyed API watermark (Szyller et al.,
    ACM MM 2021), which keeps a defender-side log of the watermarked answers. It must
    be the last layer, so that the labels it logs are the labels served.

Every layer has ``spec()``: its full configuration as JSON values, the input of
:attr:`mextract.api.VictimAPI.fingerprint` (which decides whether a saved query log
still describes the API). A secret enters only as a digest: DAWN's key as its
:func:`mextract.watermark.key_id`, never in clear; a layer's model as its weight
digest (:func:`mextract.io.tensor_digest`) next to its training spec.

Argument defaults come from ``config/schema.yaml``, their only home
(:func:`mextract.defence_specs.layer_defaults`). :func:`answer_distortion` measures what the layers
cost an honest user.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mextract import watermark
from mextract.defence_specs import LABEL_TYPES, MODEL_KINDS, layer_defaults, model_key, model_spec
from mextract.io import tensor_digest

_D = {kind: layer_defaults(kind) for kind in
      ("honey", "dawn", "topk", "rounding", "noise", "reverse_sigmoid", "mad",
       "adaptive_misinformation")}


class HoneyLabels:
    """The reference study's honey labels: where the victim's top-1 minus top-2 logit
    is below ``margin``, answer the top-2 class (a wrong label) instead of the top-1."""

    acts_on = "labels"

    def __init__(self, margin: float = _D["honey"]["margin"]) -> None:
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

    acts_on = "labels"

    def __init__(self, key: str, rate: float = _D["dawn"]["rate"]) -> None:
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



# ------------------------------------------------------------------ shared helpers
def top_label(probs: torch.Tensor, preferred: torch.Tensor) -> torch.Tensor:
    """The hard label of served probability vectors: the ``preferred`` class (the
    victim's top-1) wherever it holds the row's maximum, else the arg-max. A layer that
    creates ties (rounding, top-k of equal values) thus never moves the label to
    another tied class; it changes only where another class is strictly larger."""
    preferred = preferred.long().to(probs.device)
    holds_max = probs.gather(1, preferred[:, None])[:, 0] >= probs.max(dim=1).values
    return torch.where(holds_max, preferred, probs.argmax(dim=1))


#: mass moved to the top-1 class in a row where it ties with another for the maximum
TIE_BREAK = 1e-3


def _put_top1_first(served: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """``served`` (rows summing to 1) with class ``top1`` strictly on top: in every row
    the entries of its arg-max and of ``top1`` are swapped (values and sum unchanged);
    a row where ``top1`` then still ties with another class (e.g. a row clipped to
    uniform) becomes (1 - TIE_BREAK) row + TIE_BREAK e_top1."""
    cur = served.argmax(dim=1, keepdim=True)
    want = top1.long().to(served.device)[:, None]
    v_cur, v_want = served.gather(1, cur), served.gather(1, want)
    out = served.clone()
    out.scatter_(1, cur, v_want)
    out.scatter_(1, want, v_cur)
    top = out.gather(1, want)
    tied = ((out == top) & (torch.arange(out.shape[1], device=out.device) != want)).any(dim=1)
    onehot = F.one_hot(want[:, 0], out.shape[1]).to(out.dtype)
    return torch.where(tied[:, None], (1 - TIE_BREAK) * out + TIE_BREAK * onehot, out)


def _renormalise(q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows of the non-negative ``q`` scaled to sum 1; a row that is all zero becomes
    the one-hot vector of its ``fallback`` class."""
    total = q.sum(dim=1, keepdim=True)
    onehot = F.one_hot(fallback.long(), q.shape[1]).to(q.dtype)
    return torch.where(total > 0, q / total.clamp_min(torch.finfo(q.dtype).tiny), onehot)


def model_probs(model: nn.Module, images_u8: torch.Tensor,
                batch_size: int = 1024) -> torch.Tensor:
    """Softmax of a defence model for uint8 images (float32, on the CPU), in plain
    float32 (no autocast) on the device the model's parameters live on, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        for start in range(0, len(images_u8), batch_size):
            xb = images_u8[start:start + batch_size].to(device).float() / 255
            out.append(torch.softmax(model(xb).float(), dim=1).cpu())
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def model_digest(model: nn.Module) -> str:
    """Weight digest of a defence model (its ``state_dict`` values, buffers included)."""
    return tensor_digest(*model.state_dict().values())


# ------------------------------------------------------------- counter-based noise
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea, Flood, OOPSLA 2014), element-wise on
    uint64 arrays: a bijective mix whose outputs pass BigCrush for counter inputs."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_uniforms(images_u8: torch.Tensor, key: str, count: int) -> torch.Tensor:
    """``count`` uniform numbers in (0, 1) per image (float64 (N, count)), a
    deterministic function of (key, the image's bytes): the row's seed is the first 8
    bytes of HMAC-SHA256(key, image bytes) (:func:`mextract.watermark.dawn_digests`),
    the numbers are splitmix64 of seed + j * golden ratio (a counter-based generator,
    vectorised over rows and counters). The same image gets the same numbers in any
    batch, order or process."""
    digests = watermark.dawn_digests(images_u8, key)
    seeds = digests[:, :8].copy().view(">u8").reshape(-1, 1).astype(np.uint64)
    counters = np.arange(1, count + 1, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = _splitmix64(seeds + counters * _GOLDEN)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return torch.from_numpy(u)


# ------------------------------------------------------------- probability layers
class TopK:
    """Top-k truncation: serve the k largest probabilities of each answer and 0 for
    the other classes, *without* renormalising (what an API that lists only its top-k
    classes with their scores sends; the served mass 1 - sum tells the client how much
    was cut). k = 1 serves the top-1 class with its probability only. Ties at the k-th
    place keep the lower class indices. Discussed as a passive defence by Tramèr et
    al. (USENIX Security 2016, "Stealing Machine Learning Models via Prediction APIs")
    and Orekondy et al. (ICLR 2020); it keeps the top-1 label."""

    acts_on = "probs"

    def __init__(self, k: int = _D["topk"]["k"]) -> None:
        if int(k) < 1:
            raise ValueError(f"topk k must be >= 1, got {k}")
        self.k = int(k)
        self.name = f"topk(k={self.k})"

    def spec(self) -> dict[str, Any]:
        return {"type": "topk", "k": self.k}

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
        k = min(self.k, probs.shape[1])
        order = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :k]
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, True)
        return torch.where(keep, probs, torch.zeros_like(probs))


class Rounding:
    """Rounding of every probability to ``decimals`` decimals (as IBM ART's ``Rounded``
    postprocessor, ``art.defences.postprocessor.Rounded``; Tramèr et al., USENIX
    Security 2016). Not renormalised; probabilities below half a unit of the last
    decimal become 0 (with ``decimals: 0`` most answers are all-zero rows). Rounding is
    monotone, so the top-1 class still holds the maximum; where rounding creates a tie
    the hard label stays the victim's (:func:`top_label`)."""

    acts_on = "probs"

    def __init__(self, decimals: int = _D["rounding"]["decimals"]) -> None:
        if int(decimals) < 0:
            raise ValueError(f"rounding decimals must be >= 0, got {decimals}")
        self.decimals = int(decimals)
        self.name = f"rounding(decimals={self.decimals})"

    def spec(self) -> dict[str, Any]:
        return {"type": "rounding", "decimals": self.decimals}

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
        return torch.round(probs.double(), decimals=self.decimals).float()


class Noise:
    """Additive random noise on the probabilities (the "random noise" baseline of
    Orekondy et al., ICLR 2020; ART's ``GaussianNoise`` postprocessor adds Gaussian
    noise likewise): y' = normalise(max(0, y + scale * z)), z i.i.d. standard Gaussian
    or standard Laplace (``distribution``), rows renormalised to sum 1 (a row whose
    entries all fall to 0 becomes the one-hot vector of its largest noisy entry).

    Reproducible: z is a function of (``seed``, the image's bytes) only
    (:func:`row_uniforms`, Box-Muller for Gaussian, the inverse CDF for Laplace), so
    the same image always gets the same answer, as a deployed API would give, and
    query logs stay valid.

    ``keep_argmax``: where the noisy vector's arg-max is not the incoming top-1 class,
    the two entries are swapped, so the served top-1 is the victim's and the served
    row is a permutation of the noisy one (same values, sum 1); where the top-1 would
    still tie with another class, a mass of :data:`TIE_BREAK` moves to it."""

    acts_on = "probs"

    def __init__(self, distribution: str = _D["noise"]["distribution"],
                 scale: float = _D["noise"]["scale"],
                 keep_argmax: bool = _D["noise"]["keep_argmax"],
                 seed: int = _D["noise"]["seed"]) -> None:
        if distribution not in ("gaussian", "laplace"):
            raise ValueError(f"noise distribution must be gaussian or laplace, "
                             f"got {distribution!r}")
        if scale < 0:
            raise ValueError(f"noise scale must be >= 0, got {scale}")
        self.distribution = distribution
        self.scale = float(scale)
        self.keep_argmax = bool(keep_argmax)
        self.seed = int(seed)
        self.name = (f"noise({self.distribution},scale={self.scale:g}"
                     f"{',keep_argmax' if self.keep_argmax else ''})")

    def spec(self) -> dict[str, Any]:
        return {"type": "noise", "distribution": self.distribution, "scale": self.scale,
                "keep_argmax": self.keep_argmax, "seed": self.seed}

    def standard_noise(self, images: torch.Tensor, num_classes: int) -> torch.Tensor:
        """z (float64 (N, K)): the per-image standard noise before ``scale``."""
        key = f"mextract-noise-{self.seed}"
        if self.distribution == "gaussian":
            u = row_uniforms(images, key, 2 * num_classes)
            u1, u2 = u[:, :num_classes], u[:, num_classes:]
            return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        u = row_uniforms(images, key, num_classes) - 0.5
        return -torch.sign(u) * torch.log1p(-2.0 * u.abs())

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
        y = probs.double()
        noisy = y + self.scale * self.standard_noise(images, y.shape[1]).to(y.device)
        out = _renormalise(noisy.clamp_min(0.0), noisy.argmax(dim=1))
        if self.keep_argmax:
            out = _put_top1_first(out, probs.argmax(dim=1))
        return out.float()


class ReverseSigmoid:
    """Reverse sigmoid (Lee, Edraki, Alkhazraji, Dey, Kundur, Qi, "Defending against
    NN model stealing attacks using deceptive perturbations", IEEE S&P Workshops
    2019), with the formula of IBM ART's ``ReverseSigmoid`` postprocessor
    (``art/defences/postprocessor/reverse_sigmoid.py``)::

        r = beta * (sigmoid(gamma * logit(y)) - 1/2),   logit(y) = log(y / (1 - y))
        y' = normalise(clip(y - r, 0, 1))

    with y clipped to [1e-9, 1 - 1e-9] inside the logit. The perturbation inverts
    the sigmoid's shape, so that a model trained on y' (through its own softmax)
    learns misleading logits. The formula alone does not keep the top-1 class for
    every (beta, gamma) (y - r is not monotone in y when beta * gamma > 4 y (1-y) at
    some y), so the layer enforces it: where the served arg-max differs from the
    incoming top-1, the two entries are swapped (same values, sum 1), and where it
    still ties (large beta * gamma can clip a whole row to 1, i.e. uniform after
    normalising) a mass of :data:`TIE_BREAK` moves to it. A row clipped to all zeros
    becomes the one-hot vector of the incoming top-1."""

    acts_on = "probs"

    def __init__(self, beta: float = _D["reverse_sigmoid"]["beta"],
                 gamma: float = _D["reverse_sigmoid"]["gamma"]) -> None:
        if beta <= 0 or gamma <= 0:
            raise ValueError(f"reverse sigmoid beta and gamma must be > 0, got "
                             f"{beta}, {gamma}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.name = f"reverse_sigmoid(beta={self.beta:g},gamma={self.gamma:g})"

    def spec(self) -> dict[str, Any]:
        return {"type": "reverse_sigmoid", "beta": self.beta, "gamma": self.gamma}

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
        y = probs.double()
        yc = y.clamp(1e-9, 1 - 1e-9)
        r = self.beta * (torch.sigmoid(self.gamma * torch.log(yc / (1 - yc))) - 0.5)
        top1 = probs.argmax(dim=1)
        out = _renormalise((y - r).clamp(0.0, 1.0), top1)
        return _put_top1_first(out, top1).float()


def gradient_cosine(served: torch.Tensor, clean: torch.Tensor,
                    surrogate_probs: torch.Tensor) -> torch.Tensor:
    """Cosine between the attacker's last-layer gradients for targets ``served`` and
    ``clean`` (per row). For cross-entropy with a soft target y, the gradient of a
    linear last layer (W, b) on features h is ((p_s - y) h^T, p_s - y), p_s the
    model's softmax; both gradients share h, so their cosine is the cosine of
    p_s - y' and p_s - y in R^K (h drops out)."""
    return F.cosine_similarity(surrogate_probs - served, surrogate_probs - clean, dim=-1,
                               eps=1e-12)


def mad_perturb(y: torch.Tensor, surrogate_probs: torch.Tensor, epsilon: float,
                keep_argmax: bool = False) -> torch.Tensor:
    """MAD's perturbed answers (float64 (N, K)) for answers ``y`` and the surrogate's
    softmax on the same inputs (see :class:`MAD`)."""
    y = y.double()
    ps = surrogate_probs.double().to(y.device)
    n, k = y.shape
    classes = torch.arange(k, device=y.device)
    direction = torch.eye(k, dtype=y.dtype, device=y.device)[None] - y[:, None, :]
    l1 = direction.abs().sum(dim=2)  # (n, K): ||e_k - y||_1 = 2 (1 - y_k)
    step = (epsilon / l1.clamp_min(1e-12)).clamp(max=1.0)
    if keep_argmax:
        top = y.argmax(dim=1, keepdim=True)
        gap = y.gather(1, top) - y  # y_j - y_k >= 0
        # y'_j > y'_k  <=>  (1 - a) (y_j - y_k) > a  <=>  a < gap / (1 + gap)
        cap = gap / (1.0 + gap) * (1.0 - 1e-6)
        step = torch.where(classes[None] == top, step, torch.minimum(step, cap))
    candidates = y[:, None, :] + step[..., None] * direction  # (n, K, K)
    cos = gradient_cosine(candidates, y[:, None, :], ps[:, None, :])
    best = cos.argmin(dim=1)
    return candidates[torch.arange(n, device=y.device), best]


class MAD:
    """Prediction poisoning with MAD, Maximizing Angular Deviation (Orekondy, Schiele,
    Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model Stealing Attacks",
    ICLR 2020; reference code github.com/tribhuvanesh/prediction-poisoning,
    ``defenses/victim/bb_mad.py``). Each answer y is replaced by the y' in the simplex
    with ||y' - y||_1 <= ``epsilon`` whose gradient on the attacker's model points as
    far as possible from the gradient of y: max angle(G^T y', G^T y), G the Jacobian of
    the attacker's log-likelihoods w.r.t. its parameters. The defender does not know
    the attacker's model, so G comes from a *surrogate* model the defender holds
    (``model``; :func:`mextract.defence_models.train_defence_model` trains one).

    What this layer computes (vectorised over rows and candidates):

    * G of the surrogate's last linear layer only (as the reference code,
      ``compute_jacobian_nll``, which differentiates the last weight matrix): for a
      soft target y the gradient is (p_s - y) h^T, so angle(G^T y', G^T y) is the angle
      between p_s - y' and p_s - y (:func:`gradient_cosine`; exact, h drops out).
    * Candidates: the simplex vertices e_k (the paper's heuristic, the reference code's
      ``oracle_extreme``), each moved to by the line search y'_k = (1 - a) y + a e_k
      with the largest feasible a = min(1, epsilon / ||e_k - y||_1) (the reference's
      closed-form ``linesearch``). With ``keep_argmax`` a is also capped below
      gap / (1 + gap), gap = y_top - y_k, so the top-1 class stays strictly on top
      (the reference instead searches argmax-preserving vertex sets).
    * The served answer is the candidate with the largest angle *after* the line
      search (the reference ranks vertices before it; ranking the feasible points picks
      what is actually served, and never less deviation).

    The answers stay in the simplex (convex combinations of y and a vertex) within the
    L1 budget. Note the reference's default oracle objective, the unnormalised
    ||G^T (e_k - y)||^2 = ||e_k - y||^2 ||h||^2, does not depend on the surrogate at
    all (it picks the least likely class); this layer uses the paper's angular
    objective."""

    acts_on = "probs"

    def __init__(self, model: nn.Module, epsilon: float = _D["mad"]["epsilon"],
                 keep_argmax: bool = _D["mad"]["keep_argmax"],
                 model_spec: Mapping[str, Any] | None = None,
                 chunk: int = 1024) -> None:
        if not 0 <= epsilon <= 2:
            raise ValueError(f"MAD epsilon must lie in [0, 2], got {epsilon}")
        self.model = model.eval()
        self.epsilon = float(epsilon)
        self.keep_argmax = bool(keep_argmax)
        self.model_spec = dict(model_spec or {})
        self.chunk = int(chunk)
        self.name = f"mad(eps={self.epsilon:g}{',keep_argmax' if self.keep_argmax else ''})"

    def spec(self) -> dict[str, Any]:
        return {"type": "mad", "epsilon": self.epsilon, "keep_argmax": self.keep_argmax,
                "model": {**self.model_spec, "weights": model_digest(self.model)}}

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
        if self.epsilon == 0 or len(probs) == 0:
            return probs
        ps = model_probs(self.model, images)
        out = torch.cat([mad_perturb(probs[i:i + self.chunk], ps[i:i + self.chunk],
                                     self.epsilon, self.keep_argmax)
                         for i in range(0, len(probs), self.chunk)]).float()
        if self.keep_argmax:  # float32 rounding must not create a tie at the top
            top1 = probs.argmax(dim=1)
            lost = top_label(out, top1) != top1
            out = torch.where(lost[:, None], probs, out)
        return out


class AdaptiveMisinformation:
    """Adaptive Misinformation (Kariyappa, Qureshi, "Defending Against Model Stealing
    Attacks with Adaptive Misinformation", CVPR 2020). Model-stealing queries tend to
    be out of distribution; the defence answers those with misinformation:

        y' = (1 - alpha) y + alpha * f_hat(x),  alpha = 1[S(x) < tau]  (hard switch)
                                           or alpha = sigmoid(nu * (tau - S(x)))

    S(x) is the OOD score, here the victim's maximum softmax probability (Hendrycks &
    Gimpel's baseline detector; the paper scores with the defended model trained with
    outlier exposure, which our victims are not); f_hat is the *misinformation model*
    (``model``), trained on the defender's data to put low probability on the correct
    class, loss -log(1 - f_hat(x)_y) (:func:`mextract.defence_models.
    misinformation_loss`). With the hard switch (``nu`` null) inputs with S(x) >= tau
    get the incoming answer exactly; with ``nu`` every answer is blended, by less than
    a half where S(x) > tau. The misinformation model runs only on rows with alpha > 0."""

    acts_on = "probs"

    def __init__(self, model: nn.Module,
                 tau: float = _D["adaptive_misinformation"]["tau"],
                 nu: float | None = _D["adaptive_misinformation"]["nu"],
                 model_spec: Mapping[str, Any] | None = None) -> None:
        if not 0 < tau <= 1:
            raise ValueError(f"adaptive misinformation tau must lie in (0, 1], got {tau}")
        if nu is not None and nu <= 0:
            raise ValueError(f"adaptive misinformation nu must be > 0, got {nu}")
        self.model = model.eval()
        self.tau = float(tau)
        self.nu = None if nu is None else float(nu)
        self.model_spec = dict(model_spec or {})
        switch = "hard" if self.nu is None else f"nu={self.nu:g}"
        self.name = f"adaptive_misinformation(tau={self.tau:g},{switch})"

    def spec(self) -> dict[str, Any]:
        return {"type": "adaptive_misinformation", "tau": self.tau, "nu": self.nu,
                "model": {**self.model_spec, "weights": model_digest(self.model)}}

    def alpha(self, probs: torch.Tensor) -> torch.Tensor:
        """The misinformation weight of each row (float64)."""
        score = probs.double().max(dim=1).values
        if self.nu is None:
            return (score < self.tau).double()
        return torch.sigmoid(self.nu * (self.tau - score))

    def __call__(self, images: torch.Tensor, logits: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha(probs)
        rows = (alpha > 0).nonzero().flatten()
        if len(rows) == 0:
            return probs
        a = alpha[rows, None]
        mis = model_probs(self.model, images[rows.cpu()]).double().to(probs.device)
        out = probs.clone()
        out[rows] = ((1 - a) * probs[rows].double() + a * mis).float()
        return out


# ------------------------------------------------------------------ composition
#: defence layer classes by config ``type``
LAYERS: dict[str, type] = {
    "honey": HoneyLabels, "dawn": DawnWatermark, "topk": TopK, "rounding": Rounding,
    "noise": Noise, "reverse_sigmoid": ReverseSigmoid, "mad": MAD,
    "adaptive_misinformation": AdaptiveMisinformation}
assert set(LAYERS) == set(_D), "every layer type needs its schema block"
assert {k for k, c in LAYERS.items() if c.acts_on == "labels"} == set(LABEL_TYPES)


def build_defences(specs: list[dict] | None,
                   models: Mapping[str, nn.Module] | None = None) -> list:
    """Defence layers from config entries such as ``{"type": "honey", "margin": 1.5}``,
    ``{"type": "dawn", "rate": 0.005, "key": "..."}`` or ``{"type": "noise", "scale":
    0.1}``. A layer with a model (``mad``, ``adaptive_misinformation``) gets
    ``models[model_key(spec)]`` (:func:`mextract.defence_specs.model_key`); its
    ``model`` entry is the model's training spec (defaults filled in)."""
    layers = []
    for spec in specs or []:
        spec = dict(spec)
        kind = spec.get("type")
        if kind not in LAYERS:
            raise ValueError(f"unknown defence type {kind!r}; known: {sorted(LAYERS)}")
        if kind in MODEL_KINDS:
            key = model_key(spec)
            if models is None or key not in models:
                raise ValueError(f"the {kind} layer needs the defence model {key!r} "
                                 f"(given: {sorted(models or {})})")
            spec["model_spec"] = model_spec(spec)
            spec["model"] = models[key]  # type: ignore[index]
        spec.pop("type")
        layers.append(LAYERS[kind](**spec))
    check_order(layers)
    return layers


def check_order(layers: list) -> None:
    """Probability layers come before label layers (a label layer's answer is a class
    index, not a probability vector), and a DAWN layer comes last (a later layer would
    change labels it has logged). Raises ValueError naming the misplaced layer."""
    seen_label: Any = None
    for i, layer in enumerate(layers):
        if getattr(layer, "acts_on", "labels") == "labels":
            seen_label = seen_label or layer
        elif seen_label is not None:
            raise ValueError(
                f"probability layer {layer.name} (number {i + 1} of {len(layers)}) comes "
                f"after the label layer {seen_label.name}: probability layers act on the "
                "probability vectors and must come before every label layer")
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


def answer_distortion(served: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """What the defence layers cost an honest user: ``mean_l1``, the mean L1 distance
    of the served answers from the undefended probability vectors ``clean`` (N, K),
    and ``top1_changed``, the share of answers whose hard label (:func:`top_label`:
    the clean top-1 where it still holds the served maximum) is not the clean top-1.
    ``served`` may be probability vectors (N, K) or hard labels (N,), read as one-hot
    vectors. nan for no answers."""
    clean = clean.double()
    if served.dim() == 1:
        served = F.one_hot(served.long(), clean.shape[1])
    served = served.double().to(clean.device)
    if len(clean) == 0:
        return {"mean_l1": float("nan"), "top1_changed": float("nan")}
    top1 = clean.argmax(dim=1)
    return {"mean_l1": (served - clean).abs().sum(dim=1).mean().item(),
            "top1_changed": (top_label(served, top1) != top1).double().mean().item()}
