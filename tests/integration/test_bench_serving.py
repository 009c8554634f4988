"""`instantrec bench serving` runs end to end on a tiny real catalogue, serving what a shop runs
after a retrain (relevance model, (query, item) memory, filters), beside the zero-shot ranker.
The figures are not judged; what was measured is."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipelines.benchmarks import serving as bench_serving
from serving.release import current_bundle_dir, load_bundle
from tests.conftest import make_settings

QUERIES = 4


def _args(shared_data, products, *extra):
    parser = argparse.ArgumentParser()
    bench_serving.add_arguments(parser)
    return parser.parse_args(["--products", str(products), "--judgments",
                              str(shared_data / "homedepot" / "judgments.parquet"),
                              "--queries", str(QUERIES), "--repeats", "1", "--backend", "onnx",
                              "--train-queries", "40", "--click-queries", "10",
                              "--click-pages", "2", "--memory-queries", "5",
                              "--filter-share", "0.5", *extra])


def test_bench_serving_measures_the_served_path_stage_by_stage(shared_data, tiny_homedepot,
                                                               tmp_path):
    settings = make_settings(tmp_path / "home")
    args = _args(shared_data, tiny_homedepot)
    out = bench_serving.run(settings, args)

    assert out["n_items"] == 60 and out["default_ranker"] == "relevance"
    assert out["build"]["publish"]["live"] is True
    shop = out["shop"]
    assert shop["relevance"]["queries"] >= 5 and shop["memory_entries"] > 0
    assert shop["split"]["train_queries"] <= 40
    assert set(out["rankers"]) == {"relevance", "zero-shot"}
    for ranker, by_backend in out["rankers"].items():
        r = by_backend["onnx"]
        assert r["backend"] == "onnx" and r["ranker"] == ranker  # no fallback to torch
        for part in ("unseen", "cached", "session", "memory"):
            assert 0 < r[part]["p50_ms"] <= r[part]["p95_ms"] <= r[part]["p99_ms"]
        # the relevance model scored every unseen request, and only in the retrained ranker
        assert r["relevance_ran_min"] == (QUERIES if ranker == "relevance" else 0)
        stages = r["stages"]
        ran = set(stages["p50_ms"])
        assert {"parse", "understand", "encode", "bm25", "filters", "ann", "union",
                "vectors", "ranker", "results"} <= ran
        assert ({"features", "relevance"} <= ran) == (ranker == "relevance")
        assert 0 < stages["sum_over_request_max"] <= 1.0  # timed inside the request
        assert all(v >= 0 for v in stages["p50_ms"].values())
        # filters on the stated share of requests, and every filtered result obeys them
        filtered = r["unseen"]["filtered"]
        assert filtered["n_per_run"] == 2 and filtered["share"] == 0.5
        assert filtered["results_checked"] > 0 and filtered["violations"] == 0
        assert r["session"]["sessions_with_clicks_min"] == QUERIES
        assert [c["clients"] for c in r["concurrency"]] == [1, 2, 4]
        assert all(c["n_per_run"] == QUERIES and c["qps"] > 0 for c in r["concurrency"])
        cov = r["levers"]["coverage"]
        assert cov["identical"] == cov["queries"] == QUERIES
        assert [s["factor"] for s in r["levers"]["search_k"]] == [0.5, 1.0, 2.0]
        assert all(0 <= s["recall_at_10"] <= 1 for s in r["levers"]["search_k"])
    # the memory lookup ran and hit for the clicked training queries, in the retrained ranker
    assert out["rankers"]["relevance"]["onnx"]["memory"]["results_with_memory_min"] > 0
    assert out["rankers"]["zero-shot"]["onnx"]["memory"]["results_with_memory_min"] == 0

    # the bench catalogue carries deterministic synthetic offers
    bundle = load_bundle(current_bundle_dir(Path(out["release"]) / "releases"))
    prices, stock = bench_serving.synthetic_offers(bundle.items.item_ids.tolist())
    np.testing.assert_allclose(bundle.items.prices, prices)
    np.testing.assert_array_equal(bundle.items.in_stock, stock)

    # a rerun fits nothing and replays nothing: the live checkpoint is reused
    _, build, again = bench_serving.prepare_shop(settings, args)
    assert build["reused"] and again["reused"]
    assert again["checkpoint_seq"] == shop["checkpoint_seq"]
    assert again["memory_entries"] == shop["memory_entries"]


def test_filtered_requests_are_the_stated_share():
    chosen = bench_serving.filtered_requests(200, 0.25, seed=3)
    assert len(chosen) == 50 and all(0 <= j < 200 for j in chosen)
    assert chosen == bench_serving.filtered_requests(200, 0.25, seed=3)
    assert {tuple(sorted(f)) for f in chosen.values()} == {
        tuple(sorted(f)) for f in bench_serving.FILTER_MIX}


def test_synthetic_offers_are_deterministic_and_plausible():
    ids = [str(i) for i in range(100_000, 102_000)]
    prices, stock = bench_serving.synthetic_offers(ids)
    again, _ = bench_serving.synthetic_offers(ids)
    np.testing.assert_array_equal(prices, again)
    assert 2.0 <= prices.min() and prices.max() <= 800.0
    assert 0.85 < stock.mean() < 0.95
    # log-uniform: about as many items below the geometric middle (40) as above it
    assert 0.45 < (prices < 40.0).mean() < 0.55


def test_the_split_keeps_held_out_queries_apart():
    texts = [f"query {i}" for i in range(2000)]
    train = [t for t in texts if bench_serving.in_training_split(t, 0.7)]
    assert 0.65 < len(train) / len(texts) < 0.75
    assert train == [t for t in texts if bench_serving.in_training_split(t, 0.7)]


def test_bench_serving_under_a_concurrent_batch_job(shared_data, tiny_homedepot, tmp_path):
    """--batch-job embed: the encoder embeds the catalogue beside each serving process, is
    stopped by its PID afterwards, and its throughput during the run is reported."""
    import psutil

    settings = make_settings(tmp_path / "home")
    args = _args(shared_data, tiny_homedepot, "--ranker", "relevance", "--batch-job", "embed")
    before = {p.pid for p in psutil.process_iter()}
    out = bench_serving.run(settings, args)

    job = out["batch_job"]
    assert job["threads"] == 1 and job["items"] >= 60 and job["items_per_s"] > 0
    assert out["rankers"]["relevance"]["onnx"]["batch_job"]["items"] == job["items"]
    assert out["unseen"]["p50_ms"] > 0
    left = [p for p in psutil.process_iter(["cmdline"])
            if p.pid not in before and "_batch_child" in " ".join(p.info["cmdline"] or ())]
    assert left == []
    assert not list(Path(out["release"]).glob("batch-job-*"))
