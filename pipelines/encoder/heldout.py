"""The fine-tuned encoder against the incumbent on held-out queries (full-catalogue dense
retrieval), and the gate that decides a promotion."""

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.encoder.train import incumbent_encoder_path
from pipelines.offline.metrics import MIN_NDCG_GAIN
from serving.encoder import Encoder
from serving.layout import embedding_cache
from serving.schema import ITEM_ID, QUERY_ID
from serving.settings import Settings
from serving.text import normalise_query

log = logging.getLogger(__name__)

EVAL_DEPTH = 100


def dense_rankings(encoder: Encoder, item_vecs: np.ndarray, ids: list[str],
                   queries: pl.DataFrame, depth: int = EVAL_DEPTH) -> dict[int, list[str]]:
    """query_id -> the ``depth`` nearest item ids by cosine; ``queries`` has query_id, query."""
    texts = [normalise_query(q, 10_000) for q in queries["query"].to_list()]
    qvecs = encoder.encode(texts)
    depth = min(depth, len(ids))
    out: dict[int, list[str]] = {}
    qids = queries[QUERY_ID].to_list()
    for start in range(0, len(qids), 256):
        scores = qvecs[start:start + 256] @ item_vecs.T
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        for j, row in enumerate(top):
            order = row[np.argsort(-scores[j, row], kind="stable")]
            out[qids[start + j]] = [ids[r] for r in order]
    return out


def _eval_sets(settings: Settings, pairs: pl.DataFrame, products: str | None,
               judgments: str | None) -> list[tuple[str, pl.DataFrame, list[str], Any]]:
    """(name, catalogue, catalogue texts, held-out judgments) for each available set."""
    from pipelines.offline.evaluation import product_texts
    from pipelines.offline.judged import Judgments, load_judgments, load_products

    sets = []
    held = pairs.filter(pl.col("heldout"))
    if products and judgments:
        prods = load_products(Path(products))
        judg = load_judgments(Path(judgments))
        keep = set(held.filter(pl.col("source") == "judged")["query"].to_list())
        frame = judg.frame.filter(pl.col("query").map_elements(
            lambda q: normalise_query(q, 10_000) in keep, return_dtype=pl.Boolean))
        sets.append(("judged", prods, product_texts(prods),
                     Judgments(frame, judg.min_label, judg.relevant_threshold)))
    ev = held.filter(pl.col("source") == "events")
    if ev.height and settings.warehouse_path.is_file():
        from pipelines.catalogue.embed import active_item_texts

        item_ids, texts = active_item_texts(settings.warehouse_path)
        qid = {q: i for i, q in enumerate(sorted(set(ev["query"].to_list())))}
        frame = ev.select(pl.col("query").replace_strict(qid, return_dtype=pl.Int64)
                          .alias(QUERY_ID), "query", ITEM_ID,
                          pl.col("weight").alias("relevance"))
        sets.append(("events", pl.DataFrame({ITEM_ID: item_ids}), texts,
                     Judgments(frame, 0.0, float(ev["weight"].min()))))
    return sets


