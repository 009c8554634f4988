from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipelines.index import exact_top_k, recall_at_k, release_id_for, tune_index


def unit_rows(n, dim, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_top_k_known_answer():
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    assert exact_top_k(vectors, np.array([[1, 0]], dtype=np.float32), 2).tolist() == [[0, 2]]


def test_recall_known_answer():
    assert recall_at_k([[0, 1], [5, 6]], np.array([[0, 2], [5, 6]])) == pytest.approx(0.75)


def test_tuning_reaches_the_recall_target_and_records_the_grid():
    vectors = unit_rows(2000, 32)
    index, choice = tune_index(vectors, seed=7, target=0.95)
    assert choice.recall_at_10 >= 0.95
    assert index.get_n_items() == 2000
    assert choice.tuning[-1]["search_k"] == choice.search_k
    # the default search_k (n_trees * k) is the first point tried and misses the target here
    assert choice.tuning[0]["recall_at_10"] < 0.95


def test_release_id_is_deterministic_and_input_sensitive():
    items = pl.DataFrame({"item_id": ["a", "b"], "content_hash": ["h1", "h2"],
                          "price": [1.0, 2.0], "in_stock": [True, False]})
    rid = release_id_for(items, "enc@1", 42, 0.95)
    assert rid == release_id_for(items, "enc@1", 42, 0.95)
    assert rid != release_id_for(items.with_columns(pl.lit(3.0).alias("price")), "enc@1", 42, 0.95)
    assert rid != release_id_for(items, "enc@2", 42, 0.95)


def test_vector_matrix_converts_list_columns_in_one_block_and_names_ragged_input():
    from pipelines.embed import vector_matrix

    column = pl.Series("vector", [[1.0, 2.0], [3.0, 4.5]], dtype=pl.List(pl.Float32))
    out = vector_matrix(column)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, [[1.0, 2.0], [3.0, 4.5]])
    with pytest.raises(ValueError, match="unequal length"):
        vector_matrix(pl.Series("vector", [[1.0, 2.0], [3.0]], dtype=pl.List(pl.Float32)))
