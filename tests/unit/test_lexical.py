from __future__ import annotations

import math

import numpy as np
import pytest

from serving.lexical import LexicalIndex

DOCS = ["DeWalt cordless drill 20V", "Lodge cast iron skillet", "drill bit set for the drill",
        "the best skillet"]


def test_stemming_and_stop_words():
    ix = LexicalIndex.build(DOCS)
    assert ix.tokens("The Drills") == ["drill"]
    rows, scores = ix.search("cordless drills", 10)
    assert rows.tolist() == [0, 2] and scores[0] > scores[1] > 0


def test_known_bm25_score_for_a_single_term():
    # Lucene BM25 (as Lucene >= 8, without the constant (k1 + 1) factor):
    # idf = ln(1 + (N - df + 0.5) / (df + 0.5)); tf part = tf / (tf + k1 (1 - b + b dl / avgdl))
    ix = LexicalIndex.build(DOCS)
    lengths = [len(ix.tokens(d)) for d in DOCS]
    avgdl = sum(lengths) / len(lengths)
    idf = math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))
    tf, dl = 1, lengths[1]
    expected = idf * tf / (tf + 1.5 * (1 - 0.75 + 0.75 * dl / avgdl))
    assert ix.scores("skillet")[1] == pytest.approx(expected, rel=1e-5)


def test_unknown_terms_score_nothing_and_round_trip(tmp_path):
    ix = LexicalIndex.build(DOCS)
    assert not np.any(ix.scores("zzz qqq"))
    assert ix.search("zzz", 3)[0].size == 0
    ix.save(tmp_path)
    back = LexicalIndex.load(tmp_path)
    np.testing.assert_allclose(back.scores("cast iron"), ix.scores("cast iron"))


def test_coverage_of_rows_has_known_values():
    ix = LexicalIndex.build(DOCS)
    rows = np.array([3, 0, 2, 1])
    cover, n_terms = ix.coverage_rows("cordless drill skillet", rows)
    assert n_terms == 3
    np.testing.assert_array_equal(cover, np.array([1, 2, 1, 1], dtype=np.float32) / 3)
    # a repeated term counts twice, an unknown one counts in the denominator only
    cover, n_terms = ix.coverage_rows("drill drill zzz", np.array([0, 1, 2]))
    assert n_terms == 3
    np.testing.assert_array_equal(cover, np.array([2, 0, 2], dtype=np.float32) / 3)
    cover, n_terms = ix.coverage_rows("zzz", np.array([0, 1]))
    assert n_terms == 1 and not cover.any()


def test_coverage_of_rows_equals_the_whole_catalogue_coverage_on_real_titles(shared_data):
    """Postings of the candidate rows give exactly (bit for bit) what the whole-catalogue
    score vectors give, on 3,000 real Home Depot titles and 300 real queries."""
    import polars as pl

    titles = pl.read_parquet(shared_data / "homedepot" / "products.parquet")["title"].head(3000)
    queries = (pl.read_parquet(shared_data / "homedepot" / "judgments.parquet")["query"]
               .unique(maintain_order=True).head(300).to_list())
    ix = LexicalIndex.build(titles.to_list())
    rng = np.random.default_rng(0)
    matched = 0
    for query in queries:
        whole, n_terms = ix.coverage(query)
        # the best lexical rows (where matches are) plus random rows, unordered, repeated,
        # and both ends of the catalogue
        rows = np.concatenate([np.argsort(-whole, kind="stable")[:100],
                               rng.integers(0, len(titles), 100), [0, len(titles) - 1, 0]])
        rng.shuffle(rows)
        cover, n = ix.coverage_rows(query, rows)
        assert n == n_terms
        assert cover.dtype == whole.dtype
        np.testing.assert_array_equal(cover, whole[rows])
        matched += int((cover > 0).any())
    assert matched > 250  # the comparison is about real matches, not zeros
