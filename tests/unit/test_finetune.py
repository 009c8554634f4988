"""Encoder fine-tuning: the query split, batching, the in-batch loss, and serving's choice of
encoder directory from a release manifest."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from pipelines.encoder.pairs import is_heldout, split_pairs
from pipelines.encoder.train import in_batch_loss, make_batches
from serving.errors import ReleaseError
from serving.manifest import EncoderSpec
from serving.recommender import encoder_path_for
from serving.settings import Settings

QUERIES = [f"query number {i}" for i in range(200)]


def pairs_of(queries: list[str], per_query: int = 3) -> pl.DataFrame:
    rows = [(q, f"{q}-item{j}") for q in queries for j in range(per_query)]
    return pl.DataFrame({"query": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "item_text": [r[1] for r in rows], "weight": [1.0] * len(rows),
                         "source": ["judged"] * len(rows)})


def test_split_keeps_every_query_on_one_side_and_is_deterministic():
    split = split_pairs(pairs_of(QUERIES), 0.2)
    train = set(split.filter(~pl.col("heldout"))["query"].to_list())
    held = set(split.filter(pl.col("heldout"))["query"].to_list())
    assert train.isdisjoint(held)
    assert train | held == set(QUERIES)
    assert 20 <= len(held) <= 60          # about 20% of 200 queries
    again = split_pairs(pairs_of(QUERIES), 0.2)
    assert again["heldout"].to_list() == split["heldout"].to_list()
    # the split is by query text alone: the pairs' order does not matter
    shuffled = split_pairs(pairs_of(QUERIES).reverse(), 0.2)
    assert set(shuffled.filter(pl.col("heldout"))["query"].to_list()) == held


def test_folds_hold_each_query_out_exactly_once():
    counts = {q: sum(is_heldout(q, 0.2, fold) for fold in range(5)) for q in QUERIES}
    assert set(counts.values()) == {1}


def test_split_rejects_bad_holdout_and_fold():
    with pytest.raises(ValueError, match="holdout"):
        is_heldout("q", 1.0)
    with pytest.raises(ValueError, match="fold"):
        is_heldout("q", 0.25, 4)


def test_batches_never_repeat_a_query_or_an_item():
    queries = ["a", "a", "a", "b", "b", "c", "d", "e", "f", "g"]
    items = ["1", "2", "3", "1", "4", "5", "6", "7", "8", "9"]
    batches = make_batches(queries, items, 4, np.random.default_rng(0))
    assert batches
    for batch in batches:
        assert len({queries[i] for i in batch}) == len(batch)
        assert len({items[i] for i in batch}) == len(batch)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used))


def test_in_batch_loss_known_answer():
    q = torch.eye(2, dtype=torch.float64)
    # each query's own item at cosine 1, the other at cosine 0: loss = log(1 + e^-scale)
    assert float(in_batch_loss(q, q, scale=2.0)) == pytest.approx(math.log1p(math.exp(-2.0)))
    # swapped items: each query's positive scores 0 and the negative 2
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert float(in_batch_loss(q, swapped, scale=2.0)) == pytest.approx(
        math.log1p(math.exp(2.0)))
    # weights average the per-query losses: the second (weight 3) is the wrong one
    d = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    losses = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))]
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert float(in_batch_loss(q, d, w, 2.0)) == pytest.approx((losses[0] + 3 * losses[1]) / 4)


def _bundle(path: str | None, name: str = "ft-x") -> SimpleNamespace:
    spec = EncoderSpec(name=name, revision="r", dim=384, max_tokens=128, path=path)
    return SimpleNamespace(release_id="rel", manifest=SimpleNamespace(encoder=spec))


def test_serving_resolves_the_encoder_directory_from_the_manifest(tmp_path):
    home = tmp_path / "home"
    settings = Settings(home=home)
    # no recorded path: the configured encoder (None = packaged default), as before
    assert encoder_path_for(_bundle(None), settings) is None
    assert encoder_path_for(_bundle(None), Settings(home=home, encoder_path=tmp_path)) == tmp_path
    recorded = tmp_path / "build-machine" / "encoders" / "ft-x"
    recorded.mkdir(parents=True)
    assert encoder_path_for(_bundle(str(recorded)), settings) == recorded
    # recorded on another machine: the same encoder under this home's encoders/
    local = home / "encoders" / "ft-y"
    local.mkdir(parents=True)
    assert encoder_path_for(_bundle("/elsewhere/encoders/ft-y", "ft-y"), settings) == local
    with pytest.raises(ReleaseError, match="ft-z.*does not exist"):
        encoder_path_for(_bundle("/elsewhere/encoders/ft-z", "ft-z"), settings)


def test_event_pairs_weigh_carts_and_purchases_above_clicks(tmp_path):
    from pipelines.catalogue.ingest import ingest_catalogue
    from pipelines.encoder.pairs import event_pairs
    from pipelines.steps import DEMO_CATALOGUE
    from serving.eventlog import SqliteEventLog
    from serving.events import parse_event

    settings = Settings(home=tmp_path)
    assert event_pairs(settings).height == 0          # no log, no warehouse: no pairs
    ingest_catalogue(DEMO_CATALOGUE, settings.warehouse_path)
    raw = [("impression", "SKU-10001", "Standing Desk"), ("click", "SKU-10001", "standing desk"),
           ("click", "SKU-10002", "standing desk"), ("purchase", "SKU-10002", "standing desk"),
           ("add_to_cart", "SKU-10002", "mattress"), ("purchase", "SKU-10002", "mattress"),
           ("purchase", "SKU-10002", "mattress"), ("click", "SKU-99999", "gone")]
    log_ = SqliteEventLog(settings.events_path)
    log_.append([parse_event({"event_id": f"e{n}", "session_id": "s", "type": t, "item_id": i,
                              "query": q}, b"k") for n, (t, i, q) in enumerate(raw)])
    log_.close()
    pairs = event_pairs(settings)
    weights = {(q, i): w for q, i, w in pairs.select("query", "item_id", "weight").iter_rows()}
    # impressions are no positives; an item no longer in the catalogue is dropped; a pair's
    # weight is the sum over its events, capped at 5
    assert weights == {("standing desk", "SKU-10001"): 1.0, ("standing desk", "SKU-10002"): 4.0,
                       ("mattress", "SKU-10002"): 5.0}
    assert pairs.filter(pl.col("item_id") == "SKU-10001")["item_text"][0].startswith(
        "FlexiSpot E7 Electric Standing Desk")


def test_gate_follows_the_held_out_gain():
    from pipelines.encoder.heldout import gate

    def ev(ndcg: float, recall: float) -> dict:
        return {"gate_set": "judged", "sets": {"judged": {
            "scored_queries": 30, "gain": {"ndcg@10": ndcg, "recall@100": recall, "mrr": 0.0}}}}

    assert gate(ev(0.002, 0.0), 0.002)["passed"]
    assert not gate(ev(0.0019, 0.0), 0.002)["passed"]
    assert gate(ev(0.01, -0.002), 0.002)["passed"]
    assert not gate(ev(0.01, -0.0021), 0.002)["passed"]
    assert not gate({"gate_set": None, "sets": {}})["passed"]
