"""`instantrec eval` on small slices of both real judged data sets, through the real CLI
(`pipelines.cli.main`, in the test's process)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import polars as pl
import pytest

from pipelines.cli import main
from pipelines.offline.judged import load_judgments


def slice_dataset(shared_data, name, id_col, n_queries, tmp_path, n_distractors=300):
    judgments = pl.read_parquet(shared_data / name / "judgments.parquet")
    queries = judgments["query_id"].unique().sort().head(n_queries)
    judgments = judgments.filter(pl.col("query_id").is_in(queries.implode()))
    products = pl.read_parquet(shared_data / name / "products.parquet")
    keep = products.filter(pl.col(id_col).is_in(judgments[id_col].implode()))
    extra = products.filter(~pl.col(id_col).is_in(judgments[id_col].implode())).head(n_distractors)
    pl.concat([keep, extra]).write_parquet(tmp_path / "products.parquet")
    judgments.write_parquet(tmp_path / "judgments.parquet")
    return tmp_path / "products.parquet", tmp_path / "judgments.parquet"


def cli(*args) -> tuple[int, str, str]:
    """``instantrec *args`` in this process (the encoder and torch already imported: a fresh
    interpreter would spend most of a small eval importing them): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_eval(tmp_path, products, judgments, protocol, *extra):
    code, out, err = cli("--home", tmp_path / "home", "eval", "--products", products,
                         "--judgments", judgments, "--protocol", protocol, "--json", *extra)
    assert code == 0, err[-3000:]
    return json.loads(out)


@pytest.mark.parametrize("name, id_col", [("crowdflower", "product_id"),
                                          ("homedepot", "product_uid")])
def test_eval_runs_both_protocols_on_real_data(shared_data, tmp_path, name, id_col):
    products, judgments = slice_dataset(shared_data, name, id_col, 6, tmp_path)
    retrieval = run_eval(tmp_path, products, judgments, "retrieval", "--per-query")
    assert retrieval["protocol"] == "retrieval"
    assert set(retrieval["methods"]) == {"bm25", "dense", "fusion", "hybrid", "ranker"}
    chart = Path(retrieval["chart"])
    assert chart.name == f"eval-{tmp_path.name}-retrieval.png"  # named after the data folder
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for metrics in retrieval["methods"].values():
        assert set(metrics) == {"ndcg@10", "recall@100", "mrr"}
        assert 0.0 < metrics["ndcg@10"] <= 1.0 and 0.0 < metrics["recall@100"] <= 1.0
    assert retrieval["n_queries"] == len(retrieval["per_query"]["dense"]) <= 6
    rerank = run_eval(tmp_path, products, judgments, "rerank", "--methods", "dense,hybrid",
                      "--no-chart")
    assert set(rerank["methods"]) == {"dense", "hybrid"} and "chart" not in rerank
    assert rerank["n_queries"] == 6
    assert all(0.0 < m["ndcg@10"] <= 1.0 for m in rerank["methods"].values())


def test_retrieval_goes_through_the_served_path_and_exact_search_is_a_labelled_reference(
        shared_data, tmp_path):
    from serving.manifest import read_manifest

    products, judgments = slice_dataset(shared_data, "crowdflower", "product_id", 6, tmp_path,
                                        200)
    served = run_eval(tmp_path, products, judgments, "retrieval", "--no-chart")
    used = served["retrieval"]
    assert used["name"] == "served" and "retrieve_candidates" in used["description"]
    assert used["depth"] == 100
    # a release bundle of exactly the sliced catalogue, written as a release writes one
    bundle = Path(used["bundle"]["path"])
    assert bundle.parent == tmp_path / "home" / "cache" / "bundles"
    manifest = read_manifest(bundle)
    assert manifest.item_count == pl.read_parquet(products).height
    assert (manifest.index.n_trees, manifest.index.search_k) == (
        used["bundle"]["n_trees"], used["bundle"]["search_k"])
    built = (bundle / "manifest.json").stat().st_mtime_ns
    # the same inputs reuse the bundle, and give the same figures
    again = run_eval(tmp_path, products, judgments, "retrieval", "--no-chart")
    assert again["retrieval"] == used and again["methods"] == served["methods"]
    assert (bundle / "manifest.json").stat().st_mtime_ns == built

    exact = run_eval(tmp_path, products, judgments, "retrieval", "--retrieval", "exact",
                     "--no-chart")
    assert exact["retrieval"]["name"] == "exact" and "bundle" not in exact["retrieval"]
    assert exact["retrieval"]["description"].startswith("reference only, not what serving")
    assert set(exact["methods"]) == set(served["methods"])
    assert all(0.0 < m["ndcg@10"] <= 1.0 for m in exact["methods"].values())
    rerank = run_eval(tmp_path, products, judgments, "rerank", "--methods", "dense",
                      "--no-chart")
    assert rerank["retrieval"]["name"] == "judged"


def test_embeddings_are_cached_by_content(shared_data, tmp_path):
    products, judgments = slice_dataset(shared_data, "crowdflower", "product_id", 3, tmp_path, 50)
    first = run_eval(tmp_path, products, judgments, "rerank")
    # second run must hit the cache: same numbers, and the cache holds one row per product text
    second = run_eval(tmp_path, products, judgments, "rerank")
    assert first["methods"] == second["methods"]
    import duckdb

    con = duckdb.connect(str(tmp_path / "home" / "cache" / "embeddings.duckdb"), read_only=True)
    cached = con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    con.close()
    assert 0 < cached <= pl.read_parquet(products).height


def test_relevance_threshold_follows_the_label_scale(shared_data):
    hd = load_judgments(shared_data / "homedepot" / "judgments.parquet")
    cf = load_judgments(shared_data / "crowdflower" / "judgments.parquet")
    assert (hd.min_label, hd.relevant_threshold) == (1.0, 2.5)
    assert (cf.min_label, cf.relevant_threshold) == (1.0, 3.0)
    # CrowdFlower's 73 repeatedly judged (query, product) pairs are averaged into one row each
    raw = pl.read_parquet(shared_data / "crowdflower" / "judgments.parquet")
    pairs = raw.group_by("query_id", "product_id").agg(pl.col("relevance").mean())
    assert raw.height - pairs.height == 78 and cf.frame.height == pairs.height
    repeated = pairs.join(raw.group_by("query_id", "product_id").len().filter(pl.col("len") > 1),
                          on=["query_id", "product_id"])
    assert repeated.height == 73


def run_cli_error(*args):
    code, _, err = cli("eval", *args)
    assert code == 2
    return err


def test_eval_names_bad_input(tmp_path):
    products = tmp_path / "products.csv"
    products.write_text("product_id,title\n1,drill\n")
    bad_judgments = tmp_path / "judgments.csv"
    bad_judgments.write_text("query,product_id\nx,1\n")
    assert "lacks column(s) ['query_id', 'relevance']" in run_cli_error(
        "--products", products, "--judgments", bad_judgments)
    assert "has no 'title' column" in run_cli_error(
        "--products", bad_judgments, "--judgments", bad_judgments)
    assert "does not exist" in run_cli_error(
        "--products", tmp_path / "nope.parquet", "--judgments", bad_judgments)


def test_unknown_methods_are_named(tmp_path):
    products = tmp_path / "products.csv"
    products.write_text("product_id,title\n1,drill\n")
    judgments = tmp_path / "judgments.csv"
    judgments.write_text("query_id,query,product_id,relevance\n1,drill,1,3\n")
    assert "unknown method(s) ['rankr']" in run_cli_error(
        "--products", products, "--judgments", judgments, "--methods", "dense,rankr")
