"""Embedding: encode only items whose content or encoder changed, in shards.

A shard opens the warehouse read-only (DuckDB allows many readers, one writer), so Airflow
can run shards side by side; each writes its vectors to a shard file, and
:func:`store_vectors` folds the shard files into the warehouse in one writer.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.catalogue.warehouse import connect, query_frame
from serving.encoder import Encoder
from serving.failpoints import failpoint
from serving.schema import CONTENT_HASH, ITEM_ID
from serving.text import item_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedReport:
    shard: int
    shards: int
    encoder_version: str
    embedded: int
    seconds: float
    output: str | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _slug(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", version)


def shard_dir(work_dir: Path, encoder_version: str) -> Path:
    return work_dir / "vectors" / _slug(encoder_version)


def pending_items(warehouse: Path, encoder_version: str, shard: int = 0,
                  shards: int = 1) -> pl.DataFrame:
    """Active items of shard ``shard`` of ``shards`` with no vector for their current content
    under ``encoder_version``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    con = connect(warehouse, read_only=True)
    try:
        return query_frame(con, """
            SELECT i.item_id, i.title, i.description, i.category, i.brand, i.content_hash
            FROM items i LEFT JOIN item_vectors v
              ON v.item_id = i.item_id AND v.encoder_version = ?
            WHERE i.active AND (v.item_id IS NULL OR v.content_hash <> i.content_hash)
              AND hash(i.item_id) % ? = ?
            ORDER BY i.item_id""", [encoder_version, shards, shard])
    finally:
        con.close()


def active_item_texts(warehouse: Path) -> tuple[list[str], list[str]]:
    """Ids (sorted) and embedded texts of the active items: the text the embed step encodes."""
    con = connect(warehouse, read_only=True)
    try:
        items = query_frame(con, """SELECT item_id, title, description, category, brand
                                    FROM items WHERE active ORDER BY item_id""")
    finally:
        con.close()
    return (items[ITEM_ID].to_list(),
            [item_text(r["title"], r["brand"], r["category"], r["description"])
             for r in items.iter_rows(named=True)])


@dataclass(frozen=True)
class EncoderLoader:
    """An encoder that is not loaded yet: its :attr:`~serving.encoder.Encoder.version` (from
    the weight files' digest, see :func:`serving.encoder.encoder_version`) and how to load it.

    Loading the encoder takes 13-17 s on two cores; a shard with nothing pending never pays it.
    """

    version: str
    load: Callable[[], Encoder]


