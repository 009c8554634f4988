"""Serving memory and latency as the catalogue grows from 10k to 1M items: full ``recommend()``.

``instantrec bench growth [--json]``. For each of ``--sizes`` it writes a complete release
bundle (the same :func:`pipelines.catalogue.index.write_bundle` a release uses: Annoy tuned to the
recall target, the vectors, BM25 over the item texts, the item table, the manifest), publishes
it in a home of its own, and starts a fresh serving process on it that answers real Home Depot
queries exactly as ``instantrec bench serving`` does (:func:`pipelines.benchmarks.serving.
measure_process`, ONNX query encoder): unseen (held-out) queries, a share of them with
business filters, repeated ones, queries with a session, the stages of an unseen request
timed inside ``recommend()``, single-thread queries/s, peak and final resident memory.

Served as a shop serves after a retrain (``--ranker relevance``): the serving benchmark's
retrained live ranker (relevance model fitted on the training split of the judged queries, and
its (query, item) memory from replayed clicks: :func:`pipelines.benchmarks.serving.
prepare_ranker`) is carried over to each size's release by item id, as the nearline updater
carries a ranker to a new release. ``zero-shot`` serves the untrained ranker, for comparison.
Every catalogue carries the serving benchmark's synthetic prices and stock.

Catalogues: sizes up to the real catalogue are random subsets of the real Home Depot items
and their vectors (embedded by the project's encoder, through the evaluation's embedding
cache). Larger sizes keep every real item and add synthetic ones made as ``bench ann`` makes
them (:func:`pipelines.benchmarks.ann.scale_up_with_parents`: a real parent's vector plus
noise, as close to its parent as real nearest neighbours are to each other), each with its
parent's title and description, so BM25's posting lists grow as a catalogue of product
variants would. Vectors are not re-embedded (1M texts would take about an hour here);
everything else is built as a release builds it.

Each size also reports the release's Annoy setting (tuned on probe queries, as every release
is) and its recall@10 against exact search for real queries, build time per part, and file
sizes. Memory is the serving process's (encoder, ONNX Runtime and torch included, which do
not grow with the catalogue); "file-backed" pages are the memory-mapped index and vectors,
shared between replicas on one host.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.benchmarks.serving import add_shop_arguments
from serving.layout import bench_dir, embedding_cache
from serving.ranker import CheckpointMeta
from serving.schema import CONTENT_HASH, ITEM_ID
from serving.settings import Settings

log = logging.getLogger(__name__)

SHARED_HOMEDEPOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "homedepot"
DEFAULT_SIZES = "10000,54667,100000,1000000"
SYNTHETIC_SUFFIX = "~v"


def catalogue_of_size(products: Any, real: np.ndarray, n: int, parent_cos: float,
                      seed: int) -> tuple[Any, np.ndarray]:
    """(items with the warehouse's columns, sorted by id; their vectors) with ``n`` items."""
    import polars as pl

    rng = np.random.default_rng(seed)
    if n <= products.height:
        rows = np.sort(rng.choice(products.height, n, replace=False))
        items, vectors = products[rows], real[rows]
    else:
        from pipelines.benchmarks.ann import scale_up_with_parents

        vectors, parents = scale_up_with_parents(real, n, parent_cos, seed)
        children = products[parents].with_columns(
            (pl.col(ITEM_ID) + SYNTHETIC_SUFFIX + pl.Series(np.arange(len(parents))).cast(
                pl.String)).alias(ITEM_ID))
        items = pl.concat([products, children])
    from pipelines.benchmarks.serving import synthetic_offers

    prices, stock = synthetic_offers(items[ITEM_ID].to_list())
    items = items.with_columns(
        pl.lit(None, dtype=pl.String).alias("category"), pl.lit(None, dtype=pl.String).alias("brand"),
        pl.Series("price", prices, dtype=pl.Float64), pl.Series("in_stock", stock),
        pl.concat_str([pl.col(ITEM_ID), pl.col("title")], separator="\x1f")
        .hash(seed=0).cast(pl.String).alias(CONTENT_HASH))
    order = np.argsort(items[ITEM_ID].to_numpy(), kind="stable")
    return items[order], np.ascontiguousarray(vectors[order])


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def annoy_recall(bundle_dir: Path, vectors: np.ndarray, queries: np.ndarray, n_trees: int,
                 search_k: int, k: int = 10) -> float:
    """recall@k of the bundle's Annoy index at its search_k against exact inner-product top-k."""
    import annoy

    from pipelines.catalogue.index import INDEX_FILE, exact_top_k, neighbour_recall

    index = annoy.AnnoyIndex(vectors.shape[1], "angular")
    index.load(str(bundle_dir / INDEX_FILE))
    try:
        found = [index.get_nns_by_vector(q, k, search_k=search_k) for q in queries]
    finally:
        index.unload()
    return round(neighbour_recall(found, exact_top_k(vectors, queries, k)), 4)


def carry_ranker(shop_home: Path, home: Path, release_id: str, item_ids: np.ndarray) -> int:
    """Publish under ``home`` the live ranker of ``shop_home`` (the serving benchmark's
    retrained checkpoint: relevance model and (query, item) memory) carried over to release
    ``release_id`` by item id, as the nearline updater carries it to a new release; returns
    how many memory entries name items of this release."""
    from serving.checkpoint import load_latest, publish_checkpoint
    from serving.release import current_bundle_dir, load_bundle

    latest = load_latest(shop_home)
    if latest is None or latest[1].relevance is None:
        raise RuntimeError(f"{shop_home} has no retrained ranker to carry over")
    ranker = latest[1]
    old_ids = load_bundle(current_bundle_dir(shop_home / "releases"),
                          verify_files=False).items.item_ids
    carried = ranker.for_release(release_id, old_ids, item_ids)
    carried.meta = CheckpointMeta(extra={k: v for k, v in carried.meta.extra.items()
                                         if k.startswith("bench_")})
    publish_checkpoint(home, carried, 0)
    return len(carried.query_item)


def bench_size(n: int, products: Any, real: np.ndarray, qvecs: np.ndarray, encoder: Any,
               plan: dict[str, Any], work: Path, *, parent_cos: float, seed: int,
               target: float, repeats: int, k: int, rankers: tuple[str, ...] = ("relevance",),
               shop_home: Path | None = None, filter_share: float = 0.25) -> dict[str, Any]:
    from pipelines.benchmarks.serving import median_of, run_child
    from pipelines.catalogue.gate import evaluate_release
    from pipelines.catalogue.index import INDEX_FILE, LEXICAL_DIR, VECTORS_FILE, write_bundle
    from pipelines.catalogue.publish import publish_release
    from serving.manifest import read_manifest
    from serving.release import Pointer, read_pointer, write_pointer

    t0 = time.perf_counter()
    items, vectors = catalogue_of_size(products, real, n, parent_cos, seed)
    catalogue_s = time.perf_counter() - t0
    home = work / f"items-{n}"
    shutil.rmtree(home, ignore_errors=True)
    releases = home / "releases"
    release_id = f"growth-{n}-" + hashlib.sha256(f"{n}:{seed}:{target}".encode()).hexdigest()[:8]
    t0 = time.perf_counter()
    staged = write_bundle(items, vectors, releases / ".staging" / release_id, release_id,
                          encoder, seed, target)
    build_s = time.perf_counter() - t0
    # the release gate as the pipeline runs it (no golden or judged queries here: index recall)
    gate = evaluate_release(staged, Settings(home=home), encoder)["gate"]
    published = publish_release(staged, releases)
    if not published.live:  # measure it anyway, and say so in the result
        log.warning("growth release %s failed its gate %s; serving it for the benchmark",
                    release_id, gate)
        current = read_pointer(releases)
        write_pointer(releases, Pointer(release_id, (current.generation if current else 0) + 1))
    bundle = releases / release_id
    manifest = read_manifest(bundle)
    recall = annoy_recall(bundle, vectors, qvecs, manifest.index.n_trees, manifest.index.search_k)
    memory_entries = None
    if "relevance" in rankers:
        if shop_home is None:
            raise ValueError("the relevance ranker needs the serving benchmark's home")
        memory_entries = carry_ranker(shop_home, home, release_id,
                                      items[ITEM_ID].to_numpy().astype(object))
    del items, vectors
    served_by: dict[str, Any] = {}
    all_runs = []
    for ranker in rankers:
        job = {"home": str(home), "backend": "onnx", "ranker": ranker, "plan": plan, "k": k,
               "filter_share": filter_share, "concurrency": []}
        runs = [run_child(job) for _ in range(repeats)]
        served_by[ranker] = median_of(runs)
        all_runs += runs
    served = served_by[rankers[0]]
    end = [r["memory_at_end"] for r in all_runs]
    result = {
        "items": n, "synthetic_items": max(0, n - products.height),
        "annoy": {"n_trees": manifest.index.n_trees, "search_k": manifest.index.search_k,
                  "probe_recall_at_10": manifest.index.recall_at_10,
                  "real_query_recall_at_10": recall},
        "files_mb": {"annoy": _size_mb(bundle / INDEX_FILE),
                     "vectors": _size_mb(bundle / VECTORS_FILE),
                     "bm25": _size_mb(bundle / LEXICAL_DIR), "bundle": _size_mb(bundle)},
        "seconds": {"catalogue": round(catalogue_s, 1), "bundle": round(build_s, 1)},
        "gate": gate,
        "memory_entries": memory_entries,
        "serving": served, "serving_by_ranker": served_by,
        "memory_at_end_mb": {key: round(float(np.median([m[key] for m in end])), 1)
                             for key in end[0]},
    }
    shutil.rmtree(home, ignore_errors=True)
    return result


def table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{
        "items": r["items"], "ranker": ranker, "peak_rss_mb": served["peak_rss_mb"],
        "rss_anon_mb": r["memory_at_end_mb"]["anon_mb"],
        "rss_file_backed_mb": r["memory_at_end_mb"]["file_mb"],
        "unseen_p50_ms": served["unseen"]["p50_ms"],
        "unseen_p99_ms": served["unseen"]["p99_ms"],
        "unseen_filtered_p99_ms": served["unseen"]["filtered"].get("p99_ms"),
        "cached_p50_ms": served["cached"]["p50_ms"],
        "session_p50_ms": served["session"]["p50_ms"],
        "qps": served["qps"], "stages_p50_ms": served["stages"]["p50_ms"],
        "load_s": served["load_s"], "loadavg_1m": served["loadavg_1m"],
        "annoy_trees_search_k": [r["annoy"]["n_trees"], r["annoy"]["search_k"]],
        "annoy_real_recall_at_10": r["annoy"]["real_query_recall_at_10"],
        "bundle_mb": r["files_mb"]["bundle"], "bundle_build_s": r["seconds"]["bundle"],
    } for r in results for ranker, served in r["serving_by_ranker"].items()]


