"""Durable feedback-event logs: an embedded SQLite log and a Redis Streams log.

Both give every accepted event a monotonically increasing integer ``offset`` in commit order,
acknowledge an append only once it is durable, and ignore an event id they have seen before.
Readers (the nearline updater) consume ``read(after=offset)``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from serving.events import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedEvent:
    offset: int
    event: Event


@dataclass(frozen=True)
class AppendResult:
    accepted: int      # newly stored
    duplicates: int    # event ids already in the log: a no-op
    new_ids: frozenset[str] = frozenset()  # the ids of the newly stored events


class EventLog(Protocol):
    def append(self, events: Sequence[Event]) -> AppendResult: ...
    def read(self, after: int, limit: int = 1000) -> list[LoggedEvent]: ...
    def last_offset(self) -> int: ...
    def forget(self, user: str) -> tuple[int, set[str]]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    offset     INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,
    ts         REAL NOT NULL,
    session_id TEXT NOT NULL,
    user       TEXT,
    query      TEXT,
    item_id    TEXT NOT NULL,
    type       TEXT NOT NULL,
    position   INTEGER,
    received   REAL
);
"""


class SqliteEventLog:
    """The embedded default: one SQLite file in WAL mode, safe for many writer processes.

    ``synchronous=FULL`` makes a commit durable before ``append`` returns. SQLite serialises
    writers, so offsets (AUTOINCREMENT row ids) appear to readers in commit order and a reader
    never skips an event that commits later with a smaller offset.
    """

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._timeout = timeout_s
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        with con:
            con.executescript(_SCHEMA)
            columns = {row[1] for row in con.execute("PRAGMA table_info(events)")}
            if "received" not in columns:  # a log written before events had a server time
                con.execute("ALTER TABLE events ADD COLUMN received REAL")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
            con.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            self._local.con = con
        return con

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        con = self._con()
        rows = [(e.event_id, e.ts, e.session_id, e.user, e.query, e.item_id, e.type, e.position,
                 e.received) for e in events]
        new_ids = set()
        con.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                before = con.total_changes
                con.execute(
                    "INSERT OR IGNORE INTO events (event_id, ts, session_id, user, query, "
                    "item_id, type, position, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                if con.total_changes > before:
                    new_ids.add(row[0])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return AppendResult(len(new_ids), len(rows) - len(new_ids), frozenset(new_ids))

    def read(self, after: int, limit: int = 1000) -> list[LoggedEvent]:
        cur = self._con().execute(
            "SELECT offset, event_id, ts, session_id, user, query, item_id, type, position, "
            "received FROM events WHERE offset > ? ORDER BY offset LIMIT ?", (after, limit))
        return [LoggedEvent(r[0], Event(*r[1:])) for r in cur.fetchall()]

    def last_offset(self) -> int:
        row = self._con().execute("SELECT max(offset) FROM events").fetchone()
        return int(row[0] or 0)

    def count(self) -> int:
        return int(self._con().execute("SELECT count(*) FROM events").fetchone()[0])

    def forget(self, user: str) -> tuple[int, set[str]]:
        """Delete every event of ``user`` (its pseudonym); returns how many and their
        sessions. The rows are gone from the file, not only unlinked (``secure_delete``)."""
        con = self._con()
        con.execute("PRAGMA secure_delete=ON")
        con.execute("BEGIN IMMEDIATE")
        try:
            sessions = {r[0] for r in con.execute(
                "SELECT DISTINCT session_id FROM events WHERE user = ?", (user,))}
            deleted = con.execute("DELETE FROM events WHERE user = ?", (user,)).rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # nor in the write-ahead log
        return int(deleted), sessions

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def iter_all(log_: EventLog, after: int = 0, batch: int = 5000) -> Iterable[LoggedEvent]:
    """Every event after ``after``, in offset order."""
    while True:
        chunk = log_.read(after, batch)
        if not chunk:
            return
        yield from chunk
        after = chunk[-1].offset
