"""ANN recall@10 and queries/s (Annoy as configured, exact numpy, hnswlib) and memory growth.

``instantrec bench ann [--json]``. For the real catalogue's vectors (the Home Depot products
embedded by the project's encoder, read through the same DuckDB cache as ``instantrec eval``)
and for each of ``--sizes`` (default 10k, 100k, 1M items), it measures, against exact top-10
by inner product for real judged queries encoded by the same encoder:

* **Annoy as configured**: :func:`pipelines.catalogue.index.tune_index` exactly as a release calls it
  (its n_trees/search_k grid, tuned on noisy item vectors), then recall@10 and queries/s of
  that choice on the real queries; also the lowest ``search_k`` on the chosen trees that
  reaches the target on the real queries. Build time is the chosen index's own build and,
  separately, the whole tuning loop a release pays.
* **exact numpy**: one matrix-vector product per query (as a serving process would) and
  the batched form; recall 1.0 by definition.
* **hnswlib** (M, ef_construction as given), ``ef`` swept to the lowest reaching the target.

Queries/s are single-threaded (BLAS limited to one thread), one query at a time as serving
does, medians over ``--repeats`` passes with the methods interleaved so that a noisy, shared
machine slows all of them alike. Exact batched search uses the default BLAS threads.

**Scale-up.** Sizes up to the real catalogue are random subsets of the real vectors. Larger
sizes keep every real vector and add synthetic ones: each is a uniformly chosen real
"parent" plus isotropic Gaussian noise, renormalised, with the noise scale set so that a
child's cosine to its parent equals the median cosine between a real item and its nearest
real neighbour (measured). So the new items sit where real items are, as close to them as
real neighbours are to each other: the catalogue gets denser along its own manifold (more
variants of the same kinds of product), as a growing catalogue does. Uniformly random unit
vectors would instead be nearly orthogonal to everything, with no neighbourhood structure,
which makes ANN search unrealistically hard and exact top-10 meaningless.

**Growth** (per size, ``--no-growth`` to skip): a fresh process loads the Annoy file and the
vectors memory-mapped, as :func:`serving.release.load_bundle` does, and reports its resident
memory from ``/proc/self/smaps_rollup`` (anonymous vs file-backed pages) after loading and
after answering the queries; then per-query latency p50/p99 of the ANN step as serving runs it
(100 candidates, ``max(search_k, 100)``, plus gathering their vectors), of Annoy at k=10,
of exact search with the vectors read into RAM (and that RSS delta), and of hnswlib (loaded
into RAM). It covers the ANN and vectors part of serving only (no encoder, BM25 or ranker);
``instantrec bench growth`` measures whole ``recommend()`` calls per size.
The files were just written, so their pages are in the page cache: mapped pages are minor
faults, not disk reads; a cold start from disk is slower than this.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.layout import embedding_cache
from serving.settings import Settings

log = logging.getLogger(__name__)

SHARED_HOMEDEPOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "homedepot"
DEFAULT_SIZES = "10000,100000,1000000"
# pipelines.catalogue.index (polars, duckdb, the encoder module) is imported inside functions, so the
# serving probe's fresh process holds only numpy, annoy and hnswlib.
EF_GRID = (10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)
SERVING_CANDIDATES = 100  # Settings.candidates: the retrieval depth serving asks Annoy for
K = 10


# ---------------------------------------------------------------------------- inputs

def load_real(products: Path, judgments: Path, cache: Path, encoder_path: Path | None,
              max_tokens: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors (n, dim), query vectors (n_queries, dim)), float32 unit rows.

    Items are embedded through the DuckDB cache at ``cache`` (filled if texts are missing);
    queries are ``n_queries`` distinct judged queries, drawn with ``seed``, normalised as
    serving does and encoded by the same encoder.
    """
    import polars as pl

    from pipelines.offline.evaluation import embed_cached, product_texts
    from pipelines.offline.judged import load_products
    from serving.encoder import Encoder
    from serving.text import normalise_query

    encoder = Encoder(encoder_path, max_length=max_tokens)
    items = embed_cached(encoder, product_texts(load_products(products)), cache, progress=False)
    queries = (pl.read_parquet(judgments, columns=["query"])["query"].cast(pl.String)
               .drop_nulls().unique().sort().to_list())
    rng = np.random.default_rng(seed)
    picked = [queries[i] for i in sorted(rng.choice(len(queries), min(n_queries, len(queries)),
                                                    replace=False))]
    qvecs = encoder.encode([normalise_query(q, 10_000) for q in picked])
    return np.ascontiguousarray(items, dtype=np.float32), np.asarray(qvecs, dtype=np.float32)


