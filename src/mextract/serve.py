"""Serve a victim API (any mode and stack of defence layers) over HTTP.

:func:`create_app` builds a FastAPI application (run by uvicorn: ``mextract serve``,
:mod:`mextract.cli`) around one :class:`mextract.api.VictimAPI` *per client*, so each
API key has its own query counter, budget and DAWN watermark log. Endpoints
(docs/serve.md has the full reference):

* ``GET /health``: no key needed; the model's number of classes and class names, the
  image shape it takes, the answer mode, the defence layers, the API fingerprint
  (victim weights, mode, layer configs; secrets only as digests) and ``max_batch``.
* ``POST /v1/predict``: key in ``X-API-Key`` (or ``Authorization: Bearer``); body an
  ``.npy`` uint8 array (N, 3, H, W) (``Content-Type: application/x-npy``); answer an
  ``.npy`` array: float32 probabilities (N, C) (soft) or int64 labels (N,) (hard), with
  headers ``X-Queries`` (the client's count after this batch) and
  ``X-Budget-Remaining``. An optional client ``X-Request-ID`` makes retries safe: a
  repeated id (same body) is answered from memory and not counted again.
* ``GET /v1/usage``: the client's count and budget.

Errors are JSON ``{"error": code, "detail": message}`` with a 4xx status, and the
server keeps serving: 401 missing or unknown key; 415 wrong content type; 400 a body
that is not an ``.npy`` array; 422 wrong dtype, wrong shape or empty batch; 413 a batch
above ``max_batch`` (or a body larger than such a batch); 409 a request id reused with
another body; 429 ``budget_exceeded`` (the API's
:class:`~mextract.api.QueryBudgetExceeded`) or ``rate_limited`` (with
``Retry-After``).

The defender's logs, under ``log_dir/<client>/``: every answered batch as
``queries-<seq>.pt`` (images, answers, request id, the client's count before it;
written by :func:`mextract.io.save_artifact`), read back in order by
:func:`read_query_log` (for PRADA-style detection over a client's query stream), and,
for an API with a DAWN layer, ``watermark.pt``: that client's watermark log
(:meth:`mextract.api.VictimAPI.watermark_log`) for verifying a suspect model
(:func:`mextract.watermark.dawn_verify`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mextract.api import QueryBudgetExceeded, VictimAPI
from mextract.io import load_artifact, save_artifact
from mextract.remote import NPY, from_npy, to_npy

#: request ids remembered per client for replaying a retried batch
REMEMBER = 64


class HTTPError(Exception):
    def __init__(self, status: int, error: str, detail: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.headers = dict(headers or {})


@dataclass
class _Client:
    """One key's API, lock, rate-limit bucket and replay memory."""

    name: str
    api: VictimAPI
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)
    seq: int = 0
    replies: OrderedDict[str, tuple[str, bytes, dict[str, str]]] = field(
        default_factory=OrderedDict)


def read_query_log(log_dir: str | Path, client: str) -> dict[str, Any]:
    """A client's query stream as the server logged it, in order: ``images`` uint8
    (Q, 3, H, W), ``answers``, ``seq`` (batch number of each image) and ``count``."""
    files = sorted(Path(log_dir, client).glob("queries-*.pt"))
    batches = [load_artifact(f) for f in files]
    if not batches:
        return {"images": torch.zeros((0, 3, 32, 32), dtype=torch.uint8),
                "answers": torch.zeros(0), "seq": torch.zeros(0, dtype=torch.int64),
                "count": 0}
    return {"images": torch.cat([b["images"] for b in batches]),
            "answers": torch.cat([b["answers"] for b in batches]),
            "seq": torch.cat([torch.full((len(b["images"]),), b["seq"]) for b in batches]),
            "count": sum(len(b["images"]) for b in batches)}


