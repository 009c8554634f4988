"""The ranker's relevance model: what the two channels and the query-item match say about
each candidate, learned from judged queries.

Two stages, as a search engine runs them:

1. **hybrid** (learned fusion): a ridge regression of judged gain on what the channels say
   per candidate (:func:`channel_features`). It orders the union of the dense and lexical
   candidates, and its top :data:`DEPTH` go on.
2. **ranker**: the same ridge plus, with enough training queries, gradient-boosted trees, over
   the channel features and :class:`MatchFeatures` (numbers and sizes, word pairs in order).
   It re-orders the hybrid's top :data:`DEPTH`; the rest stay below, in hybrid order
   (:func:`on_top`). Served, the trees run as :class:`CompiledTrees`.

``instantrec eval`` scores exactly these classes, cross-fitted over judged queries; serving
scores the live model's (:class:`RelevanceModel`, carried in the ranker checkpoint and trained
by the batch retrain) on the same features, computed by the same functions
(:func:`query_features`). The online ranker adds the session, per-item and (query, item)
terms on top (:mod:`serving.ranker`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.errors import ReleaseError

#: The hybrid's cut: the ranker re-orders this many of its best candidates.
DEPTH = 100
RRF_K = 60  # the usual reciprocal-rank-fusion constant
#: Fewer training queries than this and the ranker stays linear: on CrowdFlower's ~75
#: training queries per fold the trees overfit (re-rank nDCG@10 0.886 against 0.892 linear).
MIN_QUERIES_FOR_TREES = 1000
#: Bump when a feature changes meaning: a model trained on other features is refused.
FEATURES_VERSION = 1
#: A relevance score of one training standard deviation is worth this many logits online.
LOGIT_SCALE = 2.0
N_CHANNEL_FEATURES = 11
#: Columns of :func:`channel_features` that the zero-shot ranker fuses (cosine, BM25 / best).
COL_COS, COL_BM25_REL = 0, 2
N_MATCH_FEATURES = 3


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def minmax(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to [0, 1] by its own minimum and maximum (all zeros when they are equal)."""
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _ranks(x: np.ndarray) -> np.ndarray:
    """0-based rank of each entry of ``x`` (best = highest first)."""
    out = np.empty(len(x))
    out[np.argsort(-x, kind="stable")] = np.arange(len(x))
    return out


def channel_signals(cos: np.ndarray, bm25: np.ndarray, coverage: np.ndarray,
                    n_terms: int) -> dict[str, np.ndarray]:
    """Per-candidate signals of one query's candidates: dense cosine ``cos``, raw BM25
    ``bm25``, the share of the query's terms the item matches lexically ``coverage``, and
    query-level signals (how many terms, the best cosine and BM25 score any candidate gets)
    that let the fusion decide per query which channel to trust."""
    cos = np.asarray(cos, dtype=np.float64)
    bm25 = np.asarray(bm25, dtype=np.float64)
    max_bm25 = float(bm25.max()) if len(bm25) else 0.0
    max_cos = float(cos.max()) if len(cos) else 0.0
    n = len(cos)
    return {
        "cos": cos, "cos_gap": cos - max_cos, "bm25": bm25,
        "bm25_rel": bm25 / max_bm25 if max_bm25 > 0 else np.zeros(n),
        "coverage": np.asarray(coverage, dtype=np.float64),
        "q_terms": np.full(n, float(n_terms)),
        "max_cos": np.full(n, max_cos), "max_bm25": np.full(n, max_bm25),
    }


def channel_features(f: dict[str, np.ndarray]) -> np.ndarray:
    """What the two channels say about each candidate, for the learned fusion (``hybrid``).

    Scores on each channel's own scale and per-query normalised (min-max, as the plain fusion
    uses), reciprocal ranks (as RRF uses), and interactions that let the weights depend on
    the query: how far a candidate is from the best dense match, and how much of the query
    the lexical channel actually matched.
    """
    lexical_rank = np.where(f["bm25"] > 0, _ranks(f["bm25"]), 10 * DEPTH)
    return np.column_stack([
        f["cos"], f["cos_gap"], f["bm25_rel"], f["coverage"],
        f["bm25_rel"] * f["coverage"], f["bm25_rel"] * f["max_cos"], f["cos_gap"] * f["coverage"],
        minmax(f["cos"]), minmax(f["bm25"]),
        1.0 / (RRF_K + _ranks(f["cos"])), 1.0 / (RRF_K + lexical_rank),
    ])


