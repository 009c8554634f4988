"""Offline evaluation on judged product-search data (``instantrec eval``).

Two protocols, as the data README defines them: ``rerank`` ranks each query's judged products;
``retrieval`` retrieves from the whole product file. Item embeddings are cached by content
hash and encoder version, so a re-run only encodes what it has not seen.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import polars as pl

from pipelines.embed import vector_matrix
from pipelines.judged import Judgments, load_judgments, load_products, score_rankings
from pipelines.warehouse import query_frame
from serving.encoder import Encoder, Precision
from serving.errors import InvalidInputError
from serving.lexical import LexicalIndex
from serving.query import DEFAULT_STEPS, Step, Vocabulary, parse_steps, understand_query
from serving.text import clean_text, item_text, normalise_query

log = logging.getLogger(__name__)

Protocol = Literal["rerank", "retrieval"]
RETRIEVE_DEPTH = 100


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


def product_texts(products: pl.DataFrame) -> list[str]:
    return [item_text(clean_text(t), None, None, clean_text(d) if d else None)
            for t, d in products.select("title", "description").iter_rows()]


@dataclass
class Candidates:
    """Per query: candidate item rows and the signals each channel gives them."""

    rows: dict[int, np.ndarray]
    features: dict[int, dict[str, np.ndarray]]


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
    ids = products["item_id"].to_list()
    row_of = {item: i for i, item in enumerate(ids)}
    queries = judgments.queries()
    qids = queries["query_id"].to_list()
    normalised = [normalise_query(q, 10_000) for q in queries["query"].to_list()]
    texts = [understand_query(q, query_steps, vocabulary) for q in normalised]
    qvecs = encoder.encode([understand_query(q, query_steps, vocabulary, channel="dense")
                            for q in normalised], precision="fp32")  # as serving's query path
    judged = dict(judgments.frame.group_by("query_id").agg(pl.col("item_id")).iter_rows())
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
        terms = [t for t in lexical.tokens(text)]
        known = [t for t in terms if t in lexical.vocab]
        cover = np.zeros(len(cand))
        for t in known:
            cover += lexical.term_scores(t)[cand] > 0
        n_terms = max(len(terms), 1)
        lex = bm25[cand]
        max_bm25 = float(lex.max()) if len(lex) else 0.0
        max_cos = float(cos.max()) if len(cos) else 0.0
        rows[qid] = cand
        features[qid] = {
            "cos": cos, "cos_gap": cos - max_cos, "bm25": lex,
            "bm25_rel": lex / max_bm25 if max_bm25 > 0 else np.zeros(len(cand)),
            "coverage": cover / n_terms, "q_terms": np.full(len(cand), float(len(terms))),
            "max_cos": np.full(len(cand), max_cos), "max_bm25": np.full(len(cand), max_bm25),
        }
    return Candidates(rows, features)


def _rank(ids: list[str], cand: np.ndarray, score: np.ndarray, depth: int) -> list[str]:
    order = np.argsort(-score, kind="stable")[:depth]
    return [ids[cand[j]] for j in order]


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _ranks(x: np.ndarray) -> np.ndarray:
    """0-based rank of each entry of ``x`` (best = highest first)."""
    out = np.empty(len(x))
    out[np.argsort(-x, kind="stable")] = np.arange(len(x))
    return out


RRF_K = 60  # the usual reciprocal-rank-fusion constant


def channel_features(f: dict[str, np.ndarray]) -> np.ndarray:
    """What the two channels say about each candidate, for the learned fusion (``hybrid``).

    Scores on each channel's own scale and per-query normalised (min-max, as the plain fusion
    uses), reciprocal ranks (as RRF uses), and interactions that let the weights depend on
    the query: how far a candidate is from the best dense match, and how much of the query
    the lexical channel actually matched.
    """
    lexical_rank = np.where(f["bm25"] > 0, _ranks(f["bm25"]), 10 * RETRIEVE_DEPTH)
    return np.column_stack([
        f["cos"], f["cos_gap"], f["bm25_rel"], f["coverage"],
        f["bm25_rel"] * f["coverage"], f["bm25_rel"] * f["max_cos"], f["cos_gap"] * f["coverage"],
        _minmax(f["cos"]), _minmax(f["bm25"]),
        1.0 / (RRF_K + _ranks(f["cos"])), 1.0 / (RRF_K + lexical_rank),
    ])


_WORDS = re.compile(r"\w+")


class MatchFeatures:
    """Query-item evidence beyond the two channels' scores, for the learned ranker: the share
    of the query's numbers and sizes found in the item ("3/4", "18v", model numbers: the
    dense channel blurs them and BM25 weighs them like any word), the share of the query's
    adjacent word pairs found in order (phrase evidence BM25's bag of words ignores), and the
    item's text length. Item words are tokenised once and kept."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._texts = texts
        self._items: dict[int, tuple[frozenset[str], frozenset[tuple[str, str]], float]] = {}

    def _item(self, row: int) -> tuple[frozenset[str], frozenset[tuple[str, str]], float]:
        got = self._items.get(row)
        if got is None:
            words = _WORDS.findall(self._texts[row].casefold())
            got = (frozenset(words), frozenset(zip(words, words[1:], strict=False)),
                   float(np.log1p(len(words))))
            self._items[row] = got
        return got

    def __call__(self, query: str, rows: np.ndarray) -> np.ndarray:
        words = _WORDS.findall(query.casefold())
        numbers = [w for w in words if any(ch.isdigit() for ch in w)]
        pairs = list(zip(words, words[1:], strict=False))
        out = np.zeros((len(rows), 4))
        for i, row in enumerate(rows):
            item_words, item_pairs, length = self._item(int(row))
            if numbers:
                out[i, 0] = sum(w in item_words for w in numbers) / len(numbers)
            if pairs:
                out[i, 1] = sum(p in item_pairs for p in pairs) / len(pairs)
            out[i, 2] = length
        out[:, 3] = float(bool(numbers))
        return out


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


def hybrid_model(n_train_queries: int = 0) -> Any:
    """The learned fusion: a ridge regression of judged gain on :func:`channel_features`.
    Measured on the development queries, a linear model beat gradient-boosted trees here
    (which overfit CrowdFlower's 151 queries) and fixed convex weights."""
    from sklearn.linear_model import Ridge

    return Ridge(alpha=1.0)


#: Fewer training queries than this and the ranker stays linear: on CrowdFlower's ~75
#: training queries per fold the trees overfit (re-rank nDCG@10 0.886 against 0.892 linear).
MIN_QUERIES_FOR_TREES = 1000


class RankerModel:
    """The learned ranker on top: a ridge regression over the channel signals and
    :class:`MatchFeatures`, plus gradient-boosted trees on the same features once there are
    enough training queries (:data:`MIN_QUERIES_FOR_TREES`). The trees capture non-linear
    evidence (a model number that matches, a phrase in order); the ridge keeps the ranking
    sane where the trees have little data."""

    def __init__(self, n_train_queries: int = 0) -> None:
        self.linear = hybrid_model()
        self.trees = None
        if n_train_queries >= MIN_QUERIES_FOR_TREES:
            from sklearn.ensemble import HistGradientBoostingRegressor

            self.trees = HistGradientBoostingRegressor(
                max_depth=3, learning_rate=0.05, max_iter=200, min_samples_leaf=50,
                l2_regularization=1.0, random_state=0)

    def fit(self, X: np.ndarray, y: np.ndarray) -> RankerModel:
        self.linear.fit(X, y)
        if self.trees is not None:
            self.trees.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        linear = self.linear.predict(X)
        return linear if self.trees is None else linear + self.trees.predict(X)


METHODS = ("bm25", "dense", "fusion", "hybrid", "ranker")


def on_top(ranker: dict[int, np.ndarray], retrieval: dict[int, np.ndarray],
           depth: int) -> dict[int, np.ndarray]:
    """The ranker re-orders what retrieval returned: per query, only the ``depth`` candidates
    with the best ``retrieval`` scores keep their ``ranker`` score; the rest go below them (in
    retrieval order). As served: the hybrid retrieves, the ranker sorts that list, so the
    ranker's top ``depth`` holds the same items as the hybrid's (recall@depth is the same)."""
    out: dict[int, np.ndarray] = {}
    for q, score in ranker.items():
        base = retrieval.get(q)
        if base is None or len(base) <= depth:
            out[q] = score
            continue
        top = np.zeros(len(base), dtype=bool)
        top[np.argsort(-base, kind="stable")[:depth]] = True  # the hybrid's own cut (_rank)
        below = score.min() - 1.0 - (base.max() - base)  # below every kept score, hybrid order
        out[q] = np.where(top, score, below)
    return out


def method_rankings(encoder: Encoder, products: pl.DataFrame, judgments: Judgments,
                    protocol: Protocol, cache_path: Path,
                    query_steps: Sequence[Step] = DEFAULT_STEPS,
                    methods: Sequence[str] = METHODS) -> dict[str, dict[int, list[str]]]:
    """query_id -> ranked item ids, for each of ``methods``: ``bm25``, ``dense``, ``fusion``
    (the data README's plain 50/50 min-max fusion), ``hybrid`` (learned fusion of the two
    channels) and ``ranker`` (learned ranker on top of both channels and match features).
    The learned methods are cross-fitted: a query is always scored by models trained on
    other queries only.

    With the ``units`` and ``dimensions`` steps the lexical index rewrites item text the same
    way; item embeddings are never affected (the dense channel rewrites queries only).
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    texts = product_texts(products)
    item_vecs = embed_cached(encoder, texts, cache_path)
    lexical = LexicalIndex.build(texts, units="units" in query_steps,
                                 dimensions="dimensions" in query_steps)
    vocabulary = (Vocabulary(lexical.words, stem=lexical.stem)
                  if {"spelling", "compounds"} & set(query_steps) else None)
    ids = products["item_id"].to_list()
    c = candidate_signals(encoder, lexical, products, item_vecs, judgments, protocol,
                          query_steps, vocabulary)
    depth = RETRIEVE_DEPTH
    learned: dict[str, dict[int, np.ndarray]] = {}
    if {"hybrid", "ranker"} & set(methods):
        channels = {q: channel_features(c.features[q]) for q in c.rows if len(c.rows[q])}
        learned["hybrid"] = cross_fit(c, ids, judgments, channels, hybrid_model)
        if "ranker" in methods:
            match = MatchFeatures(texts)
            query_of = dict(judgments.queries().iter_rows())
            full = {q: np.hstack([x, match(query_of[q], c.rows[q])]) for q, x in channels.items()}
            learned["ranker"] = on_top(cross_fit(c, ids, judgments, full, RankerModel),
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
    return 0.5 * _minmax(f["bm25"]) + 0.5 * _minmax(f["cos"])  # the plain 50/50 fusion


def _scores_of(c: Candidates, q: int, ranked: list[str], ids: list[str]) -> list[float]:
    pos = {ids[r]: j for j, r in enumerate(c.rows[q])}
    return [float(c.features[q]["bm25"][pos[i]]) for i in ranked]


def evaluate_judged(products_path: Path, judgments_path: Path, protocol: Protocol,
                    encoder: Encoder, cache_path: Path, per_query: bool = False,
                    relevant_threshold: float | None = None,
                    query_steps: str | Sequence[str] | None = None,
                    methods: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Run every available method under ``protocol``; returns the JSON-able report.

    ``query_steps``: the query-understanding steps to apply (a comma list or names; ``"none"``
    for none; ``None`` for :data:`serving.query.DEFAULT_STEPS`). ``methods``: a subset of
    :data:`METHODS` (a comma list or names; ``None`` for all).
    """
    steps = parse_steps(query_steps)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    wanted = tuple(methods or METHODS)
    unknown_methods = sorted(set(wanted) - set(METHODS))
    if unknown_methods:
        raise InvalidInputError(f"unknown method(s) {unknown_methods}; known: {list(METHODS)}")
    products = load_products(products_path)
    judgments = load_judgments(judgments_path, relevant_threshold)
    unknown = judgments.frame.join(products, on="item_id", how="anti")
    if unknown.height:
        log.warning("%d judged pairs name products missing from %s; they are skipped",
                    unknown.height, products_path)
    methods: dict[str, Any] = {}
    details: dict[str, Any] = {}
    n_queries = 0
    for method, rankings in method_rankings(encoder, products, judgments, protocol,
                                            cache_path, steps, wanted).items():
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
        "methods": methods,
    }
    if per_query:
        report["per_query"] = details
    return report


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
