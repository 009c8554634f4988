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