_WORDS = re.compile(r"\w+")


class MatchFeatures:
    r"""Query-item evidence beyond the two channels' scores: the share of the query's numbers
    and sizes found in the item's title ("3/4", "18v", model numbers: the dense channel blurs
    them and BM25 weighs them like any word), the share of the query's adjacent word pairs
    found in order (phrase evidence BM25's bag of words ignores), and whether the query has
    numbers at all. Words are ``\w+`` runs of the case-folded title.

    :meth:`warm` analyses every title once into flat arrays of word and word-pair hashes (a
    few bytes a word: 10 MB for Home Depot's 54,667 titles, where per-item sets of strings
    took 165 MB), so a request looks its candidates up in numpy instead of analysing titles.
    Until then, or for more than ``max_items`` titles, each item is analysed on first use and
    kept (at most ``max_items``).

    The title's length was a feature too, until measured: it cost CrowdFlower's re-rank
    0.002 nDCG@10 (0.8911 against 0.8933 without)."""

    def __init__(self, titles: Sequence[str], max_items: int = 200_000) -> None:
        self._titles = titles
        self._items: dict[int, tuple[frozenset[str], frozenset[tuple[str, str]]]] = {}
        self._max_items = max_items
        # After warm(): per title, its word hashes words[word_ptr[i]:word_ptr[i + 1]] and
        # adjacent-pair hashes pairs[pair_ptr[i]:pair_ptr[i + 1]] (hash() of this process:
        # built and read in the same process, so no need for a stable hash).
        self._terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def warm(self) -> None:
        """Analyse every title now (about 15 us a title), unless there are more than
        ``max_items``; thread-safe to call while requests use the object."""
        if self._terms is not None or len(self._titles) > self._max_items:
            return
        words: list[int] = []
        pairs: list[int] = []
        word_ptr = np.zeros(len(self._titles) + 1, dtype=np.int64)
        pair_ptr = np.zeros(len(self._titles) + 1, dtype=np.int64)
        for i, title in enumerate(self._titles):
            w = _WORDS.findall(str(title).casefold())
            words.extend(map(hash, set(w)))
            pairs.extend(map(hash, set(zip(w, w[1:], strict=False))))
            word_ptr[i + 1], pair_ptr[i + 1] = len(words), len(pairs)
        self._terms = (np.asarray(words, dtype=np.int64), word_ptr,
                       np.asarray(pairs, dtype=np.int64), pair_ptr)

    def _item(self, row: int) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
        got = self._items.get(row)
        if got is None:
            words = _WORDS.findall(str(self._titles[row]).casefold())
            got = (frozenset(words), frozenset(zip(words, words[1:], strict=False)))
            if len(self._items) < self._max_items:
                self._items[row] = got
        return got

    def __call__(self, query: str, rows: np.ndarray) -> np.ndarray:
        words = _WORDS.findall(query.casefold())
        numbers = [w for w in words if any(ch.isdigit() for ch in w)]
        pairs = list(zip(words, words[1:], strict=False))
        out = np.zeros((len(rows), N_MATCH_FEATURES))
        out[:, 2] = float(bool(numbers))
        terms = self._terms
        if terms is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if numbers:
                out[:, 0] = _share_found(numbers, terms[0], terms[1], rows)
            if pairs:
                out[:, 1] = _share_found(pairs, terms[2], terms[3], rows)
            return out
        for i, row in enumerate(rows):
            item_words, item_pairs = self._item(int(row))
            if numbers:
                out[i, 0] = sum(w in item_words for w in numbers) / len(numbers)
            if pairs:
                out[i, 1] = sum(p in item_pairs for p in pairs) / len(pairs)
        return out


