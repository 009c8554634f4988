"""The forgotten-users feed: how one ``forget`` reaches every other process of a home.

``forget(user)`` deletes the user's events from the log and clears their sessions in the
process that ran it; it then appends to ``events/forgotten`` one line per session
(``s <hash>``) and one for the user (``u <hash>``), each a keyed hash (the deployment's user-id
key), never an id. Every serving process reads the new lines at its next pointer poll and
clears those sessions; the nearline updater reads them before each batch and drops what its
replay window holds of them (sessions, shown pages, rate and bot-filter state, held clicks).
A line without a tag is a session (the file's first format).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from serving.events import pseudonymise
from serving.layout import forgotten_path


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def session_hash(session_id: str, key: bytes) -> str:
    return pseudonymise(session_id, key)


def user_hash(user: str, key: bytes) -> str:
    """Of a user's pseudonym (as events carry it), hashed again: the file never holds what
    the event log held."""
    return pseudonymise("user:" + user, key)


def append_forgotten(home: Path, key: bytes, sessions: Iterable[str], user: str) -> None:
    """Name the sessions and the user (pseudonym) ``forget`` removed, durably."""
    path = forgotten_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"s {session_hash(sid, key)}\n" for sid in sorted(sessions)]
    lines.append(f"u {user_hash(user, key)}\n")
    with path.open("a") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class Forgotten:
    """Keyed hashes of forgotten sessions and users, with the key that matches ids to them."""

    key: bytes
    sessions: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.sessions or self.users)

    _memo: dict[str, bool] = field(default_factory=dict, repr=False)

    def session(self, session_id: str) -> bool:
        """Whether ``session_id`` (in the clear, as the log and the stores key it) was forgotten."""
        if not self.sessions:
            return False
        if (hit := self._memo.get("s" + session_id)) is None:
            hit = self._memo["s" + session_id] = session_hash(session_id, self.key) in self.sessions
        return hit

    def user(self, user: str | None) -> bool:
        """Whether the user of this pseudonym (as events carry it) was forgotten."""
        if user is None or not self.users:
            return False
        if (hit := self._memo.get("u" + user)) is None:
            hit = self._memo["u" + user] = user_hash(user, self.key) in self.users
        return hit

    def key_of(self, key: object) -> bool:
        """Whether a state key names a forgotten session or user: ``"s:<session>"``,
        ``"u:<user>"``, or a tuple ``("s", session)`` / ``("u", user)``."""
        if isinstance(key, str):
            kind, _, ident = key.partition(":")
        elif isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str):
            kind, ident = key
        else:
            return False
        return self.session(ident) if kind == "s" else self.user(ident) if kind == "u" else False


class ForgottenFeed:
    """Reads what was appended to a home's forgotten file since the last read. It starts at
    the file's end: older lines name what processes before this one already removed (and the
    event log no longer holds)."""

    def __init__(self, home: Path) -> None:
        self.path = forgotten_path(home)
        self.at = _size(self.path)

    def pending(self) -> bool:
        """Whether lines were appended since the last read (one ``stat``)."""
        return _size(self.path) > self.at

    def read(self, key: bytes) -> Forgotten:
        """The new lines, matched with ``key`` (the deployment's user-id key)."""
        out = Forgotten(key)
        size = _size(self.path)
        if size <= self.at:
            return out
        with self.path.open("rb") as fh:
            fh.seek(self.at)
            data = fh.read(size - self.at)
        data = data[: data.rfind(b"\n") + 1]  # a line still being written waits for next time
        self.at += len(data)
        for line in data.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 1:
                out.sessions.add(parts[0])
            elif len(parts) == 2 and parts[0] in ("s", "u"):
                (out.sessions if parts[0] == "s" else out.users).add(parts[1])
        return out
