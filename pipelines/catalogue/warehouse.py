"""The DuckDB warehouse: items, rejected rows, item vectors and ingest runs.

A catalogue refresh changes the warehouse in a copy of it (:func:`stage_warehouse`): the
ingest, embed and index steps work on the copy, and only a release that passed its gate
replaces the warehouse with it (:func:`commit_warehouse`, one ``os.replace``). A run that fails
anywhere, or whose release fails its gate, leaves the warehouse as it was; of the copy it
keeps only the record of bad input (the run's rejected rows and its ``ingest_runs`` row,
:func:`discard_warehouse`). One build at a time holds :func:`build_lock`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl

from pipelines.lockfile import try_lock, unlock
from serving.errors import WarehouseBusyError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id      VARCHAR PRIMARY KEY,
    title        VARCHAR NOT NULL,
    description  VARCHAR,
    category     VARCHAR,
    brand        VARCHAR,
    price        DOUBLE,
    in_stock     BOOLEAN NOT NULL,
    content_hash VARCHAR NOT NULL,   -- of the embedded text only: price/stock changes keep it
    active       BOOLEAN NOT NULL,   -- false once an item leaves the catalogue snapshot
    updated_at   TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS rejects (
    run_id      VARCHAR NOT NULL,
    row_number  BIGINT NOT NULL,     -- 1-based data row in the source file
    item_id     VARCHAR,
    reason      VARCHAR NOT NULL,
    raw         VARCHAR NOT NULL,    -- the row as JSON, so nothing is lost
    rejected_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS item_vectors (
    item_id         VARCHAR NOT NULL,
    encoder_version VARCHAR NOT NULL,
    content_hash    VARCHAR NOT NULL,
    vector          FLOAT[] NOT NULL,
    embedded_at     TIMESTAMP NOT NULL,
    PRIMARY KEY (item_id, encoder_version)
);
CREATE TABLE IF NOT EXISTS lexical_analysis (   -- BM25 text analysis per content, reused
    content_hash VARCHAR NOT NULL,
    analysis     VARCHAR NOT NULL,               -- how it was analysed (LexicalIndex.signature)
    tokens       VARCHAR[] NOT NULL,             -- stemmed BM25 tokens, stop words removed
    words        VARCHAR[] NOT NULL,             -- distinct surface words (spelling vocabulary)
    PRIMARY KEY (content_hash, analysis)
);
CREATE TABLE IF NOT EXISTS ingest_runs (
    run_id        VARCHAR PRIMARY KEY,
    source        VARCHAR NOT NULL,
    rows_read     BIGINT NOT NULL,
    rows_accepted BIGINT NOT NULL,
    rows_rejected BIGINT NOT NULL,
    status        VARCHAR NOT NULL,
    finished_at   TIMESTAMP NOT NULL
);
"""