def _share_found(wanted: Sequence[Any], hashes: np.ndarray, ptr: np.ndarray,
                 rows: np.ndarray) -> np.ndarray:
    """Per row, the share of ``wanted`` (with repeats) whose hash is among the row's hashes
    ``hashes[ptr[row]:ptr[row + 1]]`` (each row's hashes are distinct)."""
    starts, lengths = ptr[rows], ptr[rows + 1] - ptr[rows]
    owner = np.repeat(np.arange(len(rows)), lengths)
    flat = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    held = hashes[flat + np.repeat(starts, lengths)]
    keys, counts = np.unique(np.fromiter(map(hash, wanted), dtype=np.int64, count=len(wanted)),
                             return_counts=True)
    pos = np.searchsorted(keys, held)
    hit = (pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == held)
    found = np.bincount(owner[hit], weights=counts[pos[hit]], minlength=len(rows))
    return found / len(wanted)


def query_features(signals: dict[str, np.ndarray], match: MatchFeatures, query: str,
                   rows: np.ndarray) -> np.ndarray:
    """The ranker's feature matrix of one query's candidates ``rows``: channel features,
    then match features. The first :data:`N_CHANNEL_FEATURES` columns are the hybrid's."""
    return np.hstack([channel_features(signals), match(query, rows)])


def hybrid_model(n_train_queries: int = 0) -> Any:
    """The learned fusion: a ridge regression of judged gain on :func:`channel_features`.
    Measured on the development queries, a linear model beat gradient-boosted trees here
    (which overfit CrowdFlower's 151 queries) and fixed convex weights."""
    from sklearn.linear_model import Ridge

    return Ridge(alpha=1.0)


@dataclass
class _Linear:
    coef: np.ndarray
    intercept: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef + self.intercept


def _ranker_stage(linear: _Linear, trees: CompiledTrees | None, X: np.ndarray) -> np.ndarray:
    """The ranker stage's score: ridge plus (when fitted) the trees."""
    out = linear.predict(X)
    return out if trees is None else out + trees.predict(X)


