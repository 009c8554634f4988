"""Offline evaluation on judged product-search data (``instantrec eval``).

Two protocols, as the data README defines them: ``rerank`` ranks each query's judged products;
``retrieval`` retrieves from the whole product file. Item embeddings are cached by content
hash and encoder version, so a re-run only encodes what it has not seen.

The retrieval protocol retrieves through the served path by default (``served``): the judged
catalogue becomes a release bundle, written by the code a release uses
(:func:`pipelines.catalogue.index.write_bundle`: Annoy tuned to the recall target, BM25, the item
table), and each query's candidates are :func:`serving.retrieval.retrieve_candidates`'s
(Annoy + BM25, the dense hits then the lexical hits the dense channel did not bring, depth
100), so the figures are those of what serving retrieves. The bundle is cached under the home
by a digest of its inputs. ``exact`` (exact dense top 100 and BM25 top 100, sorted union) is
kept as a reference only: it is not what serving retrieves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import polars as pl

from pipelines.catalogue.embed import vector_matrix
from pipelines.catalogue.index import BUNDLE_LAYOUT, library_versions, write_bundle
from pipelines.catalogue.ingest import content_hash
from pipelines.catalogue.warehouse import query_frame
from pipelines.offline.judged import Judgments, load_judgments, load_products, score_rankings
from serving.encoder import Encoder, Precision
from serving.errors import InvalidInputError, ReleaseError
from serving.lexical import LexicalIndex
from serving.lexical import signature as lexical_signature
from serving.manifest import read_manifest
from serving.query import DEFAULT_STEPS, Step, Vocabulary, parse_steps
from serving.release import Bundle, load_bundle
from serving.relevance import (
    DEPTH,
    MatchFeatures,
    RankerModel,
    channel_features,
    channel_signals,
    hybrid_model,
    minmax,
    on_top,
    query_features,
)
from serving.retrieval import (
    LexicalCache,
    channel_values,
    release_vocabulary,
    retrieve_candidates,
    understood,
)
from serving.schema import CONTENT_HASH, ITEM_ID, QUERY_ID
from serving.text import clean_text, item_text, normalise_query

log = logging.getLogger(__name__)

Protocol = Literal["rerank", "retrieval"]
Retrieval = Literal["served", "exact"]
RETRIEVE_DEPTH = DEPTH  # each channel's candidates, and the ranker's cut
#: What each retrieval of the retrieval protocol is, as the report says it.
RETRIEVALS: dict[str, str] = {
    "served": "the served path: serving.retrieval.retrieve_candidates over a release bundle of "
              "the judged catalogue (Annoy as tuned for a release, BM25; dense hits, then the "
              "lexical hits the dense channel did not bring; depth 100 each)",
    "exact": "reference only, not what serving retrieves: exact dense top 100 and BM25 top "
             "100, sorted union",
}


def text_key(text: str) -> str:
    """The embedding cache's key of an embedded text."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_cached(con: duckdb.DuckDBPyConnection, encoder_version: str, keys: list[str],
                dim: int) -> tuple[dict[str, int], np.ndarray]:
    """The vectors of an embedding cache (open in ``con``) for those of ``keys`` (text keys)
    it holds under ``encoder_version``: (key -> row, float32 matrix of those rows)."""
    con.register("wanted", pl.DataFrame({"text_hash": list(dict.fromkeys(keys))}))
    cached = query_frame(con, """SELECT e.text_hash, e.vector FROM embeddings e
        JOIN wanted w USING (text_hash) WHERE e.encoder_version = ?""", [encoder_version])
    found = {h: i for i, h in enumerate(cached["text_hash"].to_list())}
    matrix = (vector_matrix(cached["vector"]) if cached.height
              else np.zeros((0, dim), dtype=np.float32))
    return found, matrix


