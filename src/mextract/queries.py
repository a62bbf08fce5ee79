"""Query-collection caches for non-adaptive strategies.

A query set names the images an attacker sends, derived from the pool alone:

* ``pool``: every pool image once;
* ``views-k{K}-s{seed}``: K augmented views of every pool image, drawn from ``seed``
  (see :func:`mextract.attacks.augmentation.make_views`).

:func:`collect` answers a query set once through the API and returns the cache::

    {"kind": "soft" | "hard", "api": str, "query_set": str,
     "indices": int64 [Q] (pool index of each query), "answers": [Q] or [Q, C],
     "count": int (the API's own counter after answering)}

Views are not stored: they are regenerated from the recorded seed when training.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from tqdm import tqdm

from mextract.api import VictimAPI

_VIEWS = re.compile(r"^views-k(\d+)-s(\d+)$")


def query_images(pool: torch.Tensor, query_set: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, pool index of each) for a query-set name."""
    if query_set == "pool":
        return pool, torch.arange(len(pool))
    m = _VIEWS.match(query_set)
    if m:
        from mextract.attacks.augmentation import make_views

        return make_views(pool, k=int(m.group(1)), seed=int(m.group(2)))
    raise ValueError(f"unknown query set {query_set!r} (pool, views-k<K>-s<seed>)")


def collect(api: VictimAPI, pool: torch.Tensor, query_set: str,
            chunk: int = 4096) -> dict[str, Any]:
    """Answer every image of the query set once; the count is the API's counter."""
    images, indices = query_images(pool, query_set)
    before = api.queries
    answers = []
    for start in tqdm(range(0, len(images), chunk), desc=f"querying {query_set}", unit="batch",
                      mininterval=2.0):
        answers.append(api.query(images[start:start + chunk]))
    return {
        "kind": "soft" if api.mode == "soft" else "hard",
        "api": api.description,
        "query_set": query_set,
        "indices": indices,
        "answers": torch.cat(answers),
        "count": api.queries - before,
    }


def cache_images(pool: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
    """The images a cache's answers belong to (regenerated for views)."""
    images, indices = query_images(pool, cache["query_set"])
    if not torch.equal(indices, cache["indices"]):
        raise ValueError(f"query cache '{cache['query_set']}' does not match this pool")
    return images
