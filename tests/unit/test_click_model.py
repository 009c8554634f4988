from __future__ import annotations

import random

import polars as pl
import pytest

from pipelines.offline.judged import Judgments
from pipelines.offline.simulate import ClickModel, Feedback, seen_bucket, split_queries


def test_examination_decays_with_rank_as_one_over_rank_to_the_eta():
    model = ClickModel()
    assert model.examination(1) == 1.0
    assert model.examination(2) == pytest.approx(0.5)
    assert model.examination(4) == pytest.approx(0.25)
    assert ClickModel(eta=2.0).examination(2) == pytest.approx(0.25)
    assert ClickModel(eta=0.5).examination(4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1-based"):
        model.examination(0)


def test_attraction_rises_with_the_label_from_eps_to_one():
    model = ClickModel(eps=0.02, max_gain=3.0)
    # (2**g - 1) / (2**3 - 1): 0, 1/7, 3/7, 1
    assert model.attraction(0.0) == pytest.approx(0.02)
    assert model.attraction(1.0) == pytest.approx(0.02 + 0.98 / 7)
    assert model.attraction(2.0) == pytest.approx(0.02 + 0.98 * 3 / 7)
    assert model.attraction(3.0) == pytest.approx(1.0)
    # gains outside the label scale are clipped to it
    assert model.attraction(-1.0) == pytest.approx(0.02)
    assert model.attraction(5.0) == pytest.approx(1.0)
    # an averaged label between two grades
    assert model.attraction(1.5) == pytest.approx(0.02 + 0.98 * (2 ** 1.5 - 1) / 7)
    assert model.click_probability(2, 3.0) == pytest.approx(0.5)
    assert model.click_probability(4, 0.0) == pytest.approx(0.005)


def test_cart_and_purchase_rise_with_the_label():
    model = ClickModel(max_gain=3.0, cart_max=0.5, purchase_max=0.4)
    assert model.cart_probability(0.0) == 0.0
    assert model.cart_probability(2.0) == pytest.approx(0.5 * 3 / 7)
    assert model.cart_probability(3.0) == pytest.approx(0.5)
    assert model.purchase_probability(0.0) == 0.0
    assert model.purchase_probability(3.0) == pytest.approx(0.4)


def test_the_label_scale_comes_from_the_judgments():
    frame = pl.DataFrame({"query_id": [1, 1, 1], "query": ["q"] * 3, "item_id": ["a", "b", "c"],
                          "relevance": [1.0, 2.5, 4.0]})
    judged = Judgments(frame, min_label=1.0, relevant_threshold=3.0)
    assert ClickModel.for_judgments(judged).max_gain == 3.0
    assert ClickModel.for_judgments(judged, eps=0.1).eps == 0.1


@pytest.mark.parametrize("params, field", [({"eta": 0.0}, "eta"), ({"eps": 1.0}, "eps"),
                                           ({"eps": -0.1}, "eps"), ({"max_gain": 0.0}, "max_gain"),
                                           ({"cart_max": 1.5}, "cart_max"),
                                           ({"purchase_max": -0.5}, "purchase_max")])
def test_bad_parameters_are_refused_by_name(params, field):
    with pytest.raises(ValueError, match=field):
        ClickModel(**params)


def test_sampling_is_deterministic_for_a_seed():
    model = ClickModel()
    gains = [3.0, 0.0, 2.0, 1.0, 3.0, 0.0, 3.0, 2.0, 0.0, 3.0]
    first = [model.sample(gains, rng) for rng in [random.Random(7)] for _ in range(200)]
    again = [model.sample(gains, rng) for rng in [random.Random(7)] for _ in range(200)]
    other = [model.sample(gains, rng) for rng in [random.Random(8)] for _ in range(200)]
    assert first == again
    assert first != other


def test_sampling_limits():
    # a perfect result at rank 1 is always examined and clicked; with eps 0 nothing
    # irrelevant ever is, and no cart without a click-worthy label
    model = ClickModel(eps=0.0, cart_max=1.0, purchase_max=1.0)
    rng = random.Random(0)
    for _ in range(100):
        assert model.sample([3.0, 0.0, 0.0], rng) == [Feedback(1, True, True)]
        assert model.sample([0.0] * 10, rng) == []
    assert ClickModel().sample([], rng) == []


def test_sampled_rates_match_the_probabilities():
    model = ClickModel()
    rng = random.Random(1)
    n = 20_000
    clicks = [0, 0, 0]
    carts = 0
    for _ in range(n):
        for fb in model.sample([0.0, 3.0, 2.0], rng):
            clicks[fb.rank - 1] += 1
            carts += fb.add_to_cart and fb.rank == 2
    assert clicks[0] / n == pytest.approx(0.02, abs=0.005)
    assert clicks[1] / n == pytest.approx(0.5, abs=0.015)
    assert clicks[2] / n == pytest.approx((0.02 + 0.98 * 3 / 7) / 3, abs=0.015)
    assert carts / clicks[1] == pytest.approx(0.5, abs=0.02)


def test_query_split_is_a_stable_exact_share_of_queries_with_a_relevant_product():
    rows = [(q, "i", 4.0 if q != 99 else 1.0) for q in list(range(1, 21)) + [99]]
    frame = pl.DataFrame(rows, schema=["query_id", "item_id", "relevance"], orient="row")
    frame = frame.with_columns(pl.col("query_id").cast(pl.String).alias("query"))
    judged = Judgments(frame, min_label=1.0, relevant_threshold=3.0)
    seen, unseen = split_queries(judged)
    assert len(seen) == len(unseen) == 10
    assert sorted(seen + unseen) == list(range(1, 21))   # 99 has nothing relevant
    assert seen == sorted(sorted(range(1, 21), key=seen_bucket)[:10])
    assert split_queries(judged) == (seen, unseen)
    few_seen, few_unseen = split_queries(judged, seen_share=0.25, max_queries=8)
    assert sorted(few_seen + few_unseen) == list(range(1, 9)) and len(few_seen) == 2
    assert 0.0 <= seen_bucket(1) < 1.0 and seen_bucket(1) == seen_bucket(1)
    with pytest.raises(ValueError, match="seen_share"):
        split_queries(judged, seen_share=1.0)
    with pytest.raises(ValueError, match="max_queries"):
        split_queries(judged, max_queries=1)


def test_the_cli_has_a_simulate_command():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(
        ["simulate", "--products", "p.parquet", "--judgments", "j.parquet", "--sessions", "5",
         "--rounds", "2", "--seed", "3", "--max-queries", "10", "--chart", "c.png", "--json"])
    assert (args.sessions, args.rounds, args.seed, args.max_queries, args.json) == (5, 2, 3, 10,
                                                                                     True)
    assert args.func.__name__ == "cmd_simulate"