def embed_cached(encoder: Encoder, texts: list[str], cache_path: Path,
                 batch_size: int = 64, progress: bool = True,
                 precision: Precision | None = None) -> np.ndarray:
    """Embed ``texts``, reading and filling a DuckDB cache keyed by (encoder version, sha256).

    ``precision`` is passed to :meth:`Encoder.encode` for the texts not cached yet."""
    keys = [text_key(t) for t in texts]
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(cache_path))
    try:
        con.execute("""CREATE TABLE IF NOT EXISTS embeddings (
            encoder_version VARCHAR, text_hash VARCHAR, vector FLOAT[],
            PRIMARY KEY (encoder_version, text_hash))""")
        found, matrix = read_cached(con, encoder.version, keys, encoder.dim)
        todo = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in found and key not in todo:
                todo[key] = text
        if todo:
            log.info("encoding %d texts (%d cached)", len(todo), len(found))
            fresh = encoder.encode(list(todo.values()), batch_size=batch_size, progress=progress,
                                   precision=precision)
            frame = pl.DataFrame({"text_hash": list(todo)}).with_columns(
                pl.Series("vector", fresh, dtype=pl.Array(pl.Float32, fresh.shape[1]))
                .cast(pl.List(pl.Float32)))
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


def _cleaned(products: pl.DataFrame) -> list[tuple[str, str | None]]:
    """Each product's (title, description) as the catalogue holds them: cleaned, no
    description as None."""
    return [(clean_text(t), clean_text(d) if d else None)
            for t, d in products.select("title", "description").iter_rows()]


def product_texts(products: pl.DataFrame) -> list[str]:
    """The text each product is embedded (and, served, BM25-indexed) from."""
    return [item_text(t, None, None, d) for t, d in _cleaned(products)]


@dataclass(frozen=True)
class ServedCatalogue:
    """The judged catalogue as a release bundle, for retrieval through the served path.
    ``product_rows[r]`` is the product row (``load_products`` order) of bundle row ``r``:
    a bundle holds its items sorted by id."""

    bundle: Bundle
    product_rows: np.ndarray


