"""Candidates and their features, as a request retrieves them; the one retrieval path.

Serving (:class:`serving.recommender.Recommender`), the nearline updater, the batch retrain,
the serving benchmark and ``instantrec eval --protocol retrieval`` all retrieve through
:func:`retrieve_candidates` (Annoy + BM25, the dense channel's hits first, then the lexical
channel's that the dense channel did not bring) and compute the relevance model's features
with :func:`relevance_features`, so the quality figures reported offline are those of the
served path. Also here: query understanding as a request applies it (:func:`understood`),
business filters (:class:`Filters`), the per-release BM25 cache (:class:`LexicalCache`), the
per-query relevance scores outside a request (:class:`QueryRelevance`) and the stage timer.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.cache import LRUCache
from serving.encoder import Encoder
from serving.errors import FilterError, short_repr
from serving.query import NEEDS_VOCABULARY, Step, Vocabulary, understand_query
from serving.release import Bundle
from serving.relevance import MatchFeatures, RelevanceModel, channel_signals, query_features


class StageTimer:
    """Wall time of one request's stages (:meth:`serving.recommender.Recommender.recommend` with ``timings``):
    each :meth:`lap` adds the seconds since the previous lap (or since the timer started) to
    the named stage of ``out``. Stages that did not run are absent."""

    __slots__ = ("_last", "out")

    def __init__(self, out: dict[str, float]) -> None:
        self.out = out
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.out[stage] = self.out.get(stage, 0.0) + (now - self._last)
        self._last = now


class NoTimer:
    """What a request without ``timings`` laps on: nothing is measured."""

    __slots__ = ()

    def lap(self, stage: str) -> None:
        pass


NO_TIMER = NoTimer()
#: The stages :meth:`serving.recommender.Recommender.recommend` reports, in request order.
STAGES = ("parse", "understand", "encode", "session", "bm25", "filters", "ann", "union",
          "candidates_cached", "vectors", "features", "relevance", "ranker", "results")

# Largest price a filter may name (any real price is far below; past it a float loses cents).
MAX_PRICE = 1e12


@dataclass(frozen=True)
class Filters:
    """Business filters. ``categories`` matches exactly (any of); prices are inclusive."""

    categories: frozenset[str] | None = None
    min_price: float | None = None
    max_price: float | None = None
    in_stock: bool | None = None

    FIELDS = ("category", "min_price", "max_price", "in_stock")

    @classmethod
    def parse(cls, raw: Filters | Mapping[str, Any] | None) -> Filters | None:
        """Validate a filter mapping; raises :class:`FilterError` naming the bad field."""
        if raw is None or isinstance(raw, Filters):
            return raw
        if not isinstance(raw, Mapping):
            raise FilterError(f"filters must be a mapping, got {type(raw).__name__}", "filters")
        unknown = sorted(set(raw) - set(cls.FIELDS))
        if unknown:
            raise FilterError(
                f"unknown filter field(s) {unknown}; known fields are {list(cls.FIELDS)}",
                f"filters.{unknown[0]}")
        cats = raw.get("category")
        if cats is not None:
            cats = [cats] if isinstance(cats, str) else cats
            if not isinstance(cats, list | tuple | set | frozenset) or not all(
                isinstance(c, str) and c for c in cats
            ):
                raise FilterError("filter 'category' must be a non-empty string or list of them",
                                  "filters.category")
            cats = frozenset(cats)
        prices = {}
        for name in ("min_price", "max_price"):
            value = raw.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or not (
                        0 <= value <= MAX_PRICE):  # NaN fails too; a huge int never meets float
                    raise FilterError(f"filter '{name}' must be a number from 0 to {MAX_PRICE:g}, "
                                      f"got {short_repr(value)}", f"filters.{name}")
                prices[name] = float(value)
        if prices.get("min_price", 0.0) > prices.get("max_price", float("inf")):
            raise FilterError(
                f"filter min_price {prices['min_price']} is above max_price {prices['max_price']}",
                "filters.min_price")
        stock = raw.get("in_stock")
        if stock is not None and not isinstance(stock, bool):
            raise FilterError(f"filter 'in_stock' must be true or false, got {short_repr(stock)}",
                              "filters.in_stock")
        return cls(categories=cats, in_stock=stock, **prices)

    def mask(self, bundle: Bundle) -> np.ndarray:
        """Per row of ``bundle``'s items, whether the item passes every filter (bool array)."""
        items = bundle.items
        keep = np.ones(len(items), dtype=bool)
        if self.categories is not None:
            keep &= np.isin(items.categories, list(self.categories))
        if self.min_price is not None:
            keep &= items.prices >= self.min_price  # NaN (unknown price) fails both bounds
        if self.max_price is not None:
            keep &= items.prices <= self.max_price
        if self.in_stock is not None:
            keep &= items.in_stock == self.in_stock
        return keep


