"""PRADA: query-stream detection of model extraction (Juuti, Szyller, Marchal, Asokan,
"PRADA: Protecting against DNN Model Stealing Attacks", IEEE EuroS&P 2019,
arXiv:1805.02628; reference code: github.com/SSGAalto/prada-protecting-against-dnn-
model-stealing-attacks, ``src/growing_set.py``).

The idea: the images an honest client sends are natural samples, and the distance from
each new one to the nearest earlier one is roughly normally distributed; the synthetic
queries of an extraction attack (JBDA-style perturbations of a few seeds, iterated
adversarial steps) sit at a few characteristic distances from earlier queries, which
skews that distribution. Per client, :class:`Prada` keeps

* for each class ``c`` (the victim's answer to the query) a *growing set* ``G_c`` of
  that client's earlier queries, with a threshold ``T_c`` (0 at the start) and the list
  ``DG_c`` of the distances with which its members joined;
* the set ``D`` of minimum distances of all the client's queries.

For each query ``x`` of class ``c``, in stream order: if ``G_c`` is empty, ``x``
starts it (``DG_c = [0]``, ``T_c = 0``) and adds nothing to ``D``. Otherwise
``d_min = min_{y in G_c} ||x - y||_2`` is added to ``D``; if ``d_min > T_c``, ``x``
joins ``G_c``, ``d_min`` joins ``DG_c``, and ``T_c = max(T_c, mean(DG_c) - std(DG_c))``.
Once ``D`` holds enough values, ``D'`` = ``D`` without its outliers (values at 3
standard deviations or more from the mean) is tested with the Shapiro-Wilk test and
the client is flagged when the statistic ``W(D') < delta``.

Following the reference code (``GrowingDistanceAgent.single_query``, the authors'
implementation of the paper's Algorithm 1; the paper's own text was not at hand when
this was written, so the reference code is the source of these details): the
per-class growing sets, the threshold rule (``mean - std`` of the set's distances,
population standard deviation, never decreasing, the set's first member counted with
distance 0), ``D`` pooled over all classes and holding every query's ``d_min``
(whether or not the query joined its set), the 3-sigma outlier removal (strict ``<``)
and the test ``W < delta``. The class of a query is what the caller passes (the
victim's prediction, as in the paper). Distances are L2 between the images as float
pixels in [0, 1], flattened (the reference code's ``l2`` on the query arrays).

Chosen here:

* ``delta = 0.9``: the paper tunes ``delta`` per model and data set so that benign
  clients are not flagged; we chose 0.9 from honest clients on scikit-learn's digits
  (tests/test_detection.py; docs/detection.md has the numbers: their lowest ``W`` over
  a 1,000-query stream was 0.92-0.96, while JBDA-like streams fall below 0.9 at the
  first test). Calibrate it on the victim's own test set with :func:`benign_fpr`.
* ``min_distances = 101``: the test runs once ``D`` holds at least this many values,
  i.e. more than 100 as in the reference code (which counts after outlier removal;
  we count ``D`` itself, so whether a test runs does not depend on the data).
* ``check_every = 1``: the test runs after every query, so ``flagged_at`` is the exact
  query (the reference code tests every 10th query: ``check_every=10``). Each test
  costs about 0.3-0.8 ms (``scipy.stats.shapiro`` on up to 5,000 values), the largest
  share of the time on long honest streams.
* The reference code pools only classes with at least 10 distances; we pool all.
* A flag is final: once flagged, a client stays flagged (the reference code
  recomputes its flag at every test) and no further tests are run.
* A degenerate ``D'`` (fewer than 3 values, or all equal, e.g. one image sent again
  and again) has no shape to test and counts as ``W = 1`` (not flagged), as
  ``scipy.stats.shapiro`` would return.

Computation: a batch is split by class, and each class's queries are compared with
that class's stored set and with each other as two matrix products (``||a||^2 +
||b||^2 - 2 a.b``) on the 0..255 integer pixel values in float64, which are exact
(every partial sum stays below 2**53), so the result does not depend on how the
stream is batched. Only the admission rule runs per query (a vector ``minimum`` per
admitted query). The stored sets take 8 bytes per pixel (24 KiB per 3x32x32 image).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

OUTLIER_SD = 3.0  # D' drops values at this many standard deviations from D's mean
CHUNK = 1024  # queries of one class compared at once (bounds the chunk x chunk matrix)


@dataclass
class _GrowingSet:
    """One class's growing set ``G_c``: members (flattened 0..255 values in float64),
    their squared norms, the distances with which they joined (``DG_c``) and ``T_c``."""

    features: int
    vectors: torch.Tensor = field(init=False)
    norms: torch.Tensor = field(init=False)
    size: int = 0
    joined: list[float] = field(default_factory=lambda: [0.0])
    total: float = 0.0
    total_sq: float = 0.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        self.vectors = torch.empty(16, self.features, dtype=torch.float64)
        self.norms = torch.empty(16, dtype=torch.float64)

    def add(self, rows: torch.Tensor, norms: torch.Tensor) -> None:
        need = self.size + len(rows)
        if need > len(self.vectors):
            cap = max(need, 2 * len(self.vectors))
            vectors = torch.empty(cap, self.features, dtype=torch.float64)
            vectors[: self.size] = self.vectors[: self.size]
            grown = torch.empty(cap, dtype=torch.float64)
            grown[: self.size] = self.norms[: self.size]
            self.vectors, self.norms = vectors, grown
        self.vectors[self.size: need] = rows
        self.norms[self.size: need] = norms
        self.size = need

    def join(self, distance: float) -> None:
        """``distance`` joins ``DG_c``; ``T_c = max(T_c, mean - std)`` over ``DG_c``."""
        self.joined.append(distance)
        self.total += distance
        self.total_sq += distance * distance
        n = len(self.joined)  # the first member's 0 counts in n but adds nothing to sums
        mean = self.total / n
        std = math.sqrt(max(self.total_sq / n - mean * mean, 0.0))
        self.threshold = max(self.threshold, mean - std)


def _sq_dists(x: torch.Tensor, x_norms: torch.Tensor, y: torch.Tensor,
              y_norms: torch.Tensor) -> torch.Tensor:
    """Exact squared L2 distances (integer-valued float64 inputs), shape (len(x), len(y))."""
    return (x_norms[:, None] + y_norms[None, :] - 2.0 * (x @ y.T)).clamp_(min=0.0)


def shapiro_w(distances: np.ndarray) -> float:
    """Shapiro-Wilk ``W`` of ``distances`` after PRADA's outlier removal (values at
    :data:`OUTLIER_SD` or more standard deviations from the mean are dropped); 1.0 where
    fewer than 3 values remain or all are equal."""
    d = np.asarray(distances, dtype=np.float64)
    sd = d.std()
    if sd > 0:
        d = d[np.abs(d - d.mean()) < OUTLIER_SD * sd]
    if len(d) < 3 or np.ptp(d) == 0:
        return 1.0
    with warnings.catch_warnings():  # n > 5000: scipy warns that its p-value is rough
        warnings.simplefilter("ignore", UserWarning)
        return float(stats.shapiro(d).statistic)


class Prada:
    """PRADA's detector for one client's query stream (see the module docstring).

    ``observe`` takes the client's queries in stream order, in batches of any size (the
    state after a stream does not depend on how it was batched). ``flagged_at`` is the
    1-based stream index of the query after which the client was first flagged (None
    while not flagged), ``queries_seen`` the number of queries observed, ``last_w`` the
    latest Shapiro-Wilk statistic and ``tests`` how many tests have run.
    """

    def __init__(self, delta: float = 0.9, min_distances: int = 101,
                 check_every: int = 1) -> None:
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"PRADA: delta must be in (0, 1], got {delta}")
        if min_distances < 3:
            raise ValueError(f"PRADA: min_distances must be >= 3, got {min_distances}")
        if check_every < 1:
            raise ValueError(f"PRADA: check_every must be >= 1, got {check_every}")
        self.delta = float(delta)
        self.min_distances = int(min_distances)
        self.check_every = int(check_every)
        self.queries_seen = 0
        self.flagged_at: int | None = None
        self.last_w: float | None = None
        self.tests = 0
        self._sets: dict[int, _GrowingSet] = {}
        self._d = np.empty(1024, dtype=np.float64)  # D, in stream order
        self._d_pos = np.empty(1024, dtype=np.int64)  # each value's 1-based query index
        self._n_d = 0

    def spec(self) -> dict[str, Any]:
        """The detector's parameters, as JSON values."""
        return {"method": "prada", "delta": self.delta, "min_distances": self.min_distances,
                "check_every": self.check_every, "outlier_sd": OUTLIER_SD,
                "distance": "l2, pixels in [0, 1]"}

    @property
    def distances(self) -> np.ndarray:
        """``D``: the minimum distance of every query that had a same-class predecessor,
        in stream order (a copy)."""
        return self._d[: self._n_d].copy()

    def state(self) -> dict[str, Any]:
        """Everything the detector has stored (copies): per class the growing set's
        members as uint8 images flattened, ``DG_c`` and ``T_c``; ``D`` with the stream
        index of each value; the counters and the flag."""
        sets = {c: {"members": s.vectors[: s.size].to(torch.uint8),
                    "joined": list(s.joined), "threshold": s.threshold}
                for c, s in sorted(self._sets.items())}
        return {"sets": sets, "distances": self.distances,
                "positions": self._d_pos[: self._n_d].copy(),
                "queries_seen": self.queries_seen, "flagged_at": self.flagged_at,
                "last_w": self.last_w, "tests": self.tests}

    def observe(self, images_u8: torch.Tensor, classes: torch.Tensor) -> int | None:
        """Process a batch of the client's queries, in order: ``images_u8`` (N, C, H, W)
        uint8 as the API received them, ``classes`` (N,) the API's predicted classes.
        Returns ``flagged_at`` (the 1-based stream index of the first flagged query, in
        this batch or before) or None."""
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
            raise ValueError("PRADA: images must be a uint8 tensor (N, C, H, W), got "
                             f"{images_u8.dtype} {tuple(images_u8.shape)}")
        classes = torch.as_tensor(classes).reshape(-1)
        if len(classes) != len(images_u8):
            raise ValueError(f"PRADA: {len(images_u8)} images but {len(classes)} classes")
        n = len(images_u8)
        if n == 0:
            return self.flagged_at
        flat = images_u8.reshape(n, -1).cpu().to(torch.float64)
        if self._sets and flat.shape[1] != next(iter(self._sets.values())).features:
            raise ValueError(f"PRADA: images of {flat.shape[1]} values after earlier ones of "
                             f"{next(iter(self._sets.values())).features}")
        norms = (flat * flat).sum(1)
        dmin = np.full(n, np.nan)
        labels = classes.cpu().numpy()
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            for start in range(0, len(idx), CHUNK):
                part = idx[start: start + CHUNK]
                dmin[part] = self._observe_class(int(c), flat[part], norms[part])
        has = np.flatnonzero(~np.isnan(dmin))
        self._append_d(dmin[has], self.queries_seen + 1 + has)
        first, self.queries_seen = self.queries_seen + 1, self.queries_seen + n
        if self.flagged_at is None:
            self._test(first, self.queries_seen)
        return self.flagged_at

    def _observe_class(self, c: int, x: torch.Tensor, x_norms: torch.Tensor) -> np.ndarray:
        """One class's queries of a batch, in order: their ``d_min`` (NaN for a query
        that starts the class's set); admits members to ``G_c``."""
        out = np.full(len(x), np.nan)
        gs = self._sets.get(c)
        start = 0
        if gs is None:
            gs = self._sets[c] = _GrowingSet(features=x.shape[1])
            gs.add(x[:1], x_norms[:1])
            start = 1
            if len(x) == 1:
                return out
            pre = _sq_dists(x[1:], x_norms[1:], x[:1], x_norms[:1]).min(1).values
        else:
            pre = _sq_dists(x, x_norms, gs.vectors[: gs.size], gs.norms[: gs.size]).min(1).values
        rest, rest_norms = x[start:], x_norms[start:]
        best = pre.numpy().copy()  # squared d_min so far: to G_c as it was before the batch
        within = _sq_dists(rest, rest_norms, rest, rest_norms).numpy() if len(rest) > 1 else None
        admitted: list[int] = []
        for j in range(len(rest)):
            d = math.sqrt(best[j]) / 255.0
            out[start + j] = d
            if d > gs.threshold:
                admitted.append(j)
                gs.join(d)
                if within is not None and j + 1 < len(rest):
                    np.minimum(best[j + 1:], within[j, j + 1:], out=best[j + 1:])
        if admitted:
            keep = torch.as_tensor(admitted)
            gs.add(rest[keep], rest_norms[keep])
        return out

    def _append_d(self, values: np.ndarray, positions: np.ndarray) -> None:
        need = self._n_d + len(values)
        if need > len(self._d):
            cap = max(need, 2 * len(self._d))
            self._d = np.concatenate([self._d[: self._n_d], np.empty(cap - self._n_d)])
            self._d_pos = np.concatenate([self._d_pos[: self._n_d],
                                          np.empty(cap - self._n_d, dtype=np.int64)])
        self._d[self._n_d: need] = values
        self._d_pos[self._n_d: need] = positions
        self._n_d = need

    def _test(self, first: int, last: int) -> None:
        """The tests due after queries ``first..last`` (1-based), in order, until one
        flags."""
        k = first + (-first) % self.check_every  # the first multiple of check_every
        pos = self._d_pos[: self._n_d]
        while k <= last:
            count = int(np.searchsorted(pos, k, side="right"))  # |D| after query k
            if count >= self.min_distances:
                self.last_w = shapiro_w(self._d[:count])
                self.tests += 1
                if self.last_w < self.delta:
                    self.flagged_at = k
                    return
            k += self.check_every