def judged_items(products: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """The judged products as a release's item table (the warehouse's item columns, sorted by
    id; no category, brand or price, all in stock) and, per row of it, the product row."""
    titles, descriptions = zip(*_cleaned(products), strict=True) if products.height else ((), ())
    items = pl.DataFrame({
        ITEM_ID: products[ITEM_ID], "title": list(titles),
        "description": list(descriptions),
    }, schema={ITEM_ID: pl.String, "title": pl.String, "description": pl.String}).with_columns(
        pl.lit(None, dtype=pl.String).alias("category"),
        pl.lit(None, dtype=pl.String).alias("brand"),
        pl.lit(None, dtype=pl.Float64).alias("price"),
        pl.lit(True).alias("in_stock"),
    ).with_row_index("product_row")
    items = items.with_columns(pl.Series(CONTENT_HASH, [
        content_hash(t, d, None, None) for t, d in items.select("title", "description").iter_rows()
    ], dtype=pl.String)).sort(ITEM_ID, maintain_order=True)
    return items.drop("product_row"), items["product_row"].to_numpy().astype(np.int64)


def served_bundle_dir(products: pl.DataFrame, encoder: Encoder, bundles: Path, seed: int,
                      recall_target: float) -> Path:
    """Where the served-path bundle of ``products`` lives under ``bundles``: named by a digest
    of everything it is built from (item ids and texts, the encoder version, the index seed
    and recall target, the bundle layout, BM25 analysis and library versions)."""
    digest = hashlib.sha256(json.dumps([
        BUNDLE_LAYOUT, encoder.version, seed, recall_target, lexical_signature(),
        library_versions(), products[ITEM_ID].to_list(), product_texts(products),
    ]).encode()).hexdigest()[:16]
    return bundles / f"judged-{digest}"


def served_catalogue(products: pl.DataFrame, item_vecs: np.ndarray, encoder: Encoder,
                     bundles: Path, seed: int = 42,
                     recall_target: float = 0.95) -> ServedCatalogue:
    """The release bundle of the judged catalogue (``item_vecs``: the products' vectors, in
    product order), reused from ``bundles`` when one was built from the same inputs, else
    written there by :func:`pipelines.catalogue.index.write_bundle` (staged, then moved into place)."""
    items, product_rows = judged_items(products)
    final = served_bundle_dir(products, encoder, bundles, seed, recall_target)
    try:
        bundle = load_bundle(final)
        log.info("served-path bundle %s reused", final)
    except ReleaseError:
        shutil.rmtree(final, ignore_errors=True)  # incomplete or from other libraries
        staged = bundles / ".staging" / f"{final.name}-{os.getpid()}"
        write_bundle(items, np.ascontiguousarray(item_vecs[product_rows]), staged, final.name,
                     encoder, seed, recall_target)
        try:
            os.replace(staged, final)
        except OSError:  # another run put the same bundle in place first
            shutil.rmtree(staged, ignore_errors=True)
        bundle = load_bundle(final)
        log.info("served-path bundle %s built", final)
    return ServedCatalogue(bundle, product_rows)


@dataclass
class Candidates:
    """Per query: candidate item rows and the signals each channel gives them."""

    rows: dict[int, np.ndarray]
    features: dict[int, dict[str, np.ndarray]]
    queries: dict[int, str]   # normalised query text, as serving sees it


def candidate_signals(encoder: Encoder, lexical: LexicalIndex, products: pl.DataFrame,
                      item_vecs: np.ndarray, judgments: Judgments, protocol: Protocol,
                      query_steps: Sequence[Step] = (),
                      vocabulary: Vocabulary | None = None) -> Candidates:
    """Candidates per query (judged products for ``rerank``; the union of the dense and BM25
    top 100 for ``retrieval``) with their dense and lexical signals.

    Each query is normalised, then rewritten by ``query_steps`` (see
    :func:`serving.query.understand_query`): the lexical channel gets every step, the
    encoder all but the lexical-only ones.

    Query-level signals (how many terms, the best cosine and BM25 score any candidate gets)
    let a learned fusion decide per query which channel to trust.
    """
    ids = products[ITEM_ID].to_list()
    row_of = {item: i for i, item in enumerate(ids)}
    qids, normalised, texts, qvecs = _understood_queries(encoder, judgments, query_steps,
                                                         vocabulary)
    judged = dict(judgments.frame.group_by(QUERY_ID).agg(pl.col(ITEM_ID)).iter_rows())
    rows: dict[int, np.ndarray] = {}
    features: dict[int, dict[str, np.ndarray]] = {}
    for qid, text, qvec in zip(qids, texts, qvecs, strict=True):
        bm25 = lexical.scores(text)
        cos_all = None
        if protocol == "retrieval":
            cos_all = item_vecs @ qvec
            depth = min(RETRIEVE_DEPTH, len(ids))
            dense_top = np.argpartition(-cos_all, depth - 1)[:depth]
            lex_top = np.argpartition(-bm25, depth - 1)[:depth]
            lex_top = lex_top[bm25[lex_top] > 0]
            cand = np.unique(np.concatenate([dense_top, lex_top]))
        else:
            cand = np.array([row_of[i] for i in judged[qid] if i in row_of], dtype=np.int64)
        cos = item_vecs[cand] @ qvec if cos_all is None else cos_all[cand]
        coverage, n_terms = lexical.coverage(text)
        rows[qid] = cand
        features[qid] = channel_signals(cos, bm25[cand], coverage[cand], n_terms)
    return Candidates(rows, features, dict(zip(qids, normalised, strict=True)))


def _understood_queries(encoder: Encoder, judgments: Judgments, query_steps: Sequence[Step],
                        vocabulary: Vocabulary | None,
                        ) -> tuple[list[int], list[str], list[str], np.ndarray]:
    """The judged queries: ids, normalised texts, lexical rewrites and the dense rewrites'
    vectors (:func:`serving.retrieval.understood` with the catalogue's ``vocabulary``)."""
    queries = judgments.queries()
    normalised = [normalise_query(q, 10_000) for q in queries["query"].to_list()]
    rewrites = [understood(q, tuple(query_steps), vocabulary) for q in normalised]
    qvecs = encoder.encode_queries([dense for dense, _ in rewrites])  # as serving's query path
    return (queries[QUERY_ID].to_list(), normalised, [lexical for _, lexical in rewrites],
            qvecs)


def served_candidate_signals(encoder: Encoder, served: ServedCatalogue, judgments: Judgments,
                             query_steps: Sequence[Step] = ()) -> Candidates:
    """Retrieval-protocol candidates per query as serving retrieves them for a plain query
    (:func:`serving.retrieval.retrieve_candidates` on ``served``'s bundle, depth
    :data:`RETRIEVE_DEPTH`), with the signals serving computes for them
    (:func:`serving.retrieval.channel_values`). Rows are product rows, in retrieval order."""
    bundle = served.bundle
    vocabulary = release_vocabulary(bundle, tuple(query_steps))
    qids, normalised, texts, qvecs = _understood_queries(encoder, judgments, query_steps,
                                                         vocabulary)
    lexical = LexicalCache()
    rows: dict[int, np.ndarray] = {}
    features: dict[int, dict[str, np.ndarray]] = {}
    for qid, text, qvec in zip(qids, texts, qvecs, strict=True):
        cand = np.asarray(retrieve_candidates(bundle, qvec, lexical.relative(bundle, text),
                                              RETRIEVE_DEPTH), dtype=np.int64)
        rows[qid] = served.product_rows[cand]
        features[qid] = channel_values(bundle, lexical, text, qvec, cand)
    return Candidates(rows, features, dict(zip(qids, normalised, strict=True)))


def _rank(ids: list[str], cand: np.ndarray, score: np.ndarray, depth: int) -> list[str]:
    order = np.argsort(-score, kind="stable")[:depth]
    return [ids[cand[j]] for j in order]


def cross_fit(c: Candidates, ids: list[str], judgments: Judgments,
              features: dict[int, np.ndarray], make_model: Callable[[int], Any],
              folds: int = 2, repeats: int = 3) -> dict[int, np.ndarray]:
    """Scores of every query's candidates from models that never saw that query.

    Queries are split into ``folds`` by a hash of (repeat, query id); each fold is scored by
    a model fitted on the others. With ``repeats`` > 1 the split is redrawn and the scores
    (standardised per model) are averaged, which steadies the figures of small query sets.
    ``make_model(n_train_queries)`` returns an unfitted model with ``fit``/``predict``. The
    target is the judged gain (unjudged candidates: 0). A query no model could score (too few
    queries to split) is left out of the result.
    """
    gains = judgments.gains()
    qids = [q for q in sorted(c.rows) if len(c.rows[q])]
    target = {q: np.array([gains.get(q, {}).get(ids[r], 0.0) for r in c.rows[q]]) for q in qids}
    out: dict[int, np.ndarray] = {}
    for repeat in range(repeats):
        fold_of = {q: int(hashlib.sha256(f"{repeat}:{q}".encode()).hexdigest(), 16) % folds
                   for q in qids}
        for fold in range(folds):
            train = [q for q in qids if fold_of[q] != fold]
            test = [q for q in qids if fold_of[q] == fold]
            if not train or not test:
                continue
            model = make_model(len(train)).fit(np.vstack([features[q] for q in train]),
                                               np.concatenate([target[q] for q in train]))
            scores = {q: model.predict(features[q]) for q in test}
            spread = float(np.std(np.concatenate(list(scores.values())))) or 1.0
            for q in test:
                out[q] = out.get(q, 0.0) + scores[q] / spread
    return out


METHODS = ("bm25", "dense", "fusion", "hybrid", "ranker")


def on_top_all(ranker: dict[int, np.ndarray], retrieval: dict[int, np.ndarray],
               depth: int) -> dict[int, np.ndarray]:
    """:func:`serving.relevance.on_top` per query: the ranker re-orders the hybrid's top
    ``depth``, as served."""
    return {q: on_top(score, retrieval[q], depth) if q in retrieval else score
            for q, score in ranker.items()}


def method_rankings(encoder: Encoder, products: pl.DataFrame, judgments: Judgments,
                    protocol: Protocol, cache_path: Path,
                    query_steps: Sequence[Step] = DEFAULT_STEPS,
                    methods: Sequence[str] = METHODS, retrieval: Retrieval = "served",
                    bundles: Path | None = None, seed: int = 42,
                    recall_target: float = 0.95) -> dict[str, dict[int, list[str]]]:
    """query_id -> ranked item ids, for each of ``methods``: ``bm25``, ``dense``, ``fusion``
    (the data README's plain 50/50 min-max fusion), ``hybrid`` (learned fusion of the two
    channels) and ``ranker`` (learned ranker on top of both channels and match features).
    The learned methods are cross-fitted: a query is always scored by models trained on
    other queries only.

    With the ``units`` and ``dimensions`` steps the lexical index rewrites item text the same
    way; item embeddings are never affected (the dense channel rewrites queries only).

    ``retrieval`` (retrieval protocol only; see :data:`RETRIEVALS`): ``served`` retrieves
    through the served path from a release bundle of ``products`` built (or reused) under
    ``bundles`` (default: ``bundles`` beside ``cache_path``) with Annoy ``seed`` and
    ``recall_target``, whose BM25 index is built as a release's (units and dimensions on);
    ``exact`` is the exact-search reference.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    if retrieval not in RETRIEVALS:
        raise ValueError(f"unknown retrieval {retrieval!r}; known: {list(RETRIEVALS)}")
    texts = product_texts(products)
    item_vecs = embed_cached(encoder, texts, cache_path)
    ids = products[ITEM_ID].to_list()
    if protocol == "retrieval" and retrieval == "served":
        served = served_catalogue(products, item_vecs, encoder,
                                  bundles or cache_path.parent / "bundles", seed, recall_target)
        c = served_candidate_signals(encoder, served, judgments, query_steps)
    else:
        lexical = LexicalIndex.build(texts, units="units" in query_steps,
                                     dimensions="dimensions" in query_steps)
        vocabulary = (Vocabulary(lexical.words, stem=lexical.stem)
                      if {"spelling", "compounds"} & set(query_steps) else None)
        c = candidate_signals(encoder, lexical, products, item_vecs, judgments, protocol,
                              query_steps, vocabulary)
    depth = RETRIEVE_DEPTH
    learned: dict[str, dict[int, np.ndarray]] = {}
    if {"hybrid", "ranker"} & set(methods):
        channels = {q: channel_features(c.features[q]) for q in c.rows if len(c.rows[q])}
        learned["hybrid"] = cross_fit(c, ids, judgments, channels, hybrid_model)
        if "ranker" in methods:
            # the served ranker's features (serving.relevance), on the titles serving holds
            match = MatchFeatures([clean_text(t) for t in products["title"].to_list()])
            full = {q: query_features(c.features[q], match, c.queries[q], c.rows[q])
                    for q in channels}
            learned["ranker"] = on_top_all(cross_fit(c, ids, judgments, full, RankerModel),
                                       learned["hybrid"], depth)
    out: dict[str, dict[int, list[str]]] = {m: {} for m in methods}
    for q, cand in c.rows.items():
        f = c.features[q]
        for method in methods:
            score = (learned[method].get(q, f["cos"]) if method in learned
                     else _plain_score(method, f, protocol))
            out[method][q] = _rank(ids, cand, score, depth)
    if protocol == "retrieval" and "bm25" in out:  # bm25 alone retrieves only what it scores
        out["bm25"] = {q: [i for i, s in zip(r, _scores_of(c, q, r, ids), strict=True) if s > 0]
                       for q, r in out["bm25"].items()}
    return out


def _plain_score(method: str, f: dict[str, np.ndarray], protocol: Protocol) -> np.ndarray:
    if method == "dense":
        return f["cos"]
    if method == "bm25":
        return f["bm25"] if protocol == "rerank" else np.where(f["bm25"] > 0, f["bm25"], -1.0)
    return 0.5 * minmax(f["bm25"]) + 0.5 * minmax(f["cos"])  # the plain 50/50 fusion


def _scores_of(c: Candidates, q: int, ranked: list[str], ids: list[str]) -> list[float]:
    pos = {ids[r]: j for j, r in enumerate(c.rows[q])}
    return [float(c.features[q]["bm25"][pos[i]]) for i in ranked]


def evaluate_judged(products_path: Path, judgments_path: Path, protocol: Protocol,
                    encoder: Encoder, cache_path: Path, per_query: bool = False,
                    relevant_threshold: float | None = None,
                    query_steps: str | Sequence[str] | None = None,
                    methods: str | Sequence[str] | None = None,
                    retrieval: Retrieval = "served", bundles: Path | None = None,
                    seed: int = 42, recall_target: float = 0.95) -> dict[str, Any]:
    """Run every available method under ``protocol``; returns the JSON-able report.

    ``query_steps``: the query-understanding steps to apply (a comma list or names; ``"none"``
    for none; ``None`` for :data:`serving.query.DEFAULT_STEPS`). ``methods``: a subset of
    :data:`METHODS` (a comma list or names; ``None`` for all). ``retrieval``, ``bundles``,
    ``seed``, ``recall_target``: how the retrieval protocol retrieves (see
    :func:`method_rankings`); the report's ``retrieval`` says which it was.
    """
    if retrieval not in RETRIEVALS:
        raise InvalidInputError(f"unknown retrieval {retrieval!r}; known: {list(RETRIEVALS)}")
    steps = parse_steps(query_steps)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    wanted = tuple(methods or METHODS)
    unknown_methods = sorted(set(wanted) - set(METHODS))
    if unknown_methods:
        raise InvalidInputError(f"unknown method(s) {unknown_methods}; known: {list(METHODS)}")
    products = load_products(products_path)
    judgments = load_judgments(judgments_path, relevant_threshold)
    unknown = judgments.frame.join(products, on=ITEM_ID, how="anti")
    if unknown.height:
        log.warning("%d judged pairs name products missing from %s; they are skipped",
                    unknown.height, products_path)
    methods: dict[str, Any] = {}
    details: dict[str, Any] = {}
    n_queries = 0
    bundles = bundles or cache_path.parent / "bundles"
    for method, rankings in method_rankings(encoder, products, judgments, protocol,
                                            cache_path, steps, wanted, retrieval, bundles,
                                            seed, recall_target).items():
        means, by_query = score_rankings(rankings, judgments, protocol)
        methods[method] = means
        details[method] = {str(q): m for q, m in by_query.items()}
        n_queries = max(n_queries, len(by_query))
    report: dict[str, Any] = {
        "protocol": protocol,
        "n_queries": n_queries,
        "relevant_threshold": judgments.relevant_threshold,
        "encoder": encoder.version,
        "query_steps": list(steps),
        "retrieval": _retrieval_report(protocol, retrieval, products, encoder, bundles, seed,
                                       recall_target),
        "methods": methods,
    }
    if per_query:
        report["per_query"] = details
    return report


def _retrieval_report(protocol: Protocol, retrieval: Retrieval, products: pl.DataFrame,
                      encoder: Encoder, bundles: Path, seed: int,
                      recall_target: float) -> dict[str, Any]:
    """What the report says about how candidates were found: the retrieval's name and what it
    is, and for the served path, the bundle and its Annoy setting."""
    if protocol == "rerank":
        return {"name": "judged", "description": "each query's judged products (re-rank "
                                                 "protocol: nothing is retrieved)"}
    out: dict[str, Any] = {"name": retrieval, "description": RETRIEVALS[retrieval],
                           "depth": RETRIEVE_DEPTH}
    if retrieval == "served":
        bundle_dir = served_bundle_dir(products, encoder, bundles, seed, recall_target)
        index = read_manifest(bundle_dir, verify_files=False).index
        out["bundle"] = {"path": str(bundle_dir), "n_trees": index.n_trees,
                         "search_k": index.search_k, "seed": index.seed,
                         "recall_at_10": index.recall_at_10, "recall_target": recall_target}
    return out


def write_eval_chart(report: dict[str, Any], path: Path, title: str = "") -> Path:
    """PNG of each method's nDCG@10, recall@100 and MRR (grouped bars, values printed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, whatever the environment says
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    metrics = ("ndcg@10", "recall@100", "mrr")
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2.5, 4.5), dpi=110)
    for m, metric in enumerate(metrics):
        values = [report["methods"][method][metric] for method in methods]
        xs = [i + (m - (len(metrics) - 1) / 2) * width for i in range(len(methods))]
        bars = ax.bar(xs, values, width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("mean over queries")
    ax.set_title(title or f"{report['protocol']} protocol, {report['n_queries']} queries")
    ax.legend(loc="upper center", ncols=len(metrics), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
