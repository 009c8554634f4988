"""Offline evaluation on judged product-search data (``instantrec eval``).

Two protocols, as the data README defines them: ``rerank`` ranks each query's judged products;
``retrieval`` retrieves from the whole product file. Item embeddings are cached by content
hash and encoder version, so a re-run only encodes what it has not seen.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import polars as pl

from pipelines.judged import Judgments, load_judgments, load_products, score_rankings
from pipelines.warehouse import query_frame
from serving.encoder import Encoder
from serving.text import clean_text, item_text, normalise_query

log = logging.getLogger(__name__)

Protocol = Literal["rerank", "retrieval"]
RETRIEVE_DEPTH = 100


def embed_cached(encoder: Encoder, texts: list[str], cache_path: Path,
                 batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Embed ``texts``, reading and filling a DuckDB cache keyed by (encoder version, sha256)."""
    keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(cache_path))
    try:
        con.execute("""CREATE TABLE IF NOT EXISTS embeddings (
            encoder_version VARCHAR, text_hash VARCHAR, vector FLOAT[],
            PRIMARY KEY (encoder_version, text_hash))""")
        con.register("wanted", pl.DataFrame({"text_hash": list(dict.fromkeys(keys))}))
        cached = query_frame(con, """SELECT e.text_hash, e.vector FROM embeddings e
            JOIN wanted w USING (text_hash) WHERE e.encoder_version = ?""",
                             [encoder.version])
        found = {h: i for i, h in enumerate(cached["text_hash"].to_list())}
        matrix = (np.asarray(cached["vector"].to_list(), dtype=np.float32) if cached.height
                  else np.zeros((0, encoder.dim), dtype=np.float32))
        todo = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in found and key not in todo:
                todo[key] = text
        if todo:
            log.info("encoding %d texts (%d cached)", len(todo), len(found))
            fresh = encoder.encode(list(todo.values()), batch_size=batch_size, progress=progress)
            frame = pl.DataFrame({"text_hash": list(todo), "vector": fresh.tolist()},
                                 schema={"text_hash": pl.String, "vector": pl.List(pl.Float32)})
            con.register("fresh", frame)
            con.execute("INSERT OR IGNORE INTO embeddings SELECT ?, text_hash, vector FROM fresh",
                        [encoder.version])
            base = len(found)
            for j, key in enumerate(todo):
                found[key] = base + j
            matrix = np.vstack([matrix, fresh])
    finally:
        con.close()
    return matrix[[found[k] for k in keys]]


def product_texts(products: pl.DataFrame) -> list[str]:
    return [item_text(clean_text(t), None, None, clean_text(d) if d else None)
            for t, d in products.select("title", "description").iter_rows()]


def dense_rankings(encoder: Encoder, products: pl.DataFrame, judgments: Judgments,
                   protocol: Protocol, cache_path: Path) -> dict[int, list[str]]:
    """query_id -> item ids ranked by cosine between query and item vectors."""
    item_vecs = embed_cached(encoder, product_texts(products), cache_path)
    ids = np.asarray(products["item_id"].to_list(), dtype=object)
    queries = judgments.queries()
    qvecs = encoder.encode([normalise_query(q, 10_000) for q in queries["query"].to_list()])
    qids = queries["query_id"].to_list()
    rankings: dict[int, list[str]] = {}
    if protocol == "retrieval":
        for start in range(0, len(qids), 256):
            sims = qvecs[start:start + 256] @ item_vecs.T
            depth = min(RETRIEVE_DEPTH, sims.shape[1])
            top = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
            for row, cand in enumerate(top):
                order = cand[np.argsort(-sims[row, cand], kind="stable")]
                rankings[qids[start + row]] = ids[order].tolist()
    else:
        row_of = {item: i for i, item in enumerate(ids.tolist())}
        judged = judgments.frame.group_by("query_id").agg(pl.col("item_id"))
        judged_items = dict(judged.iter_rows())
        for qid, qvec in zip(qids, qvecs, strict=True):
            items = [i for i in judged_items[qid] if i in row_of]
            sims = item_vecs[[row_of[i] for i in items]] @ qvec
            rankings[qid] = [items[j] for j in np.argsort(-sims, kind="stable")]
    return rankings


def evaluate_judged(products_path: Path, judgments_path: Path, protocol: Protocol,
                    encoder: Encoder, cache_path: Path, per_query: bool = False,
                    relevant_threshold: float | None = None) -> dict[str, Any]:
    """Run every available method under ``protocol``; returns the JSON-able report."""
    products = load_products(products_path)
    judgments = load_judgments(judgments_path, relevant_threshold)
    unknown = judgments.frame.join(products, on="item_id", how="anti")
    if unknown.height:
        log.warning("%d judged pairs name products missing from %s; they are skipped",
                    unknown.height, products_path)
    methods: dict[str, Any] = {}
    details: dict[str, Any] = {}
    rankings = dense_rankings(encoder, products, judgments, protocol, cache_path)
    means, by_query = score_rankings(rankings, judgments, protocol)
    methods["dense"] = means
    details["dense"] = {str(q): m for q, m in by_query.items()}
    report: dict[str, Any] = {
        "protocol": protocol,
        "n_queries": len(by_query),
        "relevant_threshold": judgments.relevant_threshold,
        "encoder": encoder.version,
        "methods": methods,
    }
    if per_query:
        report["per_query"] = details
    return report