class ProgressLog:
    """Log lines ``embed shard i/n: done/total items (pct), items/s, ETA`` at most every
    ``every_s`` seconds, and once at the end: what a task log shows while a shard embeds."""

    def __init__(self, label: str, total: int, every_s: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.every_s = every_s
        self.done = 0
        self._start = time.monotonic()
        self._last = self._start

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done < self.total and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info("%s: %d/%d items (%.0f%%), %.1f items/s, ETA %.0f s", self.label, self.done,
                 self.total, 100.0 * self.done / max(self.total, 1), rate, eta)


def encode_logged(encoder: Encoder, texts: list[str], batch_size: int, label: str,
                  every_s: float = 5.0) -> np.ndarray:
    """``encoder.encode(texts)`` in chunks of a few batches, logging progress between chunks.

    Texts are ordered by length before chunking, so each chunk still batches near-equal
    lengths together as one :meth:`~serving.encoder.Encoder.encode` call would.
    """
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunk = batch_size * 2
    progress = ProgressLog(label, len(texts), every_s)
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        out[idx] = encoder.encode([texts[i] for i in idx], batch_size=batch_size)
        progress.update(len(idx))
    return out


def embed_items(warehouse: Path, work_dir: Path, encoder: Encoder | EncoderLoader,
                shard: int = 0, shards: int = 1, batch_size: int = 64, progress: bool = False,
                log_every_s: float = 5.0) -> EmbedReport:
    """Embed the pending items of one shard and write them to a shard file under ``work_dir``.

    An unchanged item (same content hash, same encoder version) is never re-embedded, and an
    :class:`EncoderLoader` is loaded only if the shard has pending items. ``progress`` shows a
    progress bar (the CLI); otherwise progress is logged every ``log_every_s`` seconds (a task
    log).
    """
    start = datetime.now(UTC)
    label = f"embed shard {shard}/{shards}"
    todo = pending_items(warehouse, encoder.version, shard, shards)
    out_dir = shard_dir(work_dir, encoder.version)
    out_path = out_dir / f"shard-{shard:04d}-of-{shards:04d}.parquet"
    if todo.height == 0:
        log.info("%s: nothing to do", label)
        return EmbedReport(shard, shards, encoder.version, 0, 0.0, None)
    if isinstance(encoder, EncoderLoader):
        log.info("%s: %d pending items; loading encoder %s", label, todo.height, encoder.version)
        t0 = time.monotonic()
        encoder = encoder.load()
        log.info("%s: encoder loaded in %.1f s", label, time.monotonic() - t0)
    texts = [item_text(r["title"], r["brand"], r["category"], r["description"])
             for r in todo.iter_rows(named=True)]
    if progress:
        vectors = encoder.encode(texts, batch_size=batch_size, progress=True)
    else:
        vectors = encode_logged(encoder, texts, batch_size, label, log_every_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = todo.select(ITEM_ID, CONTENT_HASH).with_columns(
        pl.Series("vector", vectors, dtype=pl.Array(pl.Float32, encoder.dim)))
    for stale in out_dir.glob(f".{out_path.name}.tmp-*"):  # of an attempt killed mid-write
        stale.unlink()
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    frame.write_parquet(tmp)
    failpoint("embed.written")
    os.replace(tmp, out_path)
    seconds = (datetime.now(UTC) - start).total_seconds()
    log.info("%s: %d items in %.1f s", label, todo.height, seconds)
    return EmbedReport(shard, shards, encoder.version, todo.height, seconds, str(out_path))


def store_vectors(warehouse: Path, work_dir: Path, encoder_version: str) -> int:
    """Upsert every shard file of ``encoder_version`` into ``item_vectors``; returns rows.

    Shard files are removed only after the transaction commits, so a crash re-applies them.
    """
    files = sorted(shard_dir(work_dir, encoder_version).glob("shard-*.parquet"))
    if not files:
        return 0
    frame = pl.concat([pl.read_parquet(f) for f in files]).with_columns(
        pl.col("vector").cast(pl.List(pl.Float32)))
    now = datetime.now(UTC).replace(tzinfo=None)
    con = connect(warehouse)
    try:
        con.register("incoming", frame)
        con.execute("""
            INSERT INTO item_vectors
            SELECT item_id, ?, content_hash, vector, ? FROM incoming
            ON CONFLICT (item_id, encoder_version) DO UPDATE SET
                content_hash = excluded.content_hash, vector = excluded.vector,
                embedded_at = excluded.embedded_at""", [encoder_version, now])
    finally:
        con.close()
    for f in files:
        f.unlink()
    log.info("stored %d vectors from %d shard files", frame.height, len(files))
    return frame.height


def vector_matrix(column: pl.Series) -> np.ndarray:
    """A column of equal-length float lists (as DuckDB returns FLOAT[]) as one float32 matrix.

    Converted through a fixed-width array column in one block: a Python list per row took
    4 s for 54,667 vectors of 384."""
    if column.len() == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = column.list.len()
    dim = int(lengths.max())  # type: ignore[arg-type]
    if lengths.min() != dim or column.null_count():
        raise ValueError(f"vectors of unequal length ({lengths.min()}..{dim}) or missing")
    return np.ascontiguousarray(column.cast(pl.List(pl.Float32)).list.to_array(dim).to_numpy(),
                                dtype=np.float32)


def load_vectors(warehouse: Path, encoder_version: str) -> tuple[pl.DataFrame, np.ndarray]:
    """Active items (sorted by id) and their vectors under ``encoder_version``.

    Raises ValueError if an active item has no current vector (embed has not run).
    """
    con = connect(warehouse, read_only=True)
    try:
        table = query_frame(con, """
            SELECT i.item_id, i.title, i.description, i.category, i.brand, i.price, i.in_stock,
                   i.content_hash, v.vector, v.content_hash = i.content_hash AS fresh
            FROM items i LEFT JOIN item_vectors v
              ON v.item_id = i.item_id AND v.encoder_version = ?
            WHERE i.active ORDER BY i.item_id""", [encoder_version])
    finally:
        con.close()
    stale = table.filter(~pl.col("fresh").fill_null(False))
    if stale.height:
        raise ValueError(
            f"{stale.height} active items have no current vector for {encoder_version} "
            f"(e.g. {stale['item_id'].head(3).to_list()}); run embed first"
        )
    if not table.height:
        return table.drop("vector", "fresh"), np.zeros((0, 0), dtype=np.float32)
    vectors = vector_matrix(table["vector"])
    return table.drop("vector", "fresh"), vectors