def create_app(api_factory: Callable[[], VictimAPI], keys: Mapping[str, str], *,
               budget: int | None | Mapping[str, int | None] = None, max_batch: int = 1024,
               rate_limit: float | None = None, log_dir: str | Path | None = None,
               image_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int,
               classes: list[str] | None = None, name: str = "victim") -> FastAPI:
    """The HTTP app serving ``api_factory()`` (called once per client, plus once for
    the health answer): ``keys`` maps client name -> API key; ``budget`` is the
    queries each client may ask (one number for all, or per client; None: no
    limit); ``rate_limit`` images per second per client (a token bucket holding
    ``max(rate_limit, max_batch)``; None: off); ``log_dir`` receives the query logs
    (None: none); ``image_shape`` the (C, H, W) accepted, uint8."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if rate_limit is not None and rate_limit <= 0:
        raise ValueError(f"rate_limit must be > 0, got {rate_limit}")
    if len(set(keys.values())) != len(keys):
        raise ValueError("two clients share an API key")
    template = api_factory()
    info = {
        "status": "ok", "name": name, "num_classes": int(num_classes),
        "classes": list(classes) if classes else [str(i) for i in range(num_classes)],
        "image_shape": list(image_shape), "dtype": "uint8", "mode": template.mode,
        "description": template.description, "fingerprint": template.fingerprint,
        "answers": "float32 probabilities (N, C)" if template.mode == "soft"
        else "int64 labels (N,)",
        "format": NPY, "max_batch": int(max_batch), "rate_limit": rate_limit,
        "watermarked": template.watermarked,
    }
    del template
    digests = {hashlib.sha256(k.encode()).digest(): c for c, k in keys.items()}
    clients: dict[str, _Client] = {}
    clients_lock = threading.Lock()
    body_limit = max_batch * math.prod(image_shape) + 4096  # .npy header included
    logs = Path(log_dir) if log_dir is not None else None

    def budget_of(client: str) -> int | None:
        return budget.get(client) if isinstance(budget, Mapping) else budget

    def client_of(request: Request) -> _Client:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            raise HTTPError(401, "missing_key", "send the API key in the X-API-Key header "
                            "(or Authorization: Bearer <key>)",
                            {"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(key.encode()).digest()
        name = next((c for d, c in digests.items() if hmac.compare_digest(d, digest)), None)
        if name is None:
            raise HTTPError(401, "unknown_key", "this API key is not known to the server",
                            {"WWW-Authenticate": "Bearer"})
        with clients_lock:
            if name not in clients:
                api = api_factory()
                api.budget = budget_of(name)
                clients[name] = _Client(name, api, tokens=float(max_batch))
            return clients[name]

    def parse(request: Request, body: bytes) -> np.ndarray:
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != NPY:
            raise HTTPError(415, "unsupported_media_type",
                            f"send the images as an .npy body with Content-Type: {NPY} "
                            f"(got {ctype or 'none'})")
        if len(body) > body_limit:
            raise HTTPError(413, "batch_too_large",
                            f"body of {len(body)} bytes is larger than a batch of "
                            f"max_batch={max_batch} images")
        try:
            x = from_npy(body)
        except (ValueError, OSError, EOFError) as err:
            raise HTTPError(400, "bad_payload", f"the body is not a readable .npy array "
                            f"(numpy.save, no pickles): {err}") from err
        if x.dtype != np.uint8:
            raise HTTPError(422, "wrong_dtype", f"images must be uint8 (0..255), got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
            raise HTTPError(422, "wrong_shape", f"images must have shape (N, "
                            f"{', '.join(map(str, image_shape))}), got {tuple(x.shape)}")
        if len(x) == 0:
            raise HTTPError(422, "empty_batch", "the batch holds no images")
        if len(x) > max_batch:
            raise HTTPError(413, "batch_too_large",
                            f"{len(x)} images is above max_batch={max_batch}")
        return x

    def take_tokens(c: _Client, n: int) -> None:
        if rate_limit is None:
            return
        now = time.monotonic()
        capacity = max(float(rate_limit), float(max_batch))
        c.tokens = min(capacity, c.tokens + (now - c.stamp) * rate_limit)
        c.stamp = now
        if c.tokens < n:
            wait = math.ceil((n - c.tokens) / rate_limit)
            raise HTTPError(429, "rate_limited", f"rate limit of {rate_limit:g} images/s: "
                            f"retry in {wait} s", {"Retry-After": str(wait)})
        c.tokens -= n

    def answer(c: _Client, x: np.ndarray, body_digest: str, request_id: str | None,
               ) -> tuple[bytes, dict[str, str]]:
        with c.lock:
            if request_id is not None and request_id in c.replies:
                digest, content, headers = c.replies[request_id]
                if digest != body_digest:
                    raise HTTPError(409, "request_id_reused",
                                    f"request id {request_id!r} was used for other images")
                return content, {**headers, "X-Replayed": "1"}
            take_tokens(c, len(x))
            before = c.api.queries
            try:
                out = c.api.query(torch.from_numpy(x))
            except QueryBudgetExceeded as err:
                if rate_limit is not None:
                    c.tokens += len(x)  # nothing was answered
                raise HTTPError(429, "budget_exceeded", str(err)) from err
            answers = out.numpy().astype(np.float32 if c.api.mode == "soft" else np.int64)
            content = to_npy(answers)
            headers = {"X-Queries": str(c.api.queries)}
            if c.api.budget is not None:
                headers["X-Budget-Remaining"] = str(c.api.budget - c.api.queries)
            if logs is not None:
                folder = logs / c.name
                save_artifact({"client": c.name, "seq": c.seq, "request_id": request_id,
                               "count_before": before, "images": torch.from_numpy(x.copy()),
                               "answers": torch.from_numpy(answers), "time": time.time()},
                              folder / f"queries-{c.seq:08d}.pt")
                if c.api.watermarked:
                    save_artifact(c.api.watermark_log(), folder / "watermark.pt")
            c.seq += 1
            if request_id is not None:
                c.replies[request_id] = (body_digest, content, headers)
                while len(c.replies) > REMEMBER:
                    c.replies.popitem(last=False)
            return content, headers

    app = FastAPI(title=f"mextract victim API ({info['description']})",
                  description="Model-extraction audit target; see docs/serve.md.")

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError) -> JSONResponse:
        return JSONResponse({"error": err.error, "detail": err.detail},
                            status_code=err.status, headers=err.headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return info

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict[str, Any]:
        c = client_of(request)
        b = c.api.budget
        return {"client": c.name, "queries": c.api.queries, "budget": b,
                "remaining": None if b is None else b - c.api.queries}

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        c = client_of(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > body_limit:
            raise HTTPError(413, "batch_too_large",
                            f"body of {length} bytes is larger than a batch of "
                            f"max_batch={max_batch} images")
        body = await request.body()
        x = parse(request, body)
        digest = hashlib.sha256(body).hexdigest()
        content, headers = await run_in_threadpool(
            answer, c, x, digest, request.headers.get("x-request-id"))
        return Response(content, media_type=NPY, headers=headers)

    app.state.clients = clients
    app.state.info = info
    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (``port``
    0: a free port). Stops the server on exit (tests, notebooks)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