def nearest_neighbour_cosine(vectors: np.ndarray, seed: int, sample: int = 2000) -> float:
    """Median over a sample of rows of the cosine to their nearest other row."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), min(sample, len(vectors)), replace=False)
    sims = vectors[pick] @ vectors.T
    sims[np.arange(len(pick)), pick] = -np.inf
    return float(np.median(sims.max(axis=1)))


def scale_up(real: np.ndarray, n: int, parent_cos: float, seed: int) -> np.ndarray:
    """``n`` unit rows: the real ones first, then noisy renormalised copies of random real
    parents whose expected cosine to their parent is ``parent_cos``; see the module docstring."""
    return scale_up_with_parents(real, n, parent_cos, seed)[0]


def scale_up_with_parents(real: np.ndarray, n: int, parent_cos: float,
                          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scale_up`, and the real parent row of every synthetic row (``n - len(real)``).

    For unit ``x`` and noise ``e ~ N(0, s^2 I_d)``, ``cos(x + e, x) ~ 1 / sqrt(1 + d s^2)``,
    so ``s = sqrt((1 / c^2 - 1) / d)``.
    """
    n_real, dim = real.shape
    out = np.empty((max(n, n_real), dim), dtype=np.float32)
    out[:n_real] = real
    parents = np.empty(max(0, n - n_real), dtype=np.int64)
    sigma = float(np.sqrt((1.0 / parent_cos**2 - 1.0) / dim))
    rng = np.random.default_rng(seed)
    for start in range(n_real, n, 65_536):
        stop = min(n, start + 65_536)
        parents[start - n_real:stop - n_real] = rng.integers(0, n_real, stop - start)
        x = real[parents[start - n_real:stop - n_real]]
        x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, parents


