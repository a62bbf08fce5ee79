"""A victim API behind a URL: the client side of ``mextract serve`` (:mod:`mextract.serve`).

:class:`RemoteAPI` has the interface of :class:`mextract.api.VictimAPI` that attack
code, :mod:`mextract.queries` and :mod:`mextract.experiment` use (``query``,
``queries``, ``mode``, ``description``, ``fingerprint``/``spec``, ``budget``,
``batch_size``, ``watermarked``/``watermark_log``), so the same strategies audit a
remote endpoint. It never reaches into a model: there is none (the one place of the
library that does, :func:`mextract.experiment.api_honest_accuracy`, is only reached
with an in-process victim).

Wire format (docs/serve.md): ``POST /v1/predict`` with an ``.npy`` body
(:func:`numpy.save` of a uint8 array (N, 3, H, W); read back with
``allow_pickle=False``), answered by an ``.npy`` body: float32 probabilities (N, C) in
``soft`` mode, int64 labels (N,) in ``hard`` mode. Binary, so answers are bit-exact
float32 (a JSON float needs care to round-trip a float32). The key travels in the
``X-API-Key`` header.

Counting is exact on both sides: :attr:`RemoteAPI.queries` counts the images this
client had answered, the server counts per client. Retries: every request carries a
client-generated ``X-Request-ID``; the server remembers the answers of each client's
recent request ids and replays a repeated one without counting it again, so a batch
retried after a timeout or a dropped connection (the answer may have been computed
and counted) is never counted twice. Transport errors and 5xx answers are retried
``retries`` times with exponential backoff; a rate-limit 429 waits ``Retry-After``
seconds and asks again; a budget 429 raises :class:`mextract.api.QueryBudgetExceeded`.
HTTP client: httpx (timeouts, connection pooling).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from typing import Any

import httpx
import numpy as np
import torch

from mextract.api import QueryBudgetExceeded, quantize

#: media type of request and answer bodies
NPY = "application/x-npy"
#: how many rate-limit waits one batch may take before giving up
MAX_RATE_WAITS = 1000


class RemoteAPIError(RuntimeError):
    """The server refused a request (4xx other than a budget 429) or kept failing."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def to_npy(array: np.ndarray) -> bytes:
    """``array`` as ``.npy`` bytes (:func:`numpy.save`, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    """An array from ``.npy`` bytes; object arrays (pickles) are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
        return str(body.get("error", "error")), str(body.get("detail", body))
    except (ValueError, json.JSONDecodeError):
        return "error", response.text[:500]


class RemoteAPI:
    """A served victim API (``mextract serve``) queried over HTTP.

    ``mode``: the answer kind the config expects (``soft``, ``hard`` or ``honey``);
    checked against the server's (honey is served as hard). ``budget``: a client-side
    limit on this object's queries (the server enforces its own per key).
    ``batch_size``: images per request (at most the server's ``max_batch``, the
    default). ``transport``: an httpx transport (tests).
    """

    def __init__(self, url: str, key: str, mode: str | None = None,
                 budget: int | None = None, timeout: float = 60.0, retries: int = 3,
                 batch_size: int | None = None, backoff: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"api budget must be >= 0, got {budget}")
        self.url = url.rstrip("/")
        self.budget = budget
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.client = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                   headers={"X-API-Key": key})
        self.health = self._request("GET", "/health").json()
        self.mode: str = self.health["mode"]
        if mode is not None and ("soft" if mode == "soft" else "hard") != self.mode:
            raise ValueError(f"the config expects {mode} answers, the API at {self.url} "
                             f"gives {self.mode} ({self.health['description']})")
        self.image_shape = tuple(int(s) for s in self.health["image_shape"])
        self.num_classes = int(self.health["num_classes"])
        max_batch = int(self.health["max_batch"])
        self.batch_size = min(int(batch_size or max_batch), max_batch)
        self._count = 0

    # ------------------------------------------------------------ VictimAPI interface
    @property
    def queries(self) -> int:
        """Images answered for this client object so far."""
        return self._count

    @property
    def description(self) -> str:
        """The server's description of its API (mode and defence layers)."""
        return str(self.health["description"])

    def spec(self) -> dict[str, Any]:
        """What answers: the URL and the server's own API fingerprint (its victim
        weights, mode and defence layers)."""
        return {"remote": self.url, "server": self.health["fingerprint"]}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()

    @property
    def watermarked(self) -> bool:
        """False: a served API's DAWN log stays with the defender (the server)."""
        return False

    def watermark_log(self) -> dict[str, Any]:
        """An empty log: the defender (the server) keeps the watermark log."""
        from mextract.watermark import empty_log

        return empty_log(image_shape=self.image_shape, seen=self.queries)

    def usage(self) -> dict[str, Any]:
        """The server's counter and budget for this key (``GET /v1/usage``)."""
        return dict(self._request("GET", "/v1/usage").json())

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Answer a batch of images (N, 3, H, W): float32 probabilities (soft) or int64
        labels (hard); counts N queries. Float images are rounded to uint8 first."""
        n = len(images)
        if self.budget is not None and self._count + n > self.budget:
            raise QueryBudgetExceeded(
                f"query of {n} images would exceed the API budget of {self.budget} "
                f"({self._count} already answered)")
        x = quantize(images.detach().cpu())
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"the API at {self.url} takes images of shape "
                             f"{self.image_shape}, got {tuple(x.shape[1:])}")
        out = []
        for start in range(0, n, self.batch_size):
            out.append(self._predict(x[start:start + self.batch_size]))
        if not out:
            return (torch.empty(0, self.num_classes) if self.mode == "soft"
                    else torch.empty(0, dtype=torch.int64))
        return torch.cat(out)

    def close(self) -> None:
        self.client.close()

    # ---------------------------------------------------------------------- transport
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        body = to_npy(x.numpy())
        response = self._request("POST", "/v1/predict", content=body,
                                 headers={"Content-Type": NPY,
                                          "X-Request-ID": uuid.uuid4().hex})
        answers = torch.from_numpy(from_npy(response.content).copy())
        if len(answers) != len(x):
            raise RemoteAPIError(response.status_code, "bad_answer",
                                 f"{len(answers)} answers for {len(x)} images")
        self._count += len(x)
        return answers

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with retries; the same ``X-Request-ID`` on every attempt."""
        failures = waits = 0
        while True:
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as err:  # connect/read/write errors, timeouts
                failures += 1
                if failures > self.retries:
                    raise RemoteAPIError(0, "transport", f"{method} {self.url}{path}: "
                                         f"{type(err).__name__}: {err}") from err
                time.sleep(self.backoff * 2 ** (failures - 1))
                continue
            if response.status_code < 400:
                return response
            error, detail = _error_of(response)
            if response.status_code == 429 and error == "rate_limited" and waits < MAX_RATE_WAITS:
                waits += 1
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            if response.status_code == 429 and error == "budget_exceeded":
                raise QueryBudgetExceeded(f"{self.url}: {detail}")
            if response.status_code >= 500 and failures < self.retries:
                failures += 1
                time.sleep(self.backoff * 2 ** (failures - 1))
                continue
            raise RemoteAPIError(response.status_code, error, detail)
