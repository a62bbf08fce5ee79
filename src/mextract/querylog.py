"""One store for the query logs of every strategy that asks the live victim API during
its job (marich and active_learning through :func:`mextract.attacks.selection.run_rounds`,
spsg, boundary, and the equal-budget baselines random and random_boundary).

A strategy's log records what it asked and what the API answered; it lives at
``<workdir>/query_log.pt`` (written by :func:`mextract.io.save_artifact`, so it is
checksummed and loaded with ``weights_only=True``). A log is reused only when its
*key* equals the key of the job at hand, exactly:

* ``strategy``, ``params`` (all of them, defaults filled in) and the experiment ``seed``;
* ``pool``: a digest of the attacker's pool images;
* ``api``: :attr:`mextract.api.VictimAPI.fingerprint` of the API that answered, i.e.
  the victim's weights, the mode and every defence layer's full configuration (a DAWN
  key only as a digest), so a retrained victim or a changed defence invalidates it;
* whatever else the strategy's choice of queries depends on, passed as ``depends``
  (the shared cache's answers for boundary probing, the per-round training recipe and
  the substitute for the round loop, the perturbation recipe's version for SPSG).

The store also owns the log's bookkeeping fields:

* ``key``, ``format``, ``strategy``, ``api`` (the API's description);
* ``complete``: False for the partial logs saved after every round (a killed job's
  rerun resumes from the last one with the same key, :meth:`QueryLogStore.resume`),
  True once the strategy has asked everything;
* ``count``: queries the log holds, i.e. the answers of the API counted since the job
  started plus those of a resumed partial log; equal to the API's counter for a job
  that asked everything itself;
* ``stream`` (jobs whose API is a :class:`RecordingAPI`, i.e. whose query stream is
  examined by a detector): every query image (uint8) and answer in the order asked,
  a resumed log's first, so that a job which replays the log examines the same stream;
* ``watermark`` (APIs with a DAWN layer only): the defender's watermark log of the
  logged queries (:mod:`mextract.watermark`; the key only as its ``key_id``), so that a
  job which replays the log leaves the same evidence as the job that asked. Attack
  code never reads it.

A missing, unreadable, corrupt (checksum mismatch) or foreign file counts as absent.
The raw DAWN key never enters a log: the key holds the API's fingerprint, and the
watermark log keeps only the key's digest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mextract.api import VictimAPI, quantize
from mextract.io import CorruptArtifactError, load_artifact, save_artifact, tensor_digest
from mextract.watermark import merge_logs

#: file name of a job's query log inside its workdir
LOG_NAME = "query_log.pt"
#: version of the log layout (part of every key: an older layout is never reused)
FORMAT = 2


def canonical(value: Any) -> Any:
    """``value`` as plain JSON values (sorted dict keys, tuples as lists), so that a key
    compares equal after a save/load round trip; raises TypeError for other values."""
    return json.loads(json.dumps(value, sort_keys=True))


def cache_digest(cache: Mapping[str, Any]) -> dict[str, Any]:
    """What a strategy that also trains on a shared query cache (mextract.queries)
    depends on: which API answered it, its query set, its count and a digest of its
    indices and answers."""
    return {"api": cache.get("api"), "query_set": cache.get("query_set"),
            "count": int(cache["count"]),
            "answers": tensor_digest(cache["indices"], cache["answers"])}


def log_key(api: VictimAPI, strategy: str, params: Mapping[str, Any], seed: int,
            pool: torch.Tensor, **depends: Any) -> dict[str, Any]:
    """The key a saved log must match exactly to be reused (see the module docstring).
    ``depends`` values must be JSON values."""
    return canonical({"format": FORMAT, "strategy": strategy, "params": dict(params),
                      "seed": int(seed), "pool": tensor_digest(pool),
                      "api": api.fingerprint, "depends": depends})


class RecordingAPI:
    """A victim API that also keeps its query stream: every image it answers (uint8, as
    the API received it) and the answer, in order, as a client-side detector such as
    PRADA (:mod:`mextract.detection`) sees the stream. Everything else is the wrapped
    API's (counter, budget, fingerprint, defences)."""

    def __init__(self, api: Any, limit: int | None = None) -> None:
        self.inner = api
        #: the most queries kept (the prefix a detector examines); None = all
        self.limit = limit
        self._images: list[torch.Tensor] = []
        self._answers: list[torch.Tensor] = []
        self._kept = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        answers = self.inner.query(images)
        room = len(images) if self.limit is None else max(0, self.limit - self._kept)
        if room:
            self._images.append(quantize(images[:room].cpu()))
            self._answers.append(answers[:room].cpu())
            self._kept += min(room, len(images))
        return answers

    def stream(self) -> dict[str, torch.Tensor]:
        """{"images": uint8 (Q, C, H, W), "answers": (Q,) labels or (Q, K) probabilities}
        of the queries answered so far, in order (the first ``limit``)."""
        if not self._images:
            return {"images": torch.zeros(0, dtype=torch.uint8),
                    "answers": torch.zeros(0)}
        return {"images": torch.cat(self._images), "answers": torch.cat(self._answers)}


