"""``bench nearline`` observes freshness on every kind of home the README leads to: the demo
home (untrained ranker), a home whose ranker has a relevance model, and a home whose live
checkpoint was trained for an older release. A purchase in process A must move process B's
results through the real nearline updater; a probe B never sees fails the benchmark."""

from __future__ import annotations

import pytest

from pipelines.benchmarks.nearline import bench_nearline
from pipelines.learning.nearline import NearlineUpdater
from pipelines.learning.retrain import retrain_ranker
from pipelines.steps import run_build
from serving import Recommender
from serving.checkpoint import read_latest
from tests.conftest import make_settings, read_demo_rows, write_rows
from tests.integration.test_simulate import slice_crowdflower

PROBES = 3


def measure(home):
    return bench_nearline(make_settings(home), n_lists=60, probes=PROBES,
                          checkpoint_every_s=0.05, reload_interval_s=0.05)


def assert_observed(out):
    assert out["probes"] == PROBES and out["probes_not_seen"] == 0
    assert out["within_target"] == PROBES
    assert 0 < out["freshness_p50_s"] <= out["freshness_p95_s"] <= out["freshness_max_s"]
    # a purchase raises its (query, item) memory, so the item can only climb
    assert out["memory_step_mean"] > 0 and out["logit_change_mean"] > 0
    assert out["moved_down"] == 0
    assert out["backlog_events"] > 0 and out["events_per_s"] > 0


def test_freshness_on_the_demo_home(demo_copy):
    out = measure(demo_copy)
    assert out["home"]["ranker"] == "untrained"
    assert_observed(out)


def test_freshness_on_a_home_with_a_relevance_model(shared_data, tmp_path, encoder):
    products, judgments = slice_crowdflower(shared_data, tmp_path, n_queries=12,
                                            n_distractors=100)
    home = tmp_path / "home"
    run_build(make_settings(home), catalogue=products, golden=None, register=False,
              encoder=encoder)
    assert retrain_ranker(make_settings(home, judgments=judgments), encoder=encoder)["promoted"]

    out = measure(home)
    assert out["home"]["ranker"] == "relevance model"
    assert out["home"]["checkpoint_for_live_release"] is True
    assert_observed(out)


def test_freshness_on_a_home_whose_checkpoint_predates_the_live_release(demo_copy, encoder,
                                                                        tmp_path):
    settings = make_settings(demo_copy)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    top = rec.recommend("yoga mat", k=3)
    rec.record_batch([
        *({"session_id": "s1", "query": "yoga mat", "item_id": r.item_id, "type": "impression",
           "position": p} for p, r in enumerate(top, start=1)),
        {"session_id": "s1", "query": "yoga mat", "item_id": top[2].item_id, "type": "click",
         "position": 3}])
    NearlineUpdater(settings, encoder=encoder).run_once()
    old = read_latest(demo_copy)

    rows = read_demo_rows()
    rows[0]["title"] = rows[0]["title"] + " (new edition)"
    run_build(settings, catalogue=write_rows(tmp_path / "catalogue.csv", rows), register=False,
              encoder=encoder)
    assert read_latest(demo_copy).release_id == old.release_id  # the checkpoint is the old one

    out = measure(demo_copy)
    assert out["home"]["ranker"] == "zero-shot"
    assert out["home"]["checkpoint_for_live_release"] is False
    assert out["home"]["query_item_memory"] >= 1
    assert_observed(out)


def test_a_probe_that_is_never_seen_fails_the_benchmark():
    from pipelines.benchmarks.nearline import freshness_report
    from serving.errors import MeasurementError

    seen = {"query": "tent", "item_id": "a", "lag_s": 0.3,
            "before": {"memory": 0.0, "logit": -5.0, "rank": 2},
            "after": {"memory": 0.1, "logit": -4.9, "rank": 1}}
    assert freshness_report([seen], {})["freshness_p50_s"] == pytest.approx(0.3)
    unseen = {**seen, "item_id": "b", "lag_s": None, "after": None}
    with pytest.raises(MeasurementError, match="1 of 2 purchases never reached process B"):
        freshness_report([seen, unseen], {})
