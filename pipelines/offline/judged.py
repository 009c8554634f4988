"""Judged product-search data: loading judgments and scoring rankings against them.

Works on any files with the schema of ``../shared/data`` (see its README): judgments with
``query_id``, ``query``, a product id column and ``relevance``; products with the same id
column and ``title`` (plus an optional ``description``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.offline.metrics import ndcg_at_k, recall_at_k, reciprocal_rank
from serving.errors import InvalidInputError
from serving.schema import ID_ALIASES, ITEM_ID, QUERY_ID


def read_table(path: Path) -> pl.DataFrame:
    """A Parquet or CSV file, with a clear error for anything else."""
    if not path.is_file():
        raise InvalidInputError(f"file {path} does not exist")
    if path.suffix.lower() == ".parquet":
        return pl.read_parquet(path)
    if path.suffix.lower() == ".csv":
        return pl.read_csv(path)
    raise InvalidInputError(f"{path}: unsupported format (use .parquet or .csv)")


def id_column(df: pl.DataFrame, path: Path) -> str:
    col = next((c for c in ID_ALIASES if c in df.columns), None)
    if col is None:
        raise InvalidInputError(f"{path} has no product id column (one of {list(ID_ALIASES)})")
    return col


@dataclass(frozen=True)
class Judgments:
    """Judged (query, item) pairs; duplicates averaged. Item ids are strings."""

    frame: pl.DataFrame          # query_id, query, item_id, relevance
    min_label: float
    relevant_threshold: float

    def queries(self) -> pl.DataFrame:
        return self.frame.group_by(QUERY_ID).agg(pl.col("query").first()).sort(QUERY_ID)

    def gains(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for qid, item, rel in self.frame.select(QUERY_ID, ITEM_ID, "relevance").iter_rows():
            out.setdefault(qid, {})[item] = rel - self.min_label
        return out

    def relevant(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        rows = self.frame.filter(pl.col("relevance") >= self.relevant_threshold)
        for qid, item in rows.select(QUERY_ID, ITEM_ID).iter_rows():
            out.setdefault(qid, set()).add(item)
        return out


def default_relevant_threshold(labels: pl.Series) -> float:
    """From the raw labels, as in the data README: averaged (fractional) labels -> max - 0.5
    (Home Depot 1..3 -> 2.5); integer labels -> max - 1 (CrowdFlower 1..4 -> 3)."""
    top = float(labels.max())
    fractional = labels.dtype.is_float() and bool((labels != labels.round(0)).any())
    return top - 0.5 if fractional else top - 1.0


def load_judgments(path: Path, relevant_threshold: float | None = None) -> Judgments:
    df = read_table(path)
    missing = {QUERY_ID, "query", "relevance"} - set(df.columns)
    if missing:
        raise InvalidInputError(f"judgments {path} lacks column(s) {sorted(missing)}")
    col = id_column(df, path)
    frame = (
        df.select(pl.col(QUERY_ID).cast(pl.Int64), pl.col("query").cast(pl.String),
                  pl.col(col).cast(pl.String).alias(ITEM_ID),
                  pl.col("relevance").cast(pl.Float64))
        .group_by(QUERY_ID, ITEM_ID)
        .agg(pl.col("query").first(), pl.col("relevance").mean())
        .sort(QUERY_ID, ITEM_ID)
    )
    if frame.height == 0:
        raise InvalidInputError(f"judgments {path} has no rows")
    threshold = (default_relevant_threshold(df["relevance"]) if relevant_threshold is None
                 else relevant_threshold)
    return Judgments(frame, float(frame["relevance"].min()), threshold)


def load_products(path: Path) -> pl.DataFrame:
    """Products as (item_id: str, title, description) with descriptions possibly empty."""
    df = read_table(path)
    col = id_column(df, path)
    if "title" not in df.columns:
        raise InvalidInputError(f"products {path} has no 'title' column")
    desc = pl.col("description").cast(pl.String) if "description" in df.columns else pl.lit(None)
    return df.select(pl.col(col).cast(pl.String).alias(ITEM_ID),
                     pl.col("title").cast(pl.String).fill_null(""),
                     desc.alias("description"))


def score_rankings(rankings: Mapping[int, Sequence[str]], judgments: Judgments,
                   protocol: str) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Mean and per-query nDCG@10 / recall@100 / MRR of ``rankings`` (query_id -> item ids).

    In the retrieval protocol only queries with at least one relevant item count.
    """
    gains, relevant = judgments.gains(), judgments.relevant()
    per_query: dict[int, dict[str, float]] = {}
    for qid, ranking in rankings.items():
        rel = relevant.get(qid, set())
        if protocol == "retrieval" and not rel:
            continue
        per_query[qid] = {
            "ndcg@10": ndcg_at_k(ranking, gains.get(qid, {}), 10),
            "recall@100": recall_at_k(ranking, rel, 100) if rel else float("nan"),
            "mrr": reciprocal_rank(ranking, rel) if rel else float("nan"),
        }
    means = {m: float(np.nanmean([q[m] for q in per_query.values()])) if per_query else 0.0
             for m in ("ndcg@10", "recall@100", "mrr")}
    return means, per_query

