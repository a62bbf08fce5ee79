"""Query-collection caches for non-adaptive strategies.

A query set names the images an attacker sends, derived from the pool alone:

* ``pool``: every pool image once;
* ``views-k{K}-s{seed}``: K augmented views of every pool image, drawn from ``seed``
  (see :func:`make_views`; the Stage-2 "augmentation" strategy's query set).

:func:`collect` answers a query set once through the API and returns the cache::

    {"kind": "soft" | "hard", "api": str, "query_set": str,
     "indices": int64 [Q] (pool index of each query), "answers": [Q] or [Q, C],
     "count": int (the API's own counter after answering)}

Views are not stored: they are regenerated from the recorded seed when training.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mextract.api import VictimAPI
from mextract.augment import random_affine

_VIEWS = re.compile(r"^views-k(\d+)-s(\d+)$")

#: views drawn per generator block. Part of the query-set definition: each block of
#: this many consecutive views has its own generator seed, derived from (seed, block),
#: so the views do not depend on how a caller chunks work or on the thread count.
BLOCK = 2048


def _block_seed(seed: int, block: int) -> int:
    """Independent 63-bit seed for one block (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_views(pool: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K augmented views of every pool image: (uint8 views (N*K, C, H, W), int64 pool
    index of each view). View ``j`` of image ``i`` is row ``i * K + j``.

    Each view is a random flip, integer shift of up to 4 pixels (RandomCrop with
    padding 4) and rotation of up to 15 degrees, resampled bilinearly with zero fill
    and rounded to uint8. Deterministic in ``(pool, k, seed)``: blocks of
    :data:`BLOCK` views each draw from one ``torch.Generator`` seeded from
    ``(seed, block index)``.
    """
    if k < 1:
        raise ValueError(f"views must be >= 1, got {k}")
    if pool.dtype != torch.uint8:
        raise TypeError(f"make_views expects uint8 pool images, got {pool.dtype}")
    n = len(pool)
    index = torch.arange(n).repeat_interleave(k)
    views = torch.empty((n * k, *pool.shape[1:]), dtype=torch.uint8)
    gen = torch.Generator()
    for block, start in enumerate(range(0, n * k, BLOCK)):
        gen.manual_seed(_block_seed(seed, block))
        src = pool[index[start:start + BLOCK]].float()  # 0..255; zero fill stays black
        out = random_affine(src, gen, degrees=15.0, translate_px=4, flip=True)
        views[start:start + BLOCK] = out.round().clamp_(0, 255).to(torch.uint8)
    return views, index


def query_images(pool: torch.Tensor, query_set: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, pool index of each) for a query-set name."""
    if query_set == "pool":
        return pool, torch.arange(len(pool))
    m = _VIEWS.match(query_set)
    if m:
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