def add_arguments(p: Any) -> None:
    p.add_argument("--products", type=Path, default=SHARED_HOMEDEPOT / "products.parquet")
    p.add_argument("--judgments", type=Path, default=SHARED_HOMEDEPOT / "judgments.parquet",
                   help="real queries to ask (query column)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated item counts")
    p.add_argument("--queries", type=int, default=300, help="unseen queries per process")
    p.add_argument("--repeats", type=int, default=1, help="serving processes per size (median)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--target", type=float, default=None,
                   help="Annoy recall@10 target (default: the release setting)")
    p.add_argument("--vectors-cache", type=Path, default=None,
                   help="DuckDB embedding cache (default: <home>/cache/embeddings.duckdb)")
    p.add_argument("--work", type=Path, default=None,
                   help="where the per-size homes go (default <home>/bench/growth)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ranker", choices=["relevance", "zero-shot", "both"], default="both",
                   help="relevance: the serving benchmark's retrained live ranker (relevance "
                        "model + memory) carried over to each size; zero-shot: untrained")
    add_shop_arguments(p)
    p.add_argument("--memory-queries", type=int, default=100)
    p.add_argument("--seed-cache", type=Path, default=None,
                   help="evaluation embedding cache (DuckDB) for the serving benchmark's release")
    p.add_argument("--shop", type=Path, default=None,
                   help="the serving benchmark's home (default <home>/bench/serving-<data set>)")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    from pipelines.benchmarks.ann import nearest_neighbour_cosine
    from pipelines.benchmarks.serving import OFFERS_LABEL, in_training_split, plan_queries, prepare_shop
    from pipelines.offline.evaluation import embed_cached, product_texts
    from pipelines.offline.judged import load_products
    from serving.encoder import Encoder

    started = time.perf_counter()
    encoder = Encoder(settings.encoder_path, max_length=settings.item_max_tokens,
                      precision=settings.embed_precision)
    products = load_products(args.products)
    cache = args.vectors_cache or embedding_cache(settings.home)
    real = np.ascontiguousarray(embed_cached(encoder, product_texts(products), cache,
                                             progress=False), dtype=np.float32)
    rankers = ("relevance", "zero-shot") if args.ranker == "both" else (args.ranker,)
    shop_home, shop = None, None
    clicked: list[str] = []
    if "relevance" in rankers:  # the retrained ranker every size carries over
        shop_args = argparse.Namespace(**{**vars(args), "work": args.shop})
        shop_home, _, shop = prepare_shop(settings, shop_args)
        clicked = shop.pop("click_queries")
    plan = plan_queries(args.judgments, args.queries, levels=(),
                 keep=lambda q: not in_training_split(q, args.train_share),
                 memory=clicked[:args.memory_queries])
    qvecs = encoder.encode(plan["unseen"], precision="fp32")
    parent_cos = nearest_neighbour_cosine(real, args.seed)
    work = (args.work or bench_dir(settings.home) / "growth").resolve()
    target = args.target or settings.index_recall_target
    results = []
    for n in (int(s) for s in str(args.sizes).split(",") if s.strip()):
        results.append(bench_size(n, products, real, qvecs, encoder, plan, work,
                                  parent_cos=parent_cos, seed=args.seed, target=target,
                                  repeats=args.repeats, k=args.k, rankers=rankers,
                                  shop_home=shop_home, filter_share=args.filter_share))
        log.info("growth %d: %s", n, table(results[-1:])[0])
    return {
        "source": str(args.products), "real_items": products.height,
        "synthetic": {"method": "real parent's vector + Gaussian noise, renormalised; parent's "
                                "title and description", "parent_cosine": round(parent_cos, 4)},
        "queries_per_process": len(plan["unseen"]), "recall_target": target,
        "rankers": list(rankers), "shop": shop, "filter_share": args.filter_share,
        "catalogue_offers": OFFERS_LABEL,
        "table": table(results), "results": results, "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