def understood(text: str | None, steps: tuple[Step, ...],
               vocabulary: Vocabulary | None) -> tuple[str | None, str | None]:
    """A normalised query as the dense and the lexical channel read it (query understanding;
    the steps that need the catalogue's vocabulary are skipped without one). Units and
    dimensions are also applied by the lexical index itself."""
    if text is None:
        return None, None
    if vocabulary is None:
        steps = tuple(s for s in steps if s not in NEEDS_VOCABULARY)
    if not steps:
        return text, text
    return (understand_query(text, steps, vocabulary, channel="dense"),
            understand_query(text, steps, vocabulary))


def release_vocabulary(bundle: Bundle, steps: tuple[Step, ...],
                       warm: bool = True) -> Vocabulary | None:
    """The catalogue's words for spelling and compounds, when ``steps`` need them."""
    if bundle.lexical is None or not bundle.lexical.words or not NEEDS_VOCABULARY & set(steps):
        return None
    vocabulary = Vocabulary(bundle.lexical.words, stem=bundle.lexical.stem)
    if warm:
        vocabulary.warm()
    return vocabulary


class LexicalCache:
    """Per release, for recent queries: relative BM25 scores (each query's scores over its
    best score, in [0, 1]) with that best score; bounded, thread-safe. The share of the
    query's terms an item matches (for the relevance model) is read per request for the
    candidates only (:meth:`coverage_of`)."""

    def __init__(self, size: int = 128) -> None:
        self._cache: LRUCache[tuple[np.ndarray, float]] = LRUCache(size)

    def relative(self, bundle: Bundle, text: str) -> np.ndarray | None:
        got = self.scored(bundle, text)
        return got[0] if got is not None else None

    def scored(self, bundle: Bundle, text: str) -> tuple[np.ndarray, float] | None:
        """Relative scores and the best raw score (raw = relative * best)."""
        if bundle.lexical is None:
            return None
        return self._cache.get_or_compute((bundle.release_id, text),
                                          lambda: _scored(bundle, text))

    def coverage_of(self, bundle: Bundle, text: str,
                    rows: np.ndarray) -> tuple[np.ndarray, int] | None:
        """The share of ``text``'s terms each of ``rows`` matches, and the number of terms
        (:meth:`serving.lexical.LexicalIndex.coverage_rows`: from the terms' postings, the
        same values as the whole-catalogue :meth:`~serving.lexical.LexicalIndex.coverage`)."""
        if bundle.lexical is None:
            return None
        return bundle.lexical.coverage_rows(text, rows)


def _scored(bundle: Bundle, text: str) -> tuple[np.ndarray, float]:
    scores = bundle.lexical.scores(text)
    top = float(scores.max()) if len(scores) else 0.0
    rel = scores / top if top > 0 else scores
    rel.setflags(write=False)
    return rel, top


def relevance_scores(bundle: Bundle, model: RelevanceModel, match: MatchFeatures,
                     lexical: LexicalCache, text: str | None, lexical_text: str | None,
                     qvec: np.ndarray, rows: np.ndarray,
                     vectors: np.ndarray | None = None) -> np.ndarray:
    """The relevance model's logits for candidates ``rows`` of a query (normalised ``text``,
    its lexical rewrite ``lexical_text`` and the vector of its dense rewrite ``qvec``)."""
    return model.score(relevance_features(bundle, match, lexical, text, lexical_text, qvec,
                                          rows, vectors))


