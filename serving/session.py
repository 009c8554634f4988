"""In-session intent: what a session just did shapes its very next request.

A session keeps its last few positive interactions (item, weight, time). Its interest vector
is computed on demand as a time-decayed, weighted sum of those items' vectors, so the state is
small, bounded and a pure function of recent events. A new query far from the current
interest marks an intent shift: the interactions so far are down-weighted at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

EVENT_WEIGHTS = {"click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}


@dataclass(frozen=True)
class SessionConfig:
    half_life_s: float = 600.0        # interest halves every 10 minutes
    ttl_s: float = 1800.0             # interactions older than 30 minutes no longer count
    max_interactions: int = 10
    blend: float = 0.5                # weight of the session interest in a query's vector
    shift_threshold: float = 0.25     # cos(query, interest) below this = the shopper moved on
    shift_factor: float = 0.1         # what an abandoned intent keeps of its weight


@dataclass(frozen=True)
class Interaction:
    item_id: str
    weight: float
    ts: float


@dataclass(frozen=True)
class SessionState:
    interactions: tuple[Interaction, ...] = ()
    shift_ts: float = 0.0             # when the last intent shift happened (informational)
    last_ts: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def shifted(self, ts: float, cfg: SessionConfig) -> SessionState:
        """The shopper moved on: every interaction so far keeps only ``shift_factor`` of its
        weight. Applied to the interactions themselves, not by comparing clocks, so client and
        server clocks that disagree cannot undo it."""
        faded = tuple(replace(it, weight=it.weight * cfg.shift_factor)
                      for it in self.interactions)
        return replace(self, interactions=faded, shift_ts=ts)

    def add(self, item_id: str, weight: float, ts: float, cfg: SessionConfig) -> SessionState:
        items = (*self.interactions, Interaction(item_id, weight, ts))[-cfg.max_interactions:]
        return replace(self, interactions=items, last_ts=max(self.last_ts, ts))


def current_weight(it: Interaction, now: float, cfg: SessionConfig) -> float | None:
    """What an interaction weighs at ``now``: halved every ``half_life_s``; None once it is
    older than ``ttl_s`` (it no longer counts)."""
    age = now - it.ts
    if age > cfg.ttl_s:
        return None
    return it.weight * 0.5 ** (max(age, 0.0) / cfg.half_life_s)


def interest_vector(state: SessionState | None, vectors: np.ndarray, row_of: dict[str, int],
                    now: float, cfg: SessionConfig) -> np.ndarray | None:
    """Decayed, weighted sum of the session's recent item vectors (not normalised), or None.

    Its norm says how strong and recent the interest is: one fresh click gives norm ~1.
    """
    if state is None:
        return None
    total = None
    for it in state.interactions:
        w = current_weight(it, now, cfg)
        row = row_of.get(it.item_id)
        if row is None or w is None:
            continue
        v = w * np.asarray(vectors[row], dtype=np.float32)
        total = v if total is None else total + v
    return total


def blend_query(qvec: np.ndarray | None, interest: np.ndarray | None,
                cfg: SessionConfig) -> tuple[np.ndarray, bool]:
    """The vector to retrieve with, and whether the query marks an intent shift.

    With no query, the session interest alone; with no interest, the query alone.
    """
    if interest is None or not np.any(interest):
        if qvec is None:
            raise ValueError("no query and no session interest")
        return qvec, False
    strength = float(np.linalg.norm(interest))
    unit = interest / strength
    if qvec is None:
        return unit.astype(np.float32), False
    if float(unit @ qvec) < cfg.shift_threshold:
        strength *= cfg.shift_factor
        shifted = True
    else:
        shifted = False
    mixed = qvec + cfg.blend * min(strength, 1.0) * unit
    return (mixed / np.linalg.norm(mixed)).astype(np.float32), shifted


class SessionStore(Protocol):
    def get(self, session_id: str) -> SessionState | None: ...
    def put(self, session_id: str, state: SessionState) -> None: ...

    def update(self, session_id: str,
               change: Callable[[SessionState | None], SessionState]) -> SessionState:
        """Apply ``change`` to the session's current state atomically (no write of another
        replica or thread in between is lost) and store the result."""
        ...

    def delete(self, session_id: str) -> bool: ...


class MemorySessionStore:
    """In-process, bounded (LRU) and expiring session store; thread-safe."""

    def __init__(self, max_sessions: int = 100_000, ttl_s: float = 1800.0) -> None:
        self._data: OrderedDict[str, tuple[float, SessionState]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s

    def get(self, session_id: str) -> SessionState | None:
        with self._lock:
            return self._get(session_id)

    def _get(self, session_id: str) -> SessionState | None:
        hit = self._data.get(session_id)
        if hit is None:
            return None
        if time.monotonic() - hit[0] > self.ttl_s:
            del self._data[session_id]
            return None
        return hit[1]

    def put(self, session_id: str, state: SessionState) -> None:
        with self._lock:
            self._put(session_id, state)

    def _put(self, session_id: str, state: SessionState) -> None:
        self._data[session_id] = (time.monotonic(), state)
        self._data.move_to_end(session_id)
        while len(self._data) > self.max_sessions:
            self._data.popitem(last=False)

    def update(self, session_id: str,
               change: Callable[[SessionState | None], SessionState]) -> SessionState:
        with self._lock:
            state = change(self._get(session_id))
            self._put(session_id, state)
            return state

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._data.pop(session_id, None) is not None

    def ids(self) -> list[str]:
        """The ids of the sessions held now (a snapshot)."""
        with self._lock:
            return list(self._data)

    def __len__(self) -> int:
        return len(self._data)


def session_signal(interest: np.ndarray | None) -> np.ndarray | None:
    """The session vector the ranker sees: the interest direction, scaled by its strength
    (capped at 1), so a faded or abandoned intent pulls only as much as it still weighs."""
    if interest is None or not np.any(interest):
        return None
    norm = float(np.linalg.norm(interest))
    return (interest / max(norm, 1.0)).astype(np.float64)
