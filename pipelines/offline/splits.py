"""Stable splits by hashing: the same query lands in the same split on every run and machine.

Every split of queries in the project (held-out queries of the encoder fine-tune, folds of the
relevance model's cross-fitting, seen and unseen queries of the simulation, the serving
benchmark's training queries) is drawn from these two functions, each with its own key.
"""

from __future__ import annotations

import hashlib


def _head(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def hash_unit(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: the first 8 bytes of its sha256 over 2^64."""
    return _head(key) / 2.0 ** 64


def hash_fold(key: str, folds: int) -> int:
    """The fold (0 .. ``folds`` - 1) of ``key``: the first 8 bytes of its sha256 mod ``folds``."""
    return _head(key) % folds