class RankerModel:
    """The ranker stage: a ridge regression over the channel and match features, plus
    gradient-boosted trees on the same features once there are enough training queries
    (:data:`MIN_QUERIES_FOR_TREES`). The trees capture non-linear evidence (a model number
    that matches, a phrase in order); the ridge keeps the ranking sane where the trees have
    little data."""

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
        self.fitted = _Linear(self.linear.coef_.copy(), float(self.linear.intercept_))
        self.compiled = None
        if self.trees is not None:
            self.compiled = CompiledTrees.from_sklearn(self.trees.fit(X, y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return _ranker_stage(self.fitted, self.compiled, X)


def on_top(score: np.ndarray, base: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """One query's ranker ``score`` re-ordering what retrieval (``base`` scores) returned:
    only the ``depth`` candidates with the best ``base`` keep their ``score``; the rest go
    below them, in ``base`` order. So the ranker's top ``depth`` holds the same items as the
    hybrid's (recall@depth is the same)."""
    if len(base) <= depth:
        return score
    top = np.zeros(len(base), dtype=bool)
    top[np.argsort(-base, kind="stable")[:depth]] = True
    below = score.min() - 1.0 - (base.max() - base)  # below every kept score, base order
    return np.where(top, score, below)


TREE_DEPTH = 3  # the ranker stage's trees (RankerModel); compiled to complete trees this deep
MAX_CODED_DEPTH = 4  # CompiledTrees packs a tree's node tests into 16 bits (15 inner nodes)


@dataclass
class CompiledTrees:
    """Gradient-boosted trees as plain arrays, evaluated for all trees at once.

    scikit-learn's ``HistGradientBoostingRegressor.predict`` walks its trees one Python call
    at a time, each an OpenMP region: measured on the Home Depot release, 18.9 ms p50 and
    458 ms p99 for 200 trees over ~180 candidates on a busy 2-core machine. Here every tree is
    padded to a complete binary tree of :data:`TREE_DEPTH` (a leaf above that depth routes
    all its rows left to copies of itself), every node's test runs at once, and the tests of
    a tree are packed into a code that a table maps to its leaf. Equal to scikit-learn's
    predictions (tested); features must not be NaN.
    """

    feature: np.ndarray    # (trees, 2**depth - 1) int
    threshold: np.ndarray  # (trees, 2**depth - 1): go left when x <= threshold
    leaf: np.ndarray       # (trees, 2**depth)
    baseline: float

    @classmethod
    def from_sklearn(cls, model: Any, depth: int = TREE_DEPTH) -> CompiledTrees:
        n_inner = 2 ** depth - 1
        # scikit-learn keeps a fitted HistGradientBoosting model's trees in the private
        # ``_predictors`` (a list per iteration of TreePredictor, each with a ``nodes`` record
        # array). Nothing public exposes them: check the layout, and name the version if it moved.
        predictors = getattr(model, "_predictors", None)
        if (not predictors or not hasattr(predictors[0][0], "nodes")
                or not {"feature_idx", "num_threshold", "left", "right", "is_leaf",
                        "is_categorical", "value"} <= set(predictors[0][0].nodes.dtype.names or ())):
            import sklearn

            raise TypeError(f"cannot compile the trees of scikit-learn {sklearn.__version__}: "
                            "its fitted gradient-boosting layout (_predictors) has changed")
        trees = [p[0].nodes for p in predictors]
        feature = np.zeros((len(trees), n_inner), dtype=np.int64)
        threshold = np.full((len(trees), n_inner), np.inf)
        leaf = np.zeros((len(trees), n_inner + 1))

        def fill(t: int, nodes: np.ndarray, node: int, pos: int, level: int) -> None:
            rec = nodes[node]
            if level == depth:
                if not rec["is_leaf"]:
                    raise ValueError(f"tree {t} is deeper than {depth}")
                leaf[t, pos - n_inner] = rec["value"]
                return
            if rec["is_leaf"]:  # threshold stays +inf: every row goes left, to this value
                fill(t, nodes, node, 2 * pos + 1, level + 1)
                fill(t, nodes, node, 2 * pos + 2, level + 1)
                return
            if rec["is_categorical"]:
                raise ValueError("categorical splits are not supported")
            feature[t, pos] = rec["feature_idx"]
            threshold[t, pos] = rec["num_threshold"]
            fill(t, nodes, int(rec["left"]), 2 * pos + 1, level + 1)
            fill(t, nodes, int(rec["right"]), 2 * pos + 2, level + 1)

        for t, nodes in enumerate(trees):
            fill(t, nodes, 0, 0, 0)
        return cls(feature, threshold, leaf, float(np.ravel(model._baseline_prediction)[0]))

    def __post_init__(self) -> None:
        n_trees, n_inner = self.feature.shape
        depth = int(np.log2(n_inner + 1))
        if 2 ** depth - 1 != n_inner or depth > MAX_CODED_DEPTH:
            raise ValueError(f"trees of {n_inner} inner nodes: expected complete trees of depth "
                             f"1..{MAX_CODED_DEPTH}")
        # node-major copies: one gather of the features' columns gives every node's test for
        # every row, each node's row of tests contiguous
        self._node_feature = np.ascontiguousarray(self.feature.T).ravel()
        self._node_threshold = np.ascontiguousarray(self.threshold.T).ravel()[:, None]
        # the leaf each pattern of the inner nodes' tests (bit i: node i goes right) reaches
        codes = np.arange(2 ** n_inner)
        pos = np.zeros_like(codes)
        for _ in range(depth):
            pos = 2 * pos + 1 + ((codes >> pos) & 1)
        self._leaf_of_code = (pos - n_inner).astype(np.intp)
        self._leaf_flat = self.leaf.ravel()
        self._tree_base = (np.arange(n_trees) * (n_inner + 1))[:, None]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The trees' summed leaves plus the baseline for the rows of ``X`` (rows, features).

        Every inner node's test is computed at once (one gather of ``X``'s columns by the
        nodes' features), packed into one code per (tree, row), and the code looked up in the
        table of the leaf it reaches: no per-level walk. Measured on the Home Depot bench
        release (200 trees, 180 candidates): 0.6 ms against 1.5 ms for a level-by-level
        descent with ``take_along_axis``."""
        n_trees, n_inner = self.feature.shape
        tests = np.ascontiguousarray(X.T)[self._node_feature] > self._node_threshold
        tests = tests.reshape(n_inner, n_trees, len(X)).view(np.uint8)
        code = tests[0].astype(np.uint16)
        for node in range(1, n_inner):
            code |= tests[node].astype(np.uint16) << node
        leaves = self._leaf_flat[self._tree_base + self._leaf_of_code[code]]  # (trees, rows)
        return leaves.sum(axis=0) + self.baseline


class RelevanceModel:
    """Hybrid and ranker stages fitted on judged queries, scored in logit units.

    :meth:`fit` takes each training query's feature matrix (:func:`query_features`) and
    judged gains (0 for unjudged candidates); :meth:`score` gives one query's candidates a
    relevance in logits: the ranker's prediction over its training spread times
    :data:`LOGIT_SCALE` for the hybrid's top :data:`DEPTH`, below them the rest.
    """

    def __init__(self, hybrid: _Linear, linear: _Linear, trees: CompiledTrees | None,
                 spread: float, meta: dict[str, Any]) -> None:
        self.hybrid = hybrid
        self.linear = linear
        self.trees = trees
        self.spread = spread
        self.meta = meta

    @classmethod
    def fit(cls, features: Sequence[np.ndarray], gains: Sequence[np.ndarray],
            **meta: Any) -> RelevanceModel:
        if not features:
            raise ValueError("a relevance model needs at least one judged query")
        X = np.vstack(features)
        y = np.concatenate(gains)
        if X.shape[1] != N_CHANNEL_FEATURES + N_MATCH_FEATURES:
            raise ValueError(f"expected {N_CHANNEL_FEATURES + N_MATCH_FEATURES} features, "
                             f"got {X.shape[1]}")
        hybrid = hybrid_model().fit(X[:, :N_CHANNEL_FEATURES], y)
        ranker = RankerModel(len(features)).fit(X, y)
        spread = float(np.std(ranker.predict(X))) or 1.0
        trees = ranker.compiled
        return cls(_Linear(hybrid.coef_.copy(), float(hybrid.intercept_)), ranker.fitted,
                   trees, spread,
                   {**meta, "queries": len(features), "examples": int(len(y)),
                    "features_version": FEATURES_VERSION, "trees": trees is not None})

    def hybrid_score(self, X: np.ndarray) -> np.ndarray:
        return self.hybrid.predict(X[:, :N_CHANNEL_FEATURES])

    def ranker_score(self, X: np.ndarray) -> np.ndarray:
        return _ranker_stage(self.linear, self.trees, X)

    def score(self, X: np.ndarray, depth: int = DEPTH) -> np.ndarray:
        """Relevance of one query's candidates (rows of ``X``), in logits."""
        if not len(X):
            return np.zeros(0)
        ranked = on_top(self.ranker_score(X), self.hybrid_score(X), depth)
        return LOGIT_SCALE * ranked / self.spread

    # -- persistence (inside a ranker checkpoint: plain arrays, allow_pickle=False) ------

    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = {**self.meta, "spread": self.spread}
        out = {"rel_hybrid": np.append(self.hybrid.coef, self.hybrid.intercept),
               "rel_linear": np.append(self.linear.coef, self.linear.intercept)}
        if self.trees is not None:
            meta["trees_baseline"] = self.trees.baseline
            out.update({"rel_tree_feature": self.trees.feature,
                        "rel_tree_threshold": self.trees.threshold,
                        "rel_tree_leaf": self.trees.leaf})
        meta["sha256"] = _digest(out)
        return {"rel_meta": np.array(json.dumps(meta, sort_keys=True)), **out}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RelevanceModel | None:
        if "rel_meta" not in arrays:
            return None
        meta = json.loads(str(arrays["rel_meta"]))
        if meta.get("features_version") != FEATURES_VERSION:
            raise ReleaseError(f"relevance model has features version "
                               f"{meta.get('features_version')}, serving computes "
                               f"{FEATURES_VERSION}: retrain the ranker")
        own = {k: v for k, v in arrays.items() if k.startswith("rel_") and k != "rel_meta"}
        if _digest(own) != meta.pop("sha256", None):
            raise ReleaseError("relevance model arrays do not match their checksum")
        trees = None
        if "rel_tree_leaf" in own:
            trees = CompiledTrees(own["rel_tree_feature"].astype(np.int64),
                                  own["rel_tree_threshold"], own["rel_tree_leaf"],
                                  float(meta.pop("trees_baseline")))
        h, lin = arrays["rel_hybrid"], arrays["rel_linear"]
        spread = float(meta.pop("spread"))
        return cls(_Linear(h[:-1].copy(), float(h[-1])), _Linear(lin[:-1].copy(), float(lin[-1])),
                   trees, spread, meta)
