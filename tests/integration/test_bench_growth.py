"""`instantrec bench growth`: per-size catalogues (real subsets, then real + synthetic variants),
each served from a real release by a fresh process (figures not judged)."""

from __future__ import annotations

import argparse

import numpy as np
import polars as pl

from pipelines.benchmarks import growth, serving
from tests.conftest import make_settings


def _products(n: int = 40) -> pl.DataFrame:
    return pl.DataFrame({"item_id": [f"p{i:03d}" for i in range(n)],
                         "title": [f"title {i}" for i in range(n)],
                         "description": [None if i % 3 else f"about {i}" for i in range(n)]})


def _unit(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_subset_keeps_items_and_their_own_vectors_together():
    products, real = _products(), _unit(40)
    items, vectors = growth.catalogue_of_size(products, real, 25, parent_cos=0.9, seed=1)
    assert items.height == 25 and items["item_id"].is_sorted() and items["item_id"].n_unique() == 25
    row_of = {i: r for r, i in enumerate(products["item_id"])}
    for item, vec in zip(items["item_id"], vectors, strict=True):
        np.testing.assert_array_equal(vec, real[row_of[item]])
    assert set(items.columns) >= {"item_id", "title", "description", "category", "brand",
                                  "price", "in_stock", "content_hash"}
    # the serving benchmark's synthetic offers, so filters have something to filter
    prices, stock = serving.synthetic_offers(items["item_id"].to_list())
    np.testing.assert_array_equal(items["price"].to_numpy(), prices)
    np.testing.assert_array_equal(items["in_stock"].to_numpy(), stock)


def test_synthetic_items_copy_their_parent_text_and_sit_near_its_vector():
    products, real = _products(), _unit(40)
    items, vectors = growth.catalogue_of_size(products, real, 100, parent_cos=0.9, seed=1)
    assert items.height == 100 and items["item_id"].n_unique() == 100
    assert items["item_id"].is_sorted() and items["content_hash"].n_unique() == 100
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    title_of = dict(products.select("item_id", "title").iter_rows())
    row_of = {i: r for r, i in enumerate(products["item_id"])}
    children = 0
    for item, title, vec in zip(items["item_id"], items["title"], vectors, strict=True):
        parent = item.split(growth.SYNTHETIC_SUFFIX)[0]
        assert title == title_of[parent]
        if growth.SYNTHETIC_SUFFIX in item:
            children += 1
            assert float(vec @ real[row_of[parent]]) > 0.8  # near its parent (cosine ~0.9)
        else:
            np.testing.assert_array_equal(vec, real[row_of[item]])
    assert children == 60


def test_bench_growth_serves_every_size_from_a_real_release(shared_data, tiny_homedepot,
                                                             tmp_path):
    parser = argparse.ArgumentParser()
    growth.add_arguments(parser)
    args = parser.parse_args(["--products", str(tiny_homedepot), "--judgments",
                              str(shared_data / "homedepot" / "judgments.parquet"),
                              "--sizes", "40,90", "--queries", "4", "--train-queries", "30",
                              "--click-queries", "10", "--click-pages", "2",
                              "--memory-queries", "5", "--filter-share", "0.5"])
    out = growth.run(make_settings(tmp_path / "home"), args)

    assert [(row["items"], row["ranker"]) for row in out["table"]] == [
        (40, "relevance"), (40, "zero-shot"), (90, "relevance"), (90, "zero-shot")]
    assert [r["synthetic_items"] for r in out["results"]] == [0, 30]
    assert out["shop"]["memory_entries"] > 0
    for r in out["results"]:
        assert r["gate"]["passed"] is True
        # the retrained ranker was carried over by item id: memory entries of items it holds
        assert 0 < r["memory_entries"] <= out["shop"]["memory_entries"]
        for ranker, served in r["serving_by_ranker"].items():
            assert served["n_items"] == r["items"] and served["ranker"] == ranker
            assert served["backend"] == "onnx"
            assert 0 < served["unseen"]["p50_ms"] <= served["unseen"]["p99_ms"]
            assert served["relevance_ran_min"] == (4 if ranker == "relevance" else 0)
            assert ("relevance" in served["stages"]["p50_ms"]) == (ranker == "relevance")
            assert 0 < served["stages"]["sum_over_request_max"] <= 1.0
            assert served["unseen"]["filtered"]["n_per_run"] == 2
            assert served["unseen"]["filtered"]["violations"] == 0
        assert 0 <= r["annoy"]["real_query_recall_at_10"] <= 1
        assert r["memory_at_end_mb"]["rss_mb"] > 0
