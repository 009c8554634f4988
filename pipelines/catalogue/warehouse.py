"""The DuckDB warehouse: items, rejected rows, item vectors and ingest runs."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

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
