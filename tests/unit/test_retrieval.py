"""The one retrieval path (serving.retrieval): the candidates' order on a tiny real bundle."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from pipelines.catalogue.index import write_bundle
from serving.encoder import DEFAULT_ENCODER_NAME
from serving.errors import FilterError
from serving.release import load_bundle
from serving.retrieval import Filters, StageTimer, retrieve_candidates

# item -> (angle from the query in degrees, price, in stock); rows are in id order a..f
ITEMS = {"a": (0, 50.0, True), "b": (45, 10.0, True), "c": (120, 10.0, True),
         "d": (100, 10.0, False), "e": (180, 10.0, True), "f": (20, 200.0, True)}
A, B, C, D, E, F = range(6)
QUERY = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
# relative BM25 scores per row, chosen by hand: c 1.0, f 0.9, d 0.8, a 0.5; b and e none
LEX = np.array([0.5, 0.0, 1.0, 0.8, 0.0, 0.9])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    ids = sorted(ITEMS)
    angles = np.radians([ITEMS[i][0] for i in ids])
    vectors = np.zeros((len(ids), 4), dtype=np.float32)
    vectors[:, 0], vectors[:, 1] = np.cos(angles), np.sin(angles)
    items = pl.DataFrame({
        "item_id": ids, "title": [f"item {i}" for i in ids],
        "description": [None] * len(ids), "category": [None] * len(ids),
        "brand": [None] * len(ids), "price": [ITEMS[i][1] for i in ids],
        "in_stock": [ITEMS[i][2] for i in ids], "content_hash": ids,
    }, schema_overrides={"description": pl.String, "category": pl.String, "brand": pl.String})
    encoder = SimpleNamespace(name=DEFAULT_ENCODER_NAME, revision="test", dim=4, max_length=16,
                              path=None)
    staged = write_bundle(items, vectors, tmp_path_factory.mktemp("rel") / "r1", "r1", encoder)
    return load_bundle(staged)


def test_dense_hits_come_first_nearest_first_then_new_lexical_hits_best_first(bundle):
    # dense top 2: a (0 deg), f (20 deg); lexical top 2: c (1.0), f (0.9, already there)
    assert retrieve_candidates(bundle, QUERY, LEX, 2) == [A, F, C]
    # dense top 3: a, f, b; lexical top 3: c, f, d
    assert retrieve_candidates(bundle, QUERY, LEX, 3) == [A, F, B, C, D]


def test_without_a_lexical_channel_the_dense_hits_alone(bundle):
    assert retrieve_candidates(bundle, QUERY, None, 4) == [A, F, B, D]


def test_items_the_lexical_channel_does_not_score_are_never_its_candidates(bundle):
    only_c = np.where(np.arange(6) == C, 1.0, 0.0)
    assert retrieve_candidates(bundle, QUERY, only_c, 1) == [A, C]
    assert retrieve_candidates(bundle, QUERY, np.zeros(6), 2) == [A, F]


def test_filters_apply_to_both_channels(bundle):
    cheap = Filters(max_price=100.0)       # f (200) goes from both channels
    assert retrieve_candidates(bundle, QUERY, LEX, 2, cheap) == [A, B, C, D]
    cheap_in_stock = Filters(max_price=100.0, in_stock=True)  # and d (out of stock)
    assert retrieve_candidates(bundle, QUERY, LEX, 2, cheap_in_stock) == [A, B, C]
    # nothing passes: no candidates at all
    assert retrieve_candidates(bundle, QUERY, LEX, 2, Filters(min_price=1000.0)) == []


@pytest.mark.parametrize("raw, field, message", [
    ({"max_price": 10**400}, "filters.max_price", "got an integer of 1329 bits"),
    ({"max_price": float("nan")}, "filters.max_price", "from 0 to 1e+12"),
    ({"min_price": -1}, "filters.min_price", "from 0 to 1e+12"),
    ({"in_stock": "yes"}, "filters.in_stock", "true or false"),
    ({"category": [""]}, "filters.category", "non-empty string"),
    ({"min_price": 5, "max_price": 1}, "filters.min_price", "above max_price"),
    ({"colour": "red"}, "filters.colour", "unknown filter field"),
    (["max_price"], "filters", "must be a mapping"),
])
def test_bad_filters_are_typed_errors_naming_the_field(raw, field, message):
    with pytest.raises(FilterError, match=re.escape(message)) as caught:
        Filters.parse(raw)
    assert caught.value.field == field


def test_the_timer_sees_the_filter_mask_the_ann_search_and_the_union(bundle):
    laps: dict[str, float] = {}
    retrieve_candidates(bundle, QUERY, LEX, 2, Filters(in_stock=True), StageTimer(laps))
    assert set(laps) == {"filters", "ann", "union"}
    laps.clear()
    retrieve_candidates(bundle, QUERY, None, 2, None, StageTimer(laps))
    assert set(laps) == {"ann"}