def dataset(real: np.ndarray, synthetic: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """The ``n``-item set: a random subset of the real rows, or the real rows plus the first
    ``n - len(real)`` synthetic ones (a prefix view, no copy)."""
    if n <= len(real):
        rng = np.random.default_rng(seed)
        return np.ascontiguousarray(real[np.sort(rng.choice(len(real), n, replace=False))])
    assert synthetic is not None and len(synthetic) >= n
    return synthetic[:n]


# ---------------------------------------------------------------------------- measurement

def _truth(vectors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    from pipelines.catalogue.index import exact_top_k

    return np.vstack([exact_top_k(vectors, queries[i:i + 64], k)
                      for i in range(0, len(queries), 64)])


def _exact_one(vectors: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    sims = vectors @ q
    top = np.argpartition(-sims, k - 1)[:k]
    return top[np.argsort(-sims[top])]


def _median_qps(passes: dict[str, tuple[Any, int]], repeats: int) -> dict[str, float]:
    """Queries/s per method: ``passes`` maps name -> (fn running its queries, query count);
    the methods run interleaved, ``repeats`` times, and the median pass counts."""
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, (fn, _count) in passes.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {name: round(count / float(np.median(seconds[name])), 1)
            for name, (_fn, count) in passes.items()}


def _tune_annoy(vectors: np.ndarray, seed: int, target: float):
    """:func:`pipelines.catalogue.index.tune_index` as a release runs it, with each build timed."""
    from pipelines.catalogue.index import tune_index

    builds: list[dict[str, float]] = []
    t0 = time.perf_counter()
    index, choice = tune_index(vectors, seed, target, on_build=lambda n_trees, seconds: builds.append(
        {"n_trees": n_trees, "seconds": round(seconds, 2)}))
    return index, choice, builds, time.perf_counter() - t0


def _annoy_recall(index: Any, queries: np.ndarray, truth: np.ndarray, search_k: int) -> float:
    from pipelines.catalogue.index import neighbour_recall

    return neighbour_recall([index.get_nns_by_vector(q, K, search_k=search_k) for q in queries], truth)


def bench_size(vectors: np.ndarray, queries: np.ndarray, work: Path, *, label: str, seed: int,
               target: float, hnsw_m: int, hnsw_ef_construction: int, repeats: int,
               exact_queries: int, growth: bool, growth_queries: int) -> dict[str, Any]:
    """All figures for one item set; index files are written under ``work`` and removed."""
    import annoy
    import hnswlib
    from threadpoolctl import threadpool_limits

    from pipelines.catalogue.index import SEARCH_K_FACTORS, neighbour_recall

    n, dim = vectors.shape
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    truth = _truth(vectors, queries)
    log.info("[%s] n=%d: exact truth for %d queries in %.1f s", label, n, len(queries),
             time.perf_counter() - t0)

    # Annoy, exactly as a release tunes it, then saved and memory-mapped back as serving does
    index, choice, builds, tune_s = _tune_annoy(vectors, seed, target)
    annoy_path = work / "index.ann"
    index.save(str(annoy_path))
    index.unload()
    index = annoy.AnnoyIndex(dim, "angular")
    index.load(str(annoy_path))
    configured_recall = _annoy_recall(index, queries, truth, choice.search_k)
    sweep = []
    search_k, factor_i = choice.n_trees * K, 0
    while True:  # the lowest search_k on the chosen trees that reaches the target on real queries
        recall = _annoy_recall(index, queries, truth, search_k)
        sweep.append({"search_k": search_k, "recall_at_10": round(recall, 4)})
        if recall >= target or search_k >= n:
            break
        factor_i += 1
        factor = (SEARCH_K_FACTORS[factor_i] if factor_i < len(SEARCH_K_FACTORS)
                  else SEARCH_K_FACTORS[-1] * 2 ** (factor_i - len(SEARCH_K_FACTORS) + 1))
        search_k = choice.n_trees * K * factor
    query_search_k = sweep[-1]["search_k"]
    log.info("[%s] annoy: tuning %.1f s, n_trees=%d search_k=%d (tuning recall %.3f, real "
             "queries %.3f); lowest search_k for real queries %d (%.3f)", label, tune_s,
             choice.n_trees, choice.search_k, choice.recall_at_10, configured_recall,
             query_search_k, sweep[-1]["recall_at_10"])

    # hnswlib
    hnsw = hnswlib.Index(space="ip", dim=dim)
    t0 = time.perf_counter()
    hnsw.init_index(max_elements=n, M=hnsw_m, ef_construction=hnsw_ef_construction,
                    random_seed=seed)
    hnsw.set_num_threads(2)
    hnsw.add_items(vectors, np.arange(n))
    hnsw_build_s = time.perf_counter() - t0
    hnsw_path = work / "index.hnsw"
    hnsw.save_index(str(hnsw_path))
    hnsw.set_num_threads(1)
    ef_sweep = []
    for ef in EF_GRID:
        hnsw.set_ef(max(ef, K))
        labels, _ = hnsw.knn_query(queries, k=K)
        recall = neighbour_recall(labels.tolist(), truth)
        ef_sweep.append({"ef": ef, "recall_at_10": round(recall, 4)})
        if recall >= target:
            break
    ef = ef_sweep[-1]["ef"]
    hnsw.set_ef(ef)
    log.info("[%s] hnswlib: build %.1f s (2 threads), ef=%d recall %.3f", label, hnsw_build_s,
             ef, ef_sweep[-1]["recall_at_10"])

    # queries/s, single thread, methods interleaved
    exact_q = queries[:exact_queries]
    with threadpool_limits(limits=1):
        passes: dict[str, tuple[Any, int]] = {
            "annoy_configured": (lambda: [index.get_nns_by_vector(q, K, search_k=choice.search_k)
                                          for q in queries], len(queries)),
            "annoy_real_query_tuned": (lambda: [index.get_nns_by_vector(q, K, search_k=query_search_k)
                                                for q in queries], len(queries)),
            "hnswlib": (lambda: [hnsw.knn_query(q, k=K) for q in queries], len(queries)),
            "exact_single": (lambda: [_exact_one(vectors, q) for q in exact_q], len(exact_q)),
        }
        qps = _median_qps(passes, repeats)
    qps.update(_median_qps({"exact_batched": (lambda: _truth(vectors, queries), len(queries))},
                           repeats))
    log.info("[%s] qps %s", label, qps)

    mb = 1024 * 1024
    result: dict[str, Any] = {
        "label": label, "items": n, "queries": len(queries), "target_recall_at_10": target,
        "annoy": {
            "as_configured": {"n_trees": choice.n_trees, "search_k": choice.search_k,
                              "recall_at_10_tuning_sample": round(choice.recall_at_10, 4),
                              "recall_at_10": round(configured_recall, 4),
                              "qps": qps["annoy_configured"]},
            "tuned_on_real_queries": {"search_k": query_search_k,
                                      "recall_at_10": sweep[-1]["recall_at_10"],
                                      "qps": qps["annoy_real_query_tuned"], "sweep": sweep},
            "build_s": builds[-1]["seconds"],
            "tuning_s": round(tune_s, 1), "tuning_builds": builds,
            "size_mb": round(annoy_path.stat().st_size / mb, 1),
        },
        "exact": {"recall_at_10": 1.0, "qps_single": qps["exact_single"],
                  "qps_single_queries": len(exact_q), "qps_batched": qps["exact_batched"],
                  "batched_threads": "numpy default BLAS threads",
                  "size_mb": round(vectors.nbytes / mb, 1)},
        "hnswlib": {"M": hnsw_m, "ef_construction": hnsw_ef_construction, "ef": ef,
                    "recall_at_10": ef_sweep[-1]["recall_at_10"], "qps": qps["hnswlib"],
                    "build_s": round(hnsw_build_s, 1), "build_threads": 2,
                    "size_mb": round(hnsw_path.stat().st_size / mb, 1), "sweep": ef_sweep},
    }
    hnsw = None  # free it before the probe process maps its own copy
    if growth:
        vectors_path = work / "vectors.npy"
        np.save(vectors_path, vectors)
        queries_path = work / "queries.npy"
        np.save(queries_path, queries[:growth_queries])
        result["serving"] = serving_probe_in_process(
            annoy_path, vectors_path, queries_path, hnsw_path, dim=dim, search_k=choice.search_k,
            ef=ef, exact_queries=exact_queries)
        log.info("[%s] serving probe %s", label, result["serving"])
    index.unload()
    shutil.rmtree(work, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------- growth probe

def peak_rss_mb() -> float:
    """This process's peak resident set since it started its program (``VmHWM``). Not
    ``getrusage``'s ``ru_maxrss``: Linux carries that across ``fork`` and ``exec``, so a child
    started by a large parent reports the parent's peak as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("/proc/self/status has no VmHWM line")


def memory_mb() -> dict[str, float]:
    """Resident memory of this process: total, anonymous (heap) and file-backed (mmap)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            fields[name.strip()] = int(parts[0]) / 1024
    return {"rss_mb": round(fields["Rss"], 1), "anon_mb": round(fields["Anonymous"], 1),
            "file_mb": round(fields["Rss"] - fields["Anonymous"], 1),
            "pss_mb": round(fields["Pss"], 1)}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 1) for k in after}


def _percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def serving_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process (see :func:`serving_probe_in_process`): memory and latency of the
    ANN step as a serving process holds and runs it."""
    import annoy
    import hnswlib

    queries = np.load(spec["queries"])
    base = memory_mb()
    index = annoy.AnnoyIndex(spec["dim"], "angular")
    index.load(spec["annoy"])
    vectors = np.load(spec["vectors"], mmap_mode="r")  # as serving.release.load_bundle
    loaded = memory_mb()
    search_k = max(spec["search_k"], SERVING_CANDIDATES)

    def serve(q: np.ndarray) -> None:
        rows = index.get_nns_by_vector(q, SERVING_CANDIDATES, search_k=search_k)
        np.asarray(vectors[rows]) @ q  # the ranker reads the candidates' vectors

    first = []
    for q in queries:  # first pass maps the pages the queries need
        t0 = time.perf_counter()
        serve(q)
        first.append(time.perf_counter() - t0)
    served = memory_mb()
    steady = []
    for q in queries:
        t0 = time.perf_counter()
        serve(q)
        steady.append(time.perf_counter() - t0)
    k10 = []
    for q in queries:
        t0 = time.perf_counter()
        index.get_nns_by_vector(q, K, search_k=spec["search_k"])
        k10.append(time.perf_counter() - t0)
    after_annoy = memory_mb()
    index.unload()
    vectors = None  # unmap

    in_ram_before = memory_mb()
    matrix = np.load(spec["vectors"])
    in_ram = memory_mb()
    exact = []
    for q in queries[:spec["exact_queries"]]:
        t0 = time.perf_counter()
        _exact_one(matrix, q, SERVING_CANDIDATES)
        exact.append(time.perf_counter() - t0)
    del matrix

    hnsw_before = memory_mb()
    hnsw = hnswlib.Index(space="ip", dim=spec["dim"])
    hnsw.load_index(spec["hnsw"])
    hnsw.set_num_threads(1)
    hnsw.set_ef(spec["ef"])
    hnsw_loaded = memory_mb()
    hnsw_lat = []
    for q in queries:
        t0 = time.perf_counter()
        hnsw.knn_query(q, k=K)
        hnsw_lat.append(time.perf_counter() - t0)
    return {
        "baseline": base,
        "annoy_mmap": {"after_load": _delta(loaded, base),
                       "after_first_pass": _delta(served, base),
                       "after_all_queries": _delta(after_annoy, base)},
        "vectors_in_ram": _delta(in_ram, in_ram_before),
        "hnswlib_in_ram": _delta(hnsw_loaded, hnsw_before),
        "latency": {
            "annoy_serving_100_candidates_first_pass": _percentiles_ms(first),
            "annoy_serving_100_candidates": _percentiles_ms(steady),
            "annoy_k10": _percentiles_ms(k10),
            "exact_top100_in_ram": _percentiles_ms(exact),
            "hnswlib_k10": _percentiles_ms(hnsw_lat),
        },
        "queries": len(queries), "exact_queries": len(exact), "threads": 1,
    }


def serving_probe_in_process(annoy_path: Path, vectors_path: Path, queries_path: Path,
                             hnsw_path: Path, *, dim: int, search_k: int, ef: int,
                             exact_queries: int) -> dict[str, Any]:
    """:func:`serving_probe` in a fresh single-threaded Python process, so its memory is only
    what loading and querying add."""
    spec = {"annoy": str(annoy_path), "vectors": str(vectors_path), "queries": str(queries_path),
            "hnsw": str(hnsw_path), "dim": dim, "search_k": search_k, "ef": ef,
            "exact_queries": exact_queries}
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    code = ("import json, sys; from pipelines.benchmarks.ann import serving_probe; "
            "print(json.dumps(serving_probe(json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- CLI

def _growth_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        s = r.get("serving")
        if s is None:
            continue
        lat = s["latency"]
        rows.append({
            "items": r["items"], "source": r["label"],
            "annoy_build_s": r["annoy"]["build_s"], "annoy_tuning_s": r["annoy"]["tuning_s"],
            "annoy_n_trees": r["annoy"]["as_configured"]["n_trees"],
            "annoy_search_k": r["annoy"]["as_configured"]["search_k"],
            "annoy_file_mb": r["annoy"]["size_mb"], "vectors_file_mb": r["exact"]["size_mb"],
            "rss_after_load_mb": s["annoy_mmap"]["after_load"]["rss_mb"],
            "rss_after_queries_mb": s["annoy_mmap"]["after_all_queries"]["rss_mb"],
            "rss_after_queries_file_backed_mb": s["annoy_mmap"]["after_all_queries"]["file_mb"],
            "vectors_in_ram_rss_mb": s["vectors_in_ram"]["rss_mb"],
            "hnswlib_in_ram_rss_mb": s["hnswlib_in_ram"]["rss_mb"],
            "annoy_serving_p50_ms": lat["annoy_serving_100_candidates"]["p50_ms"],
            "annoy_serving_p99_ms": lat["annoy_serving_100_candidates"]["p99_ms"],
            "annoy_k10_p50_ms": lat["annoy_k10"]["p50_ms"],
            "annoy_k10_p99_ms": lat["annoy_k10"]["p99_ms"],
            "exact_p50_ms": lat["exact_top100_in_ram"]["p50_ms"],
            "exact_p99_ms": lat["exact_top100_in_ram"]["p99_ms"],
            "hnswlib_k10_p50_ms": lat["hnswlib_k10"]["p50_ms"],
            "hnswlib_k10_p99_ms": lat["hnswlib_k10"]["p99_ms"],
        })
    return rows


def add_arguments(p: Any) -> None:
    p.add_argument("--products", type=Path, default=SHARED_HOMEDEPOT / "products.parquet",
                   help="catalogue whose titles are embedded (default: Home Depot)")
    p.add_argument("--judgments", type=Path, default=SHARED_HOMEDEPOT / "judgments.parquet",
                   help="judged data whose 'query' column gives the queries")
    p.add_argument("--vectors-cache", type=Path, default=None,
                   help="DuckDB embedding cache (default: <home>/cache/embeddings.duckdb, "
                        "as `instantrec eval`)")
    p.add_argument("--vectors", type=Path, default=None,
                   help="item vectors (.npy, unit rows) instead of embedding --products; "
                        "needs --query-vectors")
    p.add_argument("--query-vectors", type=Path, default=None, help="query vectors (.npy)")
    p.add_argument("--queries", type=int, default=300, help="real queries to encode")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="comma-separated item counts for the scale-up and growth table; "
                        "'' for the real catalogue only")
    p.add_argument("--no-real", action="store_true", help="skip the real catalogue point")
    p.add_argument("--no-growth", action="store_true", help="skip the serving memory probe")
    p.add_argument("--parent-cos", type=float, default=None,
                   help="synthetic child-parent cosine (default: median real NN cosine)")
    p.add_argument("--target", type=float, default=0.95, help="recall@10 target")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--hnsw-ef-construction", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per method (median)")
    p.add_argument("--exact-queries", type=int, default=100,
                   help="queries timed for one-at-a-time exact search")
    p.add_argument("--growth-queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)


def run(settings: Settings, args: Any) -> dict[str, Any]:
    from importlib.metadata import version

    t_start = time.perf_counter()
    if args.vectors is not None:
        real = np.load(args.vectors).astype(np.float32)
        queries = np.load(args.query_vectors).astype(np.float32)
        source = str(args.vectors)
    else:
        cache = args.vectors_cache or embedding_cache(settings.home)
        real, queries = load_real(args.products, args.judgments, cache, settings.encoder_path,
                                  settings.item_max_tokens, args.queries, args.seed)
        source = str(args.products)
    log.info("real vectors %s, %d queries", real.shape, len(queries))
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    parent_cos = args.parent_cos or nearest_neighbour_cosine(real, args.seed)
    synthetic = None
    if sizes and max(sizes) > len(real):
        t0 = time.perf_counter()
        synthetic = scale_up(real, max(sizes), parent_cos, args.seed)
        log.info("scale-up to %d vectors in %.1f s (parent cosine %.3f)", len(synthetic),
                 time.perf_counter() - t0, parent_cos)
    common = {"seed": args.seed, "target": args.target, "hnsw_m": args.hnsw_m,
              "hnsw_ef_construction": args.hnsw_ef_construction, "repeats": args.repeats,
              "exact_queries": args.exact_queries, "growth": not args.no_growth,
              "growth_queries": args.growth_queries}
    work = Path(tempfile.mkdtemp(prefix="instantrec-bench-ann-"))
    results = []
    try:
        points = ([] if args.no_real else [("real", real)]) + [
            ("real subset" if n <= len(real) else "real + synthetic",
             dataset(real, synthetic, n, args.seed)) for n in sizes]
        for i, (label, vectors) in enumerate(points):
            results.append(bench_size(vectors, queries, work / str(i), label=label, **common))
            log.info("result %s", json.dumps(results[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "source": source, "real_items": len(real), "queries": len(queries),
        "synthetic": {"method": "real parent + Gaussian noise, renormalised",
                      "parent_cosine": round(parent_cos, 4)},
        "results": results,
        "growth": _growth_table(results),
        "libraries": {name: version(name) for name in ("annoy", "hnswlib", "numpy")},
        "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