def connect(path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the warehouse; a writer creates the file and schema on first use.

    DuckDB allows one writing process or several read-only ones at a time, which is why
    embed shards only read and write their vectors to shard files.
    """
    if read_only:
        return duckdb.connect(str(path), read_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    return con


def query_frame(con: duckdb.DuckDBPyConnection, sql: str,
                params: list[object] | None = None) -> pl.DataFrame:
    """Run a parameterised query and return the result as a polars frame (via Arrow)."""
    return con.sql(sql, params=params or []).pl()


# -- one build at a time ---------------------------------------------------------------------

_held: dict[str, list[int]] = {}  # lock path -> [descriptor, depth], this process's locks
_held_guard = threading.Lock()


def lock_path(warehouse: Path) -> Path:
    return warehouse.with_name(f"{warehouse.name}.lock")


@contextmanager
def build_lock(warehouse: Path) -> Iterator[None]:
    """Hold the build lock of ``warehouse``: an exclusive ``flock`` on ``<warehouse>.lock``
    with the holder's pid, host, command and start time written in it. Taken by every step
    that writes the warehouse, and by ``build`` for its whole run; re-entrant within a
    process (whose threads share it: a process is one build). The kernel drops it when its
    process dies, however it dies, so a killed build leaves no stale lock.

    Raises :class:`WarehouseBusyError` at once, naming the holder, when another process holds
    it (two writers would fail on DuckDB's own lock, or overwrite each other's work).
    """
    path = lock_path(warehouse)
    key = os.path.abspath(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(path, warehouse), 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                unlock(_held.pop(key)[0])


def _acquire(path: Path, warehouse: Path) -> int:
    fd, holder = try_lock(path)
    if fd is None:
        raise WarehouseBusyError(
            f"another build holds the warehouse {warehouse} ({holder}); wait for it to "
            f"finish, or stop that process (lock file {path})")
    return fd


# -- a run's copy of the warehouse -----------------------------------------------------------

def staged_path(warehouse: Path, name: str) -> Path:
    """The copy of ``warehouse`` that the run named ``name`` (``build``, the DAG's id) works
    on, beside it (so it replaces the warehouse with a rename)."""
    if not name.isidentifier():
        raise ValueError(f"staging name {name!r} is not a plain name")
    return warehouse.with_name(f"{warehouse.name}.{name}")


def _wal(path: Path) -> Path:
    return path.with_name(f"{path.name}.wal")


def _checkpoint(path: Path) -> None:
    """Fold ``path``'s write-ahead log into the file, so the file alone is the database."""
    con = duckdb.connect(str(path))
    try:
        con.execute("CHECKPOINT")
    finally:
        con.close()


def stage_warehouse(warehouse: Path, staged: Path) -> Path:
    """Copy ``warehouse`` to ``staged`` for a run to change (a leftover copy of an earlier run
    of the same name, which died before committing or discarding it, is discarded first).
    Without a warehouse yet, the run starts from an empty one. Call with the build lock held.

    Costs one file copy: 2 ms for the demo catalogue's 3 MB, 45-120 ms for Home Depot's
    104 MB (54,667 items with their vectors); the disk needs room for the second file.
    """
    if staged.exists() or _wal(staged).exists():
        log.warning("discarding %s, left by a run that did not finish", staged)
        discard_warehouse(warehouse, staged, "rolled back: the run did not finish")
    for stale in staged.parent.glob(f".{staged.name}.tmp-*"):  # a copy cut short
        stale.unlink()
    tmp = staged.with_name(f".{staged.name}.tmp-{os.getpid()}")
    if warehouse.exists():
        if _wal(warehouse).exists():  # a writer died before its checkpoint: replay it first
            _checkpoint(warehouse)
        shutil.copyfile(warehouse, tmp)
        os.replace(tmp, staged)
    return staged


def commit_warehouse(warehouse: Path, staged: Path) -> bool:
    """Replace ``warehouse`` with the run's copy ``staged``, atomically and durably. Returns
    False when there is no copy (a retried step that committed it already). Call with the
    build lock held and no connection to either open."""
    if not staged.exists():
        log.info("no staged warehouse %s to commit (committed already?)", staged)
        return False
    _checkpoint(staged)
    fd = os.open(staged, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    # a log left beside the old file would be replayed into the new one
    _wal(warehouse).unlink(missing_ok=True)
    os.replace(staged, warehouse)
    fd = os.open(warehouse.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("warehouse %s replaced by this run's copy", warehouse)
    return True


def discard_warehouse(warehouse: Path, staged: Path, status: str) -> int:
    """Drop the run's copy ``staged``, keeping what it holds of the record of bad input: the
    ``ingest_runs`` rows the warehouse lacks (an ``ok`` status replaced by ``status``, e.g.
    ``rolled back: the release failed its gate``) and their rejected rows. Returns how many
    runs were carried over. Idempotent; call with the build lock held."""
    if not staged.exists():
        _wal(staged).unlink(missing_ok=True)
        return 0
    carried = 0
    con = connect(warehouse)
    try:
        con.execute(f"ATTACH '{str(staged).replace(chr(39), chr(39) * 2)}' AS staged "
                    "(READ_ONLY)")
        con.execute("BEGIN")
        con.execute("""
            INSERT INTO rejects (run_id, row_number, item_id, reason, raw, rejected_at)
            SELECT run_id, row_number, item_id, reason, raw, rejected_at FROM staged.rejects
            WHERE run_id NOT IN (SELECT run_id FROM ingest_runs)""")
        carried = con.execute("""
            INSERT INTO ingest_runs (run_id, source, rows_read, rows_accepted, rows_rejected,
                                     status, finished_at)
            SELECT run_id, source, rows_read, rows_accepted, rows_rejected,
                   CASE WHEN status = 'ok' THEN ? ELSE status END, finished_at
            FROM staged.ingest_runs WHERE run_id NOT IN (SELECT run_id FROM ingest_runs)""",
                              [status]).fetchone()[0]
        con.execute("COMMIT")
    except duckdb.Error as exc:
        # the copy is unreadable: its record of bad input is lost, and said so
        log.error("discarding %s without carrying its ingest record over: %s", staged, exc)
    finally:
        con.close()
    staged.unlink()
    _wal(staged).unlink(missing_ok=True)
    log.info("warehouse %s left as it was (%s); %d ingest run(s) recorded", warehouse, status,
             carried)
    return int(carried)
