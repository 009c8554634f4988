"""A small bounded, thread-safe LRU cache for per-query work on the request path."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Keeps the ``size`` most recently used values. ``compute`` runs outside the lock, so a
    slow miss never blocks hits; two threads missing the same key both compute it, once each."""

    def __init__(self, size: int) -> None:
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()
        with self._lock:
            self._data[key] = value
            if len(self._data) > self._size:
                self._data.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._data)
