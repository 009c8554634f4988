"""The learned methods of `instantrec eval`: cross-fitting never scores a query with a model
that saw it, and the feature builders say what they claim."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipelines.offline.evaluation import Candidates, cross_fit
from pipelines.offline.judged import Judgments
from serving.relevance import MatchFeatures, RankerModel, channel_features


class Memoriser:
    """A model that remembers every training row's target exactly and knows nothing else:
    any leak of a query into its own model would show as a perfect score."""

    def __init__(self, n_train_queries: int) -> None:
        self.n_train_queries = n_train_queries

    def fit(self, X, y):
        self.seen = {float(x[0]): t for x, t in zip(X, y, strict=True)}
        return self

    def predict(self, X):
        return np.array([self.seen.get(float(x[0]), 0.0) for x in X])


def toy(n_queries=12, per_query=5):
    rows, features, records = {}, {}, []
    for q in range(n_queries):
        rows[q] = np.arange(per_query) + q * per_query
        features[q] = rows[q].astype(float)[:, None]   # a unique key per (query, item)
        for r in rows[q]:
            records.append((q, f"query {q}", f"item{r}", float(1 + r % 3)))
    frame = pl.DataFrame(records, schema=["query_id", "query", "item_id", "relevance"],
                         orient="row")
    ids = [f"item{r}" for r in range(n_queries * per_query)]
    return Candidates(rows, {}, {}), ids, Judgments(frame, 1.0, 3.0), features


def test_cross_fitting_never_scores_a_query_with_a_model_that_saw_it():
    c, ids, judgments, features = toy()
    seen_sizes = []

    def make(n):
        seen_sizes.append(n)
        return Memoriser(n)

    scores = cross_fit(c, ids, judgments, features, make, folds=3, repeats=2)
    assert set(scores) == set(c.rows)
    assert all(np.all(s == 0.0) for s in scores.values())   # nothing memorised leaked
    assert len(seen_sizes) == 6 and all(0 < n < 12 for n in seen_sizes)


def test_a_query_no_split_can_score_is_left_out():
    c, ids, judgments, features = toy(n_queries=1)
    assert cross_fit(c, ids, judgments, features, Memoriser, folds=2, repeats=1) == {}


@pytest.mark.parametrize("warm", [False, True], ids=["analysed-on-first-use", "warmed"])
def test_match_features_count_numbers_and_phrases(warm):
    match = MatchFeatures(["Ryobi 18v cordless drill 1/2 in.", "cordless hammer drill", "drill",
                           "2 x 4 stud, 2 pack"])
    if warm:
        match.warm()
    out = match("18v cordless drill", np.array([0, 1, 2]))
    assert out[:, 0].tolist() == [1.0, 0.0, 0.0]          # the number 18v
    assert out[:, 1].tolist() == [1.0, 0.0, 0.0]          # "18v cordless", "cordless drill"
    assert out[:, 2].tolist() == [1.0, 1.0, 1.0]          # the query has a number
    assert match("drill", np.array([0]))[0].tolist() == [0.0, 0.0, 0.0]
    assert match("hammer drill", np.array([1]))[0, :2].tolist() == [0.0, 1.0]
    # repeats count each time; a title's repeated words count once; rows may repeat
    out = match("2 x 4 2 pack", np.array([3, 0, 3]))
    # "2", "4", "2": all in row 3; row 0 holds "2" (of "1/2"), twice over 3
    assert out[:, 0].tolist() == pytest.approx([1.0, 2 / 3, 1.0])
    assert out[:, 1].tolist() == [0.75, 0.0, 0.75]        # "2 x", "x 4", "4 2" missing, "2 pack"
    assert match("", np.array([0, 1])).tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert match("drill", np.array([], dtype=np.int64)).shape == (0, 3)


def test_channel_features_include_the_plain_fusion_inputs_and_ranks():
    f = {"cos": np.array([0.9, 0.5, 0.7]), "bm25": np.array([0.0, 4.0, 2.0])}
    f["cos_gap"] = f["cos"] - 0.9
    f["bm25_rel"] = f["bm25"] / 4.0
    f.update(coverage=np.array([0.0, 1.0, 0.5]), max_cos=np.full(3, 0.9))
    X = channel_features(f)
    assert X.shape == (3, 11)
    assert np.allclose(X[:, 7], [1.0, 0.0, 0.5]) and np.allclose(X[:, 8], [0.0, 1.0, 0.5])
    assert np.allclose(X[:, 9], [1 / 60, 1 / 62, 1 / 61])   # dense reciprocal ranks
    assert X[0, 10] < X[2, 10] < X[1, 10]                   # no BM25 match ranks last


def test_the_ranker_uses_trees_only_with_enough_training_queries():
    assert RankerModel(50).trees is None
    assert RankerModel(5000).trees is not None
    X = np.random.default_rng(0).normal(size=(200, 3))
    y = X[:, 0] * 2.0
    pred = RankerModel(50).fit(X, y).predict(X)
    assert np.corrcoef(pred, y)[0, 1] > 0.99


def test_the_ranker_only_reorders_what_the_hybrid_retrieved():
    from pipelines.offline.evaluation import on_top_all as on_top

    hybrid = {1: np.array([0.9, 0.1, 0.5, 0.7, 0.3]), 2: np.array([0.2, 0.4])}
    ranker = {1: np.array([0.0, 9.0, 1.0, 2.0, 8.0]), 2: np.array([5.0, 1.0])}
    out = on_top(ranker, hybrid, depth=3)
    # hybrid's top 3 of query 1 are rows 0, 3, 2: the ranker orders them (3, 2, 0) ...
    assert list(np.argsort(-out[1], kind="stable")) == [3, 2, 0, 4, 1]
    # ... and rows 4 and 1 stay below, in hybrid order, despite the ranker liking them
    np.testing.assert_array_equal(out[2], ranker[2])  # fewer candidates than depth: untouched


def test_the_served_bundle_holds_products_sorted_by_id_and_maps_its_rows_back():
    from pipelines.offline.evaluation import judged_items, product_texts

    products = pl.DataFrame({"item_id": ["10", "9", "2"],
                             "title": ["Drill <b>10</b>", "saw", "hammer"],
                             "description": ["", "a saw", None]})
    items, product_rows = judged_items(products)
    # a bundle sorts its items by id (as strings): "10" < "2" < "9"
    assert items["item_id"].to_list() == ["10", "2", "9"]
    assert product_rows.tolist() == [0, 2, 1]
    assert items["title"].to_list() == ["Drill 10", "hammer", "saw"]   # cleaned, as embedded
    assert items["description"].to_list() == [None, None, "a saw"]
    assert items["in_stock"].to_list() == [True] * 3
    assert items["price"].null_count() == 3
    # the same text a product's vector is computed from, row for row
    from serving.text import item_text

    texts = product_texts(products)
    assert [item_text(t, b, c, d) for t, b, c, d in items.select(
        "title", "brand", "category", "description").iter_rows()] == [texts[r] for r in
                                                                      product_rows]