def evaluate_encoders(settings: Settings, pairs_path: str | Path, encoder_dir: str | Path,
                      products: str | None = None, judgments: str | None = None,
                      cache_path: Path | None = None, hybrid: bool = False,
                      max_items: int | None = None) -> dict[str, Any]:
    """Held-out dense retrieval of the incumbent encoder and the candidate in ``encoder_dir``.

    Returns per evaluation set (``judged``, ``events``) the number of held-out queries and
    the ``incumbent`` and ``candidate`` metrics, and ``gate_set``: the set the gate decides on
    (judged when there is one: it has graded labels for every shown item). With ``hybrid``
    the judged set is also scored with the learned BM25 + dense fusion of ``instantrec eval``.
    Catalogue vectors are read from and added to the DuckDB cache ``cache_path`` (default
    ``<home>/cache/embeddings.duckdb``), keyed by encoder version and text hash.

    ``max_items`` (None = the whole catalogue) caps a catalogue for a cheaper estimate: every
    item judged for a held-out query stays, plus a fixed hash-chosen sample of the others.
    Both encoders see the same catalogue, but retrieval is easier than on the full one.
    """
    from pipelines.offline.evaluation import embed_cached, method_rankings
    from pipelines.offline.judged import score_rankings

    cache_path = cache_path or embedding_cache(settings.home)
    pairs = pl.read_parquet(pairs_path)
    sets = _eval_sets(settings, pairs, products, judgments)
    incumbent = Encoder(incumbent_encoder_path(settings), max_length=settings.item_max_tokens)
    candidate = Encoder(Path(encoder_dir), max_length=settings.item_max_tokens)
    out: dict[str, Any] = {"incumbent": incumbent.version, "candidate": candidate.version,
                           "sets": {}}
    for name, catalogue, texts, judg in sets:
        full = catalogue.height
        if max_items is not None and catalogue.height > max_items:
            catalogue, texts = _sample_catalogue(catalogue, texts, judg, max_items)
        ids = catalogue[ITEM_ID].to_list()
        queries = judg.queries()
        result: dict[str, Any] = {"queries": queries.height, "catalogue": len(ids),
                                  "full_catalogue": full}
        for role, enc in (("incumbent", incumbent), ("candidate", candidate)):
            start = time.perf_counter()
            vecs = embed_cached(enc, texts, cache_path, progress=False)
            embed_s = time.perf_counter() - start
            means, per_query = score_rankings(dense_rankings(enc, vecs, ids, queries), judg,
                                              "retrieval")
            result[role] = {**means, "embed_seconds": round(embed_s, 1)}
            result["scored_queries"] = len(per_query)
            if hybrid and name == "judged":
                # exact search: the encoders are compared, not an index built for either
                ranked = method_rankings(enc, catalogue, judg, "retrieval", cache_path,
                                         retrieval="exact")
                result[role]["hybrid"] = score_rankings(ranked["hybrid"], judg, "retrieval")[0]
        result["gain"] = {m: result["candidate"][m] - result["incumbent"][m]
                          for m in ("ndcg@10", "recall@100", "mrr")}
        out["sets"][name] = result
        log.info("held-out %s (%d queries): nDCG@10 %.4f -> %.4f, recall@100 %.4f -> %.4f",
                 name, result["scored_queries"], result["incumbent"]["ndcg@10"],
                 result["candidate"]["ndcg@10"], result["incumbent"]["recall@100"],
                 result["candidate"]["recall@100"])
    out["gate_set"] = next(iter(out["sets"]), None)
    return out


def _sample_catalogue(catalogue: pl.DataFrame, texts: list[str], judg: Any,
                      max_items: int) -> tuple[pl.DataFrame, list[str]]:
    judged = set(judg.frame[ITEM_ID].to_list())
    ids = catalogue[ITEM_ID].to_list()
    others = sorted((hashlib.sha256(i.encode()).hexdigest(), r) for r, i in enumerate(ids)
                    if i not in judged)
    kept = [r for r, i in enumerate(ids) if i in judged]
    keep = sorted(kept + [r for _, r in others[:max(0, max_items - len(kept))]])
    return catalogue[keep], [texts[r] for r in keep]


def gate(evaluation: dict[str, Any], min_gain: float = MIN_NDCG_GAIN,
         max_recall_drop: float | None = None) -> dict[str, Any]:
    """Promote iff held-out nDCG@10 gains >= ``min_gain`` and recall@100 loses no more than
    ``max_recall_drop`` (default: ``min_gain``) on the gate set; no held-out queries means no
    promotion."""
    max_drop = min_gain if max_recall_drop is None else max_recall_drop
    name = evaluation.get("gate_set")
    if name is None or not evaluation["sets"][name].get("scored_queries"):
        return {"passed": False, "reason": "no held-out queries to evaluate on",
                "min_gain": min_gain}
    g = evaluation["sets"][name]["gain"]
    passed = g["ndcg@10"] >= min_gain and g["recall@100"] >= -max_drop
    return {"passed": passed, "set": name, "ndcg_gain": g["ndcg@10"],
            "recall_gain": g["recall@100"], "min_gain": min_gain, "max_recall_drop": max_drop}
