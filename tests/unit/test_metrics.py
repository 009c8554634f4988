from __future__ import annotations

import math

import pytest

from pipelines.offline.metrics import ndcg_at_k, recall_at_k, reciprocal_rank


def test_ndcg_perfect_ranking_is_one():
    assert ndcg_at_k(["a", "b", "c"], {"a": 2.0, "b": 1.0, "c": 0.0}) == pytest.approx(1.0)


def test_ndcg_swapped_pair_known_answer():
    # DCG = 1/log2(2) + 2/log2(3); IDCG = 2/log2(2) + 1/log2(3)
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "a"], {"a": 2.0, "b": 1.0}) == pytest.approx(expected)


def test_ndcg_counts_unretrieved_relevant_items_in_the_ideal():
    # one relevant item, retrieved at rank 2: 1/log2(3)
    assert ndcg_at_k(["x", "a"], {"a": 1.0}) == pytest.approx(1 / math.log2(3))
    # relevant item never retrieved
    assert ndcg_at_k(["x", "y"], {"a": 1.0}) == 0.0
    # two relevant, only one retrieved at rank 1: 1 / (1 + 1/log2(3))
    assert ndcg_at_k(["a"], {"a": 1.0, "b": 1.0}) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_ndcg_cuts_at_k():
    ranking = [f"x{i}" for i in range(10)] + ["a"]
    assert ndcg_at_k(ranking, {"a": 1.0}, k=10) == 0.0
    assert ndcg_at_k(ranking, {"a": 1.0}, k=11) == pytest.approx(1 / math.log2(12))


def test_ndcg_without_positive_gain_is_zero():
    assert ndcg_at_k(["a", "b"], {"a": 0.0}) == 0.0
    assert ndcg_at_k(["a"], {}) == 0.0


def test_recall_and_reciprocal_rank_known_answers():
    assert recall_at_k(["a", "b", "c"], {"a", "c", "z"}, k=2) == pytest.approx(1 / 3)
    assert recall_at_k(["a"], set(), k=10) == 0.0
    assert reciprocal_rank(["x", "y", "a"], {"a"}) == pytest.approx(1 / 3)
    assert reciprocal_rank(["x"], {"a"}) == 0.0
