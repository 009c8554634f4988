"""The click simulator on a real slice of CrowdFlower: real release, real event log, real
nearline updater, real session path."""

from __future__ import annotations

import polars as pl

from pipelines.offline.simulate import simulate
from tests.conftest import make_settings

SESSIONS, ROUNDS, SHIFT_SESSIONS = 500, 4, 20


def slice_crowdflower(shared_data, out, n_queries=12, n_distractors=100):
    """The ``n_queries`` judged queries with the fewest judged products (at least one of them
    relevant), their judged products and ``n_distractors`` other products."""
    judgments = pl.read_parquet(shared_data / "crowdflower" / "judgments.parquet")
    sizes = (judgments.group_by("query_id")
             .agg(pl.len().alias("judged"), (pl.col("relevance") >= 3).sum().alias("relevant"))
             .filter(pl.col("relevant") >= 1)
             .sort("judged", "query_id"))
    judgments = judgments.filter(pl.col("query_id").is_in(sizes["query_id"].head(n_queries)
                                                          .implode()))
    products = pl.read_parquet(shared_data / "crowdflower" / "products.parquet")
    judged = products["product_id"].is_in(judgments["product_id"].implode())
    pl.concat([products.filter(judged), products.filter(~judged).head(n_distractors)]).write_parquet(
        out / "products.parquet")
    judgments.write_parquet(out / "judgments.parquet")
    return out / "products.parquet", out / "judgments.parquet"


def test_simulated_feedback_through_the_real_loop(shared_data, tmp_path, encoder):
    products, judgments = slice_crowdflower(shared_data, tmp_path)
    settings = make_settings(tmp_path / "home")
    chart = tmp_path / "curve.png"
    report = simulate(settings, products, judgments, sessions=SESSIONS, rounds=ROUNDS, seed=0,
                      encoder=encoder, shift_sessions=SHIFT_SESSIONS, chart=chart)

    # the shape the issue asks for
    for name in ("seen", "unseen"):
        assert set(report[name]) == {"before", "after"}
        for when in ("before", "after"):
            metrics = report[name][when]
            assert set(metrics) == {"ndcg@10", "recall@100", "mrr", "n_queries"}
            assert 0.0 <= metrics["ndcg@10"] <= 1.0 and 0.0 <= metrics["recall@100"] <= 1.0
    assert report["n_seen_queries"] == report["n_unseen_queries"] == 6
    assert report["seen"]["after"]["n_queries"] == report["unseen"]["after"]["n_queries"] == 6

    # every simulated event went through the real path and was applied by the updater
    events, applied = report["events"], report["updater_counters"]
    by_type = events["by_type"]
    assert by_type["impression"] == SESSIONS * ROUNDS * 10
    assert by_type["click"] > 0 and by_type["add_to_cart"] > 0
    assert events["learning"] == sum(by_type.values())
    assert events["recorded"] == events["learning"] + events["intent_shift"]
    assert events["duplicates"] == events["rejected"] == 0
    assert applied["applied"] == events["learning"]
    assert applied["impressions"] == by_type["impression"]
    assert applied["click"] == by_type["click"]
    assert applied["positives"] == by_type["click"] + by_type["add_to_cart"] + by_type.get(
        "purchase", 0)
    assert applied["negatives"] > 0
    assert "abuse_dropped" not in applied and "unknown_item" not in applied

    # the learning curve: one point per round, served from a fresh checkpoint each time
    curve = report["curve"]
    assert [p["round"] for p in curve] == list(range(ROUNDS + 1))
    assert curve[0]["events"] == 0 and curve[0]["ranker_checkpoint"] == 0
    assert all(a["events"] < b["events"] and a["ranker_checkpoint"] < b["ranker_checkpoint"]
               for a, b in zip(curve, curve[1:], strict=False))
    assert report["seen"]["before"] == curve[0]["seen"]
    assert report["unseen"]["after"] == curve[-1]["unseen"]
    # feedback on the seen queries makes them better
    assert report["seen"]["after"]["ndcg@10"] > report["seen"]["before"]["ndcg@10"]
    # the batch retrain ran once, after round 4, on the feedback of the seen queries only
    retrains = [p["retrain"] for p in curve if "retrain" in p]
    assert [p["round"] for p in curve if "retrain" in p] == [ROUNDS]
    relevance = retrains[0]["relevance"]
    assert relevance["queries"] == 6  # every seen query had enough pages; no unseen one
    assert 0 < relevance["cross_fitted"]["queries"] <= 6  # judged on seen queries only
    assert retrains[0]["promoted"] == (retrains[0]["promoted_by"] is not None)

    shift = report["intent_shift"]
    assert shift["sessions"] == SHIFT_SESSIONS and shift["events"] > 0
    assert [p["i"] for p in shift["per_interaction"]] == [0, 1, 2, 3]
    assert all(0.0 <= p["ndcg@10"] <= 1.0 and 0.0 <= p["recovered_share"] <= 1.0
               for p in shift["per_interaction"])
    assert 0.0 <= shift["fresh_ndcg@10"] <= 1.0
    assert shift["interactions_to_recover"] in (None, 0, 1, 2, 3)
    assert 0.0 <= shift["interactions_to_recover_mean"] <= 4.0
    assert 0.0 <= shift["old_need_share_top10"] <= 1.0
    assert 0.0 <= shift["old_need_share_top10_fresh"] <= 1.0
    assert 0.0 <= shift["shift_detected_share"] <= 1.0
    # the same pairs with the untrained ranker, measured in a workspace of their own
    untrained = report["intent_shift_untrained"]
    assert untrained["sessions"] == SHIFT_SESSIONS
    assert untrained["events"] > 0 and len(untrained["per_interaction"]) == 4
    assert 0.0 <= untrained["interactions_to_recover_mean"] <= 4.0
    assert shift["ranker_checkpoint"] == curve[-1]["ranker_checkpoint"]

    assert report["chart"] == str(chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
