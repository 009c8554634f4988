"""The batch retrain fits the relevance model on real judged queries (a CrowdFlower slice, real
release, real encoder, real MLflow registry), serving ranks with it, and what serving computes
is what ``instantrec eval`` computes for the same candidates."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipelines.learning.nearline import NearlineUpdater
from pipelines.learning.retrain import retrain_ranker
from pipelines.steps import run_build
from serving import Recommender
from serving.checkpoint import load_latest
from serving.query import parse_steps
from serving.relevance import MatchFeatures, channel_signals, query_features
from serving.retrieval import release_vocabulary, retrieve_candidates, understood
from serving.text import normalise_query
from tests.conftest import make_settings
from tests.integration.test_simulate import slice_crowdflower


def test_retrain_fits_the_relevance_model_that_serving_and_nearline_use(shared_data, tmp_path,
                                                                       encoder):
    products, judgments = slice_crowdflower(shared_data, tmp_path, n_queries=40,
                                            n_distractors=150)
    home = tmp_path / "home"
    run_build(make_settings(home), catalogue=products, golden=None, register=False,
              encoder=encoder)
    settings = make_settings(home, judgments=judgments)

    out = retrain_ranker(settings, encoder=encoder)
    rel = out["relevance"]
    assert rel["queries"] == 40
    assert rel["cross_fitted"]["ndcg@10"] > rel["zero_shot"]["ndcg@10"], rel
    assert out["promoted"] and rel["promoted"] and out["version"] >= 1
    assert "relevance model alone" in out["reason"]  # judgments, no feedback events yet
    ref, ranker = load_latest(home)
    assert ranker.relevance is not None and ranker.relevance.meta["queries"] == 40

    # serving ranks with it: the order is the relevance model's over serving's candidates,
    # and those scores are what eval's functions give for the same rows
    rec = Recommender.load(home, settings=settings, encoder=encoder, watch=False)
    assert rec.ranker_seq == ref.seq
    bundle = rec.bundle
    query = pl.read_parquet(judgments)["query"][0]
    results = rec.recommend(query, k=10)
    assert all("relevance" in r.signals for r in results)
    logits = [r.signals["logit"] for r in results]
    assert logits == sorted(logits, reverse=True)
    # a repeated plain query reuses its candidates and their relevance scores
    assert [r.signals for r in rec.recommend(query, k=10)] == [r.signals for r in results]
    assert len(rec._relevance) == 1
    row_of = {item: row for row, item in enumerate(bundle.items.item_ids.tolist())}
    rows = [row_of[r.item_id] for r in results]
    text = normalise_query(query, 10_000)
    steps = parse_steps(settings.query_steps)
    dense_text, lexical_text = understood(text, steps, release_vocabulary(bundle, steps))
    qvec = encoder.encode_query(dense_text).astype(np.float64)
    bm25 = bundle.lexical.scores(lexical_text).astype(np.float64)
    coverage, n_terms = bundle.lexical.coverage(lexical_text)
    # per-query normalisation (ranks, best scores) needs every candidate: score them all
    cand = np.array(retrieve_candidates(bundle, qvec, bm25 / bm25.max(), 100))
    cos = np.asarray(bundle.vectors[cand], dtype=np.float64) @ qvec
    X = query_features(channel_signals(cos, bm25[cand], coverage[cand], n_terms),
                       MatchFeatures(bundle.items.titles), text, cand)
    expected = dict(zip(cand.tolist(), ranker.relevance.score(X).tolist(), strict=True))
    served = [r.signals["relevance"] for r in results]
    np.testing.assert_allclose(served, [expected[r] for r in rows], atol=1e-4)

    # the nearline updater continues from the checkpoint and steps on top of the model
    updater = NearlineUpdater(settings, encoder)
    try:
        assert updater.ranker.relevance is not None
        item = results[5].item_id
        rec.record_many([{"session_id": "s1", "query": query, "item_id": r.item_id,
                          "type": "impression", "position": r.rank} for r in results])
        rec.record({"session_id": "s1", "query": query, "item_id": item, "type": "click",
                    "position": 6})
        updater.run_once()
        assert updater.stats.counters["positives"] == 1
        assert updater.stats.counters["negatives"] == 5
    finally:
        updater.close()
    rec.reload()
    again = rec.recommend(query, k=10)
    assert [r.item_id for r in again].index(item) < 5
    rec.close()