def relevance_features(bundle: Bundle, match: MatchFeatures, lexical: LexicalCache,
                       text: str | None, lexical_text: str | None, qvec: np.ndarray,
                       rows: np.ndarray, vectors: np.ndarray | None = None) -> np.ndarray:
    """The relevance model's features of candidates ``rows`` of a query, from this release's
    vectors, BM25 index and titles, computed by the functions ``instantrec eval`` uses.
    ``vectors``: the candidates' vectors as float64 (``bundle.vectors[rows]``), if the
    caller has them already."""
    return query_features(channel_values(bundle, lexical, lexical_text, qvec, rows, vectors),
                          match, text or "", rows)


def channel_values(bundle: Bundle, lexical: LexicalCache, lexical_text: str | None,
                   qvec: np.ndarray, rows: np.ndarray,
                   vectors: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each channel's signals (:func:`serving.relevance.channel_signals`: cosine, raw BM25,
    term coverage, query-level figures) for candidates ``rows`` (bundle rows) of a query
    whose lexical rewrite is ``lexical_text`` (None: no lexical channel, BM25 and coverage
    0) and whose dense vector is ``qvec``. ``vectors``: the candidates' vectors as float64,
    if the caller has them already."""
    if vectors is None:
        vectors = np.asarray(bundle.vectors[rows], dtype=np.float64)
    cos = vectors @ np.asarray(qvec, np.float64)
    bm25 = np.zeros(len(rows))
    cover, n_terms = np.zeros(len(rows)), 0
    scored = lexical.scored(bundle, lexical_text) if lexical_text is not None else None
    if scored is not None:
        bm25 = scored[0][rows].astype(np.float64) * scored[1]
        cover, n_terms = lexical.coverage_of(bundle, lexical_text, rows)
    return channel_signals(cos, bm25, cover, n_terms)


def retrieve_candidates(bundle: Bundle, vec: np.ndarray, lex: np.ndarray | None, depth: int,
                        filters: Filters | None = None,
                        watch: StageTimer | NoTimer = NO_TIMER) -> list[int]:
    """A request's candidates (bundle rows): the dense channel's ``depth`` nearest allowed
    items, nearest first, then the lexical channel's ``depth`` best that the dense channel did
    not bring, best first. ``vec``: the (unit) vector to search with; ``lex``: each item's
    relative BM25 score for the query (:meth:`LexicalCache.relative`; None: no lexical
    channel), items scoring 0 are never lexical candidates; ``filters``: only the items they
    allow. ``watch`` times the filter mask (computed once for both channels), the ANN search
    and the union."""
    mask = filters.mask(bundle) if filters is not None else None
    if mask is not None:
        watch.lap("filters")
    found, _ = _search(bundle, vec, depth, mask)
    watch.lap("ann")
    if lex is None:
        return found
    out = _union(found, _lexical_top(lex, depth, mask))
    watch.lap("union")
    return out


def _lexical_top(rel: np.ndarray, depth: int, mask: np.ndarray | None) -> list[int]:
    """The lexical channel's candidates: the ``depth`` best-scoring items ``mask`` allows."""
    if mask is not None:
        rel = np.where(mask, rel, 0.0)
    depth = min(depth, len(rel))
    top = np.argpartition(-rel, depth - 1)[:depth]
    return [int(r) for r in top[np.argsort(-rel[top], kind="stable")] if rel[r] > 0]


def _union(first: list[int], second: list[int]) -> list[int]:
    seen = set(first)
    return first + [r for r in second if r not in seen]


