"""Durable feedback-event logs: an embedded SQLite log and a Redis Streams log.

Both give every accepted event a monotonically increasing integer ``offset`` in commit order,
acknowledge an append only once it is durable, and ignore an event id they have seen before
with the same payload (a retry). The same id with another payload (:func:`same_payload`) is a
conflict: the append stores nothing and reports it. Readers (the nearline updater) consume
``read(after=offset)``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from serving.errors import StorageError
from serving.events import Event, same_payload
from serving.failpoints import failpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedEvent:
    offset: int
    event: Event


@dataclass(frozen=True)
class AppendResult:
    accepted: int      # newly stored
    duplicates: int    # event ids already in the log with the same payload: a no-op
    new_ids: frozenset[str] = frozenset()  # the ids of the newly stored events
    # ids already in the log (or earlier in the same append) with another payload; when there
    # is any, the append stored nothing (accepted 0): nothing is overwritten, nothing half-done
    conflicts: frozenset[str] = frozenset()


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
        self._use_wal(con)
        with con:
            con.executescript(_SCHEMA)
            columns = {row[1] for row in con.execute("PRAGMA table_info(events)")}
            if "received" not in columns:  # a log written before events had a server time
                con.execute("ALTER TABLE events ADD COLUMN received REAL")

    def _use_wal(self, con: sqlite3.Connection) -> None:
        """Put the file in WAL mode (persistent: a file already in it is left alone). Turning
        WAL on takes an exclusive lock, and SQLite answers "database is locked" at once, not
        after its busy timeout, when another connection holds the file: several processes or
        threads opening a new log together retry until the timeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    con.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise StorageError(f"cannot open the event log {self.path}: {exc}") from exc
                time.sleep(0.01)

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
        duplicates = 0
        conflicts = set()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk full, I/O
            raise StorageError(f"event log {self.path}: {exc}; nothing was recorded") from exc
        try:
            for event, row in zip(events, rows, strict=True):
                before = con.total_changes
                con.execute(
                    "INSERT OR IGNORE INTO events (event_id, ts, session_id, user, query, "
                    "item_id, type, position, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                failpoint("eventlog.inserted")
                if con.total_changes > before:
                    new_ids.add(row[0])
                    continue
                # only an ignored id is compared, with the row that holds it (stored before, or
                # earlier in this append)
                stored = con.execute(
                    "SELECT event_id, ts, session_id, user, query, item_id, type, position, "
                    "received FROM events WHERE event_id = ?", (row[0],)).fetchone()
                if same_payload(Event(*stored), event):
                    duplicates += 1
                else:
                    conflicts.add(row[0])
            con.execute("ROLLBACK" if conflicts else "COMMIT")
        except BaseException as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError | OSError):
                raise StorageError(f"event log {self.path}: {exc}; nothing was recorded"
                                   ) from exc
            raise
        if conflicts:
            return AppendResult(0, duplicates, frozenset(), frozenset(conflicts))
        return AppendResult(len(new_ids), duplicates, frozenset(new_ids))

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