def queries_to_flag(images_u8: torch.Tensor, classes: torch.Tensor, *,
                    max_queries: int | None = None, batch_size: int = 256,
                    **prada_kwargs: Any) -> int | None:
    """One client sends ``images_u8`` (N, C, H, W) uint8 with predicted ``classes`` in
    the given order (at most the first ``max_queries``): the 1-based index of the query
    at which PRADA (``prada_kwargs`` for :class:`Prada`) flags it, or None. Stops at the
    end of the batch of ``batch_size`` queries in which it flags (batching does not
    change the result)."""
    if max_queries is not None and max_queries < 0:
        raise ValueError(f"queries_to_flag: max_queries must be >= 0, got {max_queries}")
    if batch_size < 1:
        raise ValueError(f"queries_to_flag: batch_size must be >= 1, got {batch_size}")
    n = len(images_u8) if max_queries is None else min(len(images_u8), int(max_queries))
    detector = Prada(**prada_kwargs)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if detector.observe(images_u8[start:stop], classes[start:stop]) is not None:
            break
    return detector.flagged_at


def benign_fpr(images_u8: torch.Tensor, classes: torch.Tensor, *, clients: int,
               queries_per_client: int, seed: int, **prada_kwargs: Any) -> dict[str, Any]:
    """PRADA's false-positive rate on simulated honest clients: each of ``clients``
    sends ``queries_per_client`` distinct images of the in-distribution set
    ``images_u8`` (the test set), drawn uniformly at random without replacement and
    sent in random order (one ``torch.randperm`` per client from a generator seeded
    with ``seed``), with their ``classes`` (the victim's predictions). Returns
    ``{"clients", "flagged", "fpr", "queries_per_client"}``."""
    if clients < 1:
        raise ValueError(f"benign_fpr: clients must be >= 1, got {clients}")
    if not 1 <= queries_per_client <= len(images_u8):
        raise ValueError(f"benign_fpr: queries_per_client must be in 1..{len(images_u8)} "
                         f"(the set's size), got {queries_per_client}")
    gen = torch.Generator().manual_seed(int(seed))
    flagged = 0
    for _ in range(clients):
        order = torch.randperm(len(images_u8), generator=gen)[:queries_per_client]
        if queries_to_flag(images_u8[order], classes[order], **prada_kwargs) is not None:
            flagged += 1
    return {"clients": int(clients), "flagged": flagged, "fpr": flagged / clients,
            "queries_per_client": int(queries_per_client)}


def detection_report(attack_images_u8: torch.Tensor, attack_classes: torch.Tensor,
                     benign_images_u8: torch.Tensor, benign_classes: torch.Tensor, *,
                     clients: int, queries_per_client: int, seed: int,
                     max_queries: int | None = None, **prada_kwargs: Any) -> dict[str, Any]:
    """One attack stream and the honest-client simulation under the same detector
    settings: ``{"detector": spec, "attack": {"queries", "flagged_at", "detected"},
    "benign": benign_fpr(...)}`` (JSON values)."""
    spec = Prada(**prada_kwargs).spec()
    n = len(attack_images_u8) if max_queries is None else min(len(attack_images_u8),
                                                             int(max_queries))
    at = queries_to_flag(attack_images_u8, attack_classes, max_queries=n, **prada_kwargs)
    benign = benign_fpr(benign_images_u8, benign_classes, clients=clients,
                        queries_per_client=queries_per_client, seed=seed, **prada_kwargs)
    return {"detector": spec, "attack": {"queries": n, "flagged_at": at,
                                         "detected": at is not None},
            "benign": benign}