def _search(bundle: Bundle, qvec: np.ndarray, k: int,
            mask: np.ndarray | None) -> tuple[list[int], list[float]]:
    """ANN search with over-fetch under a filter ``mask`` (allowed rows); exact search over
    the allowed subset when it is too selective for over-fetching to fill ``k``."""
    n = len(bundle.items)
    allowed = n if mask is None else int(mask.sum())
    want = min(k, allowed)
    if want == 0:
        return [], []
    fetch = min(n, k if mask is None else 4 * k)
    while True:
        rows, sims = bundle.index.nearest(qvec, fetch)
        if mask is not None:
            kept = [(r, sim) for r, sim in zip(rows, sims, strict=True) if mask[r]]
        else:
            kept = list(zip(rows, sims, strict=True))
        if len(kept) >= want:
            kept = kept[:want]
            return [r for r, _ in kept], [sim for _, sim in kept]
        if fetch >= n or fetch >= 64 * k:
            break
        fetch = min(n, fetch * 4)
    idx = np.flatnonzero(mask) if mask is not None else np.arange(n)
    sims = np.asarray(bundle.vectors[idx] @ qvec)
    top = np.argsort(-sims, kind="stable")[:want]
    return [int(idx[i]) for i in top], [float(sims[i]) for i in top]


class QueryRelevance:
    """Relevance scores (:mod:`serving.relevance`) outside a request, for the nearline
    updater's and the batch retrain's examples: a query's candidates are what serving
    retrieves for it as a plain query (plus the item asked about, if it is not among them),
    scored on the features serving computes. Kept per (model, query); bounded.

    ``steps``: the query-understanding steps serving applies; ``depth``: serving's retrieval
    depth (``Settings.candidates``); ``size``: how many (model, query) entries are kept."""

    def __init__(self, bundle: Bundle, encoder: Encoder, steps: tuple[Step, ...],
                 depth: int, size: int = 4096) -> None:
        self.bundle, self.encoder, self.steps, self.depth = bundle, encoder, steps, depth
        self.match = MatchFeatures(bundle.items.titles)
        self.lexical = LexicalCache()
        self._vocabulary: Vocabulary | None = None
        self._vocabulary_built = False
        self._size = size
        # keyed by the model object itself (identity hash): a key keeps its model alive
        self._cache: OrderedDict[tuple[RelevanceModel, str], dict[int, float]] = OrderedDict()

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Item id -> row in the bundle."""
        return {i: r for r, i in enumerate(self.bundle.items.item_ids.tolist())}

    def _understood(self, text: str) -> tuple[str | None, str | None]:
        if not self._vocabulary_built:
            self._vocabulary = release_vocabulary(self.bundle, self.steps, warm=False)
            self._vocabulary_built = True
        return understood(text, self.steps, self._vocabulary)

    def candidates(self, text: str) -> tuple[list[int], str | None, str | None, np.ndarray]:
        """A plain query's candidates, its two rewrites and its dense vector (``text``: the
        normalised query)."""
        dense_text, lexical_text = self._understood(text)
        qvec = self.encoder.encode_query(dense_text).astype(np.float64)
        lex = self.lexical.relative(self.bundle, lexical_text)
        return (retrieve_candidates(self.bundle, qvec, lex, self.depth), dense_text,
                lexical_text, qvec)

    def features(self, text: str, rows: list[int] | None = None) -> tuple[list[int], np.ndarray]:
        """Candidate rows of ``text`` (with ``rows`` appended when missing) and features."""
        found, _, lexical_text, qvec = self.candidates(text)
        known = set(found)
        extra = [r for r in (rows or []) if r not in known]
        rows_out = found + extra
        return rows_out, relevance_features(self.bundle, self.match, self.lexical, text,
                                            lexical_text, qvec, np.asarray(rows_out))

    def __call__(self, model: RelevanceModel, text: str, row: int) -> float:
        """``model``'s logit for bundle row ``row`` as a candidate of query ``text``."""
        key = (model, text)
        got = self._cache.get(key)
        if got is None or row not in got:
            rows, X = self.features(text, [row])
            got = dict(zip(rows, model.score(X).tolist(), strict=True))
            self._cache[key] = got
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return got[row]