def join_streams(*streams: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Query streams one after the other (absent or empty ones skipped)."""
    parts = [s for s in streams if s is not None and len(s["images"])]
    if not parts:
        return {"images": torch.zeros(0, dtype=torch.uint8), "answers": torch.zeros(0)}
    return {k: torch.cat([p[k] for p in parts]) for k in ("images", "answers")}


def require_api(api: VictimAPI | None, strategy: str) -> VictimAPI:
    if api is None:
        raise ValueError(f"{strategy} queries the live victim API, but none was given")
    return api


class QueryLogStore:
    """The query log of one job: ``<workdir>/query_log.pt`` under one key.

    Typical use::

        store = QueryLogStore(api, workdir, "random", params, seed=ctx.seed, pool=ctx.pool)
        log = store.reuse()                      # a complete log with this key, or None
        if log is None:
            ...                                  # ask the API
            log = store.save({...}, complete=True)
        extra = store.extra(log)                 # queries_from_log, logged_queries, ...

    The store notes the API's counter when it is made: make it before the job's first
    query. :attr:`count` is what the job's log holds (replayed + asked now).
    """

    def __init__(self, api: VictimAPI | None, workdir: str | Path, strategy: str,
                 params: Mapping[str, Any], *, seed: int, pool: torch.Tensor,
                 **depends: Any) -> None:
        self.api = require_api(api, strategy)
        self.strategy = strategy
        self.path = Path(workdir) / LOG_NAME
        self.key = log_key(self.api, strategy, params, seed, pool, **depends)
        self.start = self.api.queries
        #: the partial log this job resumed (None: started afresh)
        self.resumed: dict[str, Any] | None = None
        #: the complete log this job reuses (None: it asks the API)
        self.reused: dict[str, Any] | None = None

    @classmethod
    def for_context(cls, ctx: Any, strategy: str, params: Mapping[str, Any],
                    **depends: Any) -> QueryLogStore:
        """The store of an :class:`~mextract.attacks.base.AttackContext`'s job (typed
        ``Any``: the strategies' layer sits above this module's)."""
        return cls(ctx.api, ctx.workdir, strategy, params, seed=ctx.seed, pool=ctx.pool,
                   **depends)

    # ----------------------------------------------------------------- reading
    def read(self) -> dict[str, Any] | None:
        """The saved log if it has this key (complete or not); None if the file is
        missing, corrupt, unreadable or belongs to another key."""
        try:
            log = load_artifact(self.path)
        except (FileNotFoundError, CorruptArtifactError):
            return None
        if not isinstance(log, dict) or log.get("key") != self.key:
            return None
        if isinstance(self.api, RecordingAPI) and "stream" not in log:
            return None  # saved by a job that kept no stream: ask again to have it
        return log

    def reuse(self) -> dict[str, Any] | None:
        """The complete log with this key, or None. When found, the job asks nothing
        and reports the logged count."""
        log = self.read()
        if log is None or log.get("complete") is not True:
            return None
        self.reused = log
        return log

    def resume(self) -> dict[str, Any] | None:
        """The partial log with this key that a killed job left, or None. When found,
        its count and watermark log are carried into every later :meth:`save`."""
        log = self.read()
        if log is None or log.get("complete") is not False:
            return None
        self.resumed = log
        return log

    # ----------------------------------------------------------------- counting
    @property
    def replayed(self) -> int:
        """Queries taken from a saved log instead of being asked by this job."""
        log = self.reused if self.reused is not None else self.resumed
        return int(log["count"]) if log is not None else 0

    @property
    def asked(self) -> int:
        """Queries the API answered since this store was made."""
        return self.api.queries - self.start

    @property
    def count(self) -> int:
        """Queries the job's log holds: a resumed log's plus those asked since."""
        return (int(self.resumed["count"]) if self.resumed is not None else 0) + self.asked

    # ----------------------------------------------------------------- writing
    def save(self, record: Mapping[str, Any], *, complete: bool) -> dict[str, Any]:
        """Save ``record`` (the strategy's fields: tensors and plain values) with the
        store's bookkeeping fields (see the module docstring); returns the saved log."""
        log: dict[str, Any] = {**record, "key": self.key, "format": FORMAT,
                               "strategy": self.strategy, "api": self.api.description,
                               "complete": bool(complete), "count": self.count}
        if self.api.watermarked:
            log["watermark"] = self._watermark()
        if isinstance(self.api, RecordingAPI):
            log["stream"] = join_streams((self.resumed or {}).get("stream"),
                                         self.api.stream())
        save_artifact(log, self.path)
        return log

    def _watermark(self) -> dict[str, Any]:
        logs = [self.api.watermark_log()]
        if self.resumed is not None and "watermark" in self.resumed:
            logs.insert(0, self.resumed["watermark"])
        return merge_logs(logs)

    def extra(self, log: Mapping[str, Any]) -> dict[str, Any]:
        """The result fields every logging strategy reports: ``queries_from_log``
        (a complete log was reused), ``logged_queries`` (the log's count),
        ``replayed_queries`` (of those, the ones not asked by this job: all of them
        after a reuse, a resumed partial log's otherwise) and ``resumed_log``."""
        return {"queries_from_log": self.reused is not None,
                "logged_queries": int(log["count"]), "replayed_queries": self.replayed,
                "resumed_log": self.resumed is not None}
