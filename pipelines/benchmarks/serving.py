"""Serving latency and throughput: recommend() p50/p95/p99, qps and peak RSS per query encoder.

Runs on a real release of a judged catalogue (default: the 54,667 Home Depot products), built
once under ``<home>/bench/serving-<data set>`` and kept up to date. Each repeat starts one fresh
serving process per encoder backend (torch, onnx), alternating, so peers share the machine's
load and every process starts cold; figures are medians over repeats.

In each process, after a warm-up:
- ``unseen``: real judged queries never asked before in that process (encoder, lexical and
  every other cache miss);
- ``cached``: the most recent 100 of those asked again (a hot query: embedding and BM25
  scores both cached);
- ``session``: other unseen queries, each with a session that has three recorded clicks;
- ``stages``: where an unseen query's time goes (encode, ANN, BM25, ranker), timed by calling
  the same steps one by one;
- ``qps``: single-thread requests/s over the unseen queries; ``peak_rss_mb``: the process's
  peak resident set (torch is always loaded: the batch path and the ONNX check need it).

``--quality`` adds the check that decides whether a query backend may serve: dense-channel
nDCG@10 with queries encoded by torch, ONNX fp32 and ONNX int8, items embedded by torch (from
an embedding cache), on both judged data sets.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.settings import Settings

log = logging.getLogger(__name__)

DATA = Path("../shared/data")
BACKENDS = ("torch", "onnx")
HOT_QUERIES = 100   # within both the encoder's and the lexical scores' LRU caches
SESSION_CLICKS = 3


# -- the release ----------------------------------------------------------------------------

def _seed_vectors(settings: Settings, encoder: Any, cache_path: Path) -> int:
    """Reuse vectors of an evaluation embedding cache for items whose exact text (hash of the
    embedded string) was embedded there under the same encoder version; returns how many.

    Written as an embed shard file and folded in by ``store_vectors``, so the items left over
    are embedded as usual and nothing is trusted that another text or encoder produced.
    """
    import duckdb
    import polars as pl

    from pipelines.embed import pending_items, shard_dir, store_vectors
    from pipelines.evaluation import read_cached, text_key
    from serving.text import item_text

    todo = pending_items(settings.warehouse_path, encoder.version)
    if todo.height == 0 or not cache_path.is_file():
        return 0
    keys = [text_key(item_text(r["title"], r["brand"], r["category"], r["description"]))
            for r in todo.iter_rows(named=True)]
    con = duckdb.connect(str(cache_path), read_only=True)
    try:
        found, matrix = read_cached(con, encoder.version, keys, encoder.dim)
    finally:
        con.close()
    hit = [i for i, k in enumerate(keys) if k in found]
    if not hit:
        return 0
    frame = todo[hit].select("item_id", "content_hash").with_columns(
        pl.Series("vector", matrix[[found[keys[i]] for i in hit]],
                  dtype=pl.Array(pl.Float32, encoder.dim)))
    out = shard_dir(settings.work_dir, encoder.version) / "shard-seed.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    frame.write_parquet(tmp)
    os.replace(tmp, out)
    return store_vectors(settings.warehouse_path, settings.work_dir, encoder.version)


def prepare_release(settings: Settings, products: Path, home: Path,
                    seed_cache: Path | None = None) -> dict[str, Any]:
    """A published release of ``products`` (product_uid/item_id, title) under ``home``,
    built by the real pipeline steps; re-running them is cheap when nothing changed (no item
    is re-embedded and an identical release is kept), and rebuilds the index when the code
    that builds it changed."""
    import polars as pl

    from pipelines.judged import load_products
    from pipelines.steps import run_embed, run_evaluate, run_index, run_ingest, run_publish
    from serving.encoder import Encoder
    from serving.release import read_pointer

    bench = settings.model_copy(update={"home": home, "golden_queries": None, "judgments": None})
    before = read_pointer(bench.releases_dir)
    start = time.perf_counter()
    home.mkdir(parents=True, exist_ok=True)
    catalogue = home / "catalogue.parquet"
    items = load_products(products).select(pl.col("item_id").alias("id"), "title", "description")
    items.write_parquet(catalogue)
    encoder = Encoder(settings.encoder_path, max_length=settings.item_max_tokens)
    out: dict[str, Any] = {"ingest": run_ingest(bench, catalogue)}
    out["seeded_vectors"] = _seed_vectors(bench, encoder, seed_cache) if seed_cache else 0
    out["embedded"] = run_embed(bench, encoder=encoder)["embedded"]
    bundle = run_index(bench, encoder)["bundle_dir"]
    out["gate"] = run_evaluate(bench, bundle, encoder=encoder)["gate"]
    out["publish"] = run_publish(bench, bundle)
    after = read_pointer(bench.releases_dir)
    out["reused"] = before is not None and after is not None and (
        before.release_id == after.release_id)
    out["build_seconds"] = round(time.perf_counter() - start, 1)
    return out


# -- one serving process --------------------------------------------------------------------

def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "n": len(ms)}


def _timed(fn: Any, args_list: list[tuple[Any, ...]]) -> list[float]:
    out = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def measure_process(home: str, backend: str, plan: dict[str, list[str]], k: int) -> dict[str, Any]:
    """Everything measured inside one serving process (run by :func:`_child`)."""
    from serving.ranker import query_key
    from serving.recommender import Recommender, _lexical_top, _relative_scores, _search
    from serving.session import session_signal

    t0 = time.perf_counter()
    settings = Settings(home=Path(home), encoder_backend=backend)  # type: ignore[arg-type]
    rec = Recommender.load(home, settings=settings, watch=False)
    load_s = time.perf_counter() - t0
    for q in plan["warmup"]:
        rec.recommend(q, k=k)
        rec.recommend(q, k=k)

    unseen = _timed(lambda q: rec.recommend(q, k=k), [(q,) for q in plan["unseen"]])
    hot = plan["unseen"][-HOT_QUERIES:]
    cached = _timed(lambda q: rec.recommend(q, k=k),
                    [(hot[i % len(hot)],) for i in range(len(plan["unseen"]))])

    # sessions with clicks on results of a warm-up query, then an unseen query in each
    ids = rec.bundle.items.item_ids
    rng = random.Random(7)
    sessions = []
    run_id = f"{os.getpid()}-{time.time_ns()}"  # the log ignores a re-sent event id
    for i, _ in enumerate(plan["session"]):
        sid = f"bench-{run_id}-s{i}"
        rec.record_many([{"event_id": f"{sid}-{c}", "session_id": sid, "type": "click",
                          "item_id": str(ids[rng.randrange(len(ids))]), "position": c + 1}
                         for c in range(SESSION_CLICKS)])
        sessions.append(sid)
    live_sessions = sum(rec._sessions.get(sid) is not None for sid in sessions)
    session = _timed(lambda q, s: rec.recommend(q, k=k, session_id=s),
                     list(zip(plan["session"], sessions, strict=True)))

    # stages of an unseen query, each step on its own (no cache in between)
    bundle, state = rec.bundle, rec._state
    depth = max(k, settings.candidates)
    stage: dict[str, list[float]] = {"encode": [], "ann": [], "bm25": [], "ranker": []}
    for q in plan["stages"]:
        t = [time.perf_counter()]
        vec = rec.encoder._embed_one(q)
        t.append(time.perf_counter())
        rows, _ = _search(bundle, vec, depth, None)
        t.append(time.perf_counter())
        lex = _relative_scores(bundle, q) if bundle.lexical is not None else None
        if lex is not None:
            rows = list(dict.fromkeys(rows + _lexical_top(lex, depth, None, bundle)))
        t.append(time.perf_counter())
        arr = np.asarray(rows)
        state.ranker.logits(vec.astype(np.float64), np.asarray(bundle.vectors[arr], np.float64),
                            session_signal(None), arr, lex[arr] if lex is not None else None,
                            query_key(q))
        t.append(time.perf_counter())
        for name, a, b in zip(stage, t, t[1:], strict=False):
            stage[name].append(b - a)

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    from pipelines.benchmarks.ann import _memory_mb

    return {
        "memory_at_end": _memory_mb(),  # anonymous (heap) vs file-backed (mapped) pages
        "backend": rec.encoder.backend, "n_items": len(bundle.items), "load_s": round(load_s, 2),
        "unseen": _percentiles(unseen), "cached": _percentiles(cached),
        "session": {**_percentiles(session), "sessions_with_clicks": live_sessions},
        "stages_p50_ms": {n: round(float(np.median(v)) * 1e3, 2) for n, v in stage.items()},
        "stages_p99_ms": {n: round(float(np.percentile(v, 99)) * 1e3, 2)
                          for n, v in stage.items()},
        "qps": round(len(unseen) / sum(unseen), 1),
        "qps_cached": round(len(cached) / sum(cached), 1),
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def _child() -> None:
    """Entry point of a serving process: reads its plan as JSON on stdin, prints figures."""
    job = json.loads(sys.stdin.read())
    print(json.dumps(measure_process(job["home"], job["backend"], job["plan"], job["k"])))


def _run_child(home: Path, backend: str, plan: dict[str, list[str]], k: int) -> dict[str, Any]:
    job = json.dumps({"home": str(home), "backend": backend, "plan": plan, "k": k})
    proc = subprocess.run(
        [sys.executable, "-c", "from pipelines.benchmarks.serving import _child; _child()"],
        input=job, capture_output=True, text=True, check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"serving benchmark process ({backend}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plan(judgments: Path, n: int, seed: int = 0) -> dict[str, list[str]]:
    """Disjoint sets of distinct, normalised real queries."""
    from pipelines.judged import load_judgments
    from serving.text import normalise_query

    raw = load_judgments(judgments).queries()["query"].to_list()
    queries = sorted({normalise_query(q, 10_000) for q in raw})
    random.Random(seed).shuffle(queries)
    warm, n = min(20, len(queries) // 8), min(n, (len(queries) - min(20, len(queries) // 8)) // 3)
    if n < 1:
        raise ValueError(f"{judgments} has too few distinct queries for the benchmark")
    rest = queries[warm:]
    return {"warmup": queries[:warm], "unseen": rest[:n], "session": rest[n:2 * n],
            "stages": rest[2 * n:3 * n]}


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": runs[0]["backend"], "n_items": runs[0]["n_items"],
                           "runs": len(runs)}
    for part in ("unseen", "cached", "session"):
        out[part] = {p: round(float(np.median([r[part][p] for r in runs])), 2)
                     for p in ("p50_ms", "p95_ms", "p99_ms")}
        out[part]["n_per_run"] = runs[0][part]["n"]
    out["session"]["sessions_with_clicks_min"] = min(r["session"].get("sessions_with_clicks", 0)
                                                     for r in runs)
    for part in ("stages_p50_ms", "stages_p99_ms"):
        out[part] = {s: round(float(np.median([r[part][s] for r in runs])), 2)
                     for s in runs[0][part]}
    for key in ("qps", "qps_cached", "peak_rss_mb", "load_s", "loadavg_1m"):
        out[key] = round(float(np.median([r[key] for r in runs])), 2)
    return out


# -- quality of a query backend -------------------------------------------------------------

def query_backend_quality(encoder_path: Path | None, data: dict[str, tuple[Path, Path]],
                          embed_cache: Path, onnx_cache: Path | None) -> dict[str, Any]:
    """Dense-channel nDCG@10 (retrieval protocol; CrowdFlower also re-rank) per query backend,
    items embedded by torch through ``embed_cache``; and the cosine of each backend's query
    vectors to torch's."""
    from pipelines.evaluation import embed_cached, product_texts
    from pipelines.judged import load_judgments, load_products, score_rankings
    from serving.encoder import Encoder
    from serving.onnx_encoder import OnnxQueryEncoder
    from serving.text import normalise_query

    torch_enc = Encoder(encoder_path)
    onnx = {v: OnnxQueryEncoder(torch_enc.path, torch_enc.revision, torch_enc.max_length,
                                onnx_cache, variant=v) for v in ("fp32", "int8")}

    def batched(fn: Any, texts: list[str]) -> np.ndarray:
        return np.vstack([fn(texts[i:i + 64]) for i in range(0, len(texts), 64)])

    out: dict[str, Any] = {}
    for name, (products_path, judgments_path) in data.items():
        products = load_products(products_path)
        judgments = load_judgments(judgments_path)
        items = embed_cached(torch_enc, product_texts(products), embed_cache, progress=False)
        ids = products["item_id"].to_list()
        queries = judgments.queries()
        qids = queries["query_id"].to_list()
        texts = [normalise_query(q, 10_000) for q in queries["query"].to_list()]
        qv = {"torch": torch_enc.encode(texts),
              "onnx_fp32": batched(onnx["fp32"].encode, texts),
              "onnx_int8": batched(onnx["int8"].encode, texts)}
        judged = dict(judgments.frame.group_by("query_id").agg("item_id").iter_rows())
        row_of = {item: i for i, item in enumerate(ids)}
        res: dict[str, Any] = {"queries": len(qids)}
        for backend, vecs in qv.items():
            sims = items @ vecs.T   # (items, queries)
            retrieval = {}
            for j, qid in enumerate(qids):
                top = np.argpartition(-sims[:, j], 99)[:100]
                retrieval[qid] = [ids[i] for i in top[np.argsort(-sims[top, j], kind="stable")]]
            entry = {"retrieval_ndcg@10": round(score_rankings(retrieval, judgments,
                                                               "retrieval")[0]["ndcg@10"], 4)}
            if name == "crowdflower":
                rerank = {}
                for j, qid in enumerate(qids):
                    rows = np.array([row_of[i] for i in judged[qid] if i in row_of])
                    rerank[qid] = [ids[i] for i in rows[np.argsort(-sims[rows, j], kind="stable")]]
                entry["rerank_ndcg@10"] = round(score_rankings(rerank, judgments,
                                                               "rerank")[0]["ndcg@10"], 4)
            cos = np.sum(vecs * qv["torch"], axis=1)
            entry["cosine_to_torch_min"] = round(float(cos.min()), 5)
            entry["cosine_to_torch_mean"] = round(float(cos.mean()), 5)
            res[backend] = entry
        for backend in ("onnx_fp32", "onnx_int8"):
            res[backend]["retrieval_ndcg_delta"] = round(
                res[backend]["retrieval_ndcg@10"] - res["torch"]["retrieval_ndcg@10"], 4)
        out[name] = res
    return out


# -- the command ----------------------------------------------------------------------------

def add_arguments(p: Any) -> None:
    p.add_argument("--products", type=Path, default=DATA / "homedepot" / "products.parquet")
    p.add_argument("--judgments", type=Path, default=DATA / "homedepot" / "judgments.parquet",
                   help="real queries to ask (query column)")
    p.add_argument("--queries", type=int, default=300, help="unseen queries per process")
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh processes per backend (0: skip the latency part)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    p.add_argument("--work", type=Path, default=None,
                   help="release directory (default <home>/bench/serving-<data set>)")
    p.add_argument("--seed-cache", type=Path, default=None,
                   help="evaluation embedding cache (DuckDB) to reuse item vectors from")
    p.add_argument("--quality", action="store_true",
                   help="also check query backends' dense nDCG@10 on both judged data sets")
    p.add_argument("--embed-cache", type=Path, default=None,
                   help="item embedding cache for --quality (default <home>/cache/embeddings.duckdb)")


def _latency(settings: Settings, args: Any) -> dict[str, Any]:
    work = args.work or settings.home / "bench" / f"serving-{args.products.parent.name}"
    work = work.resolve()
    build = prepare_release(settings, args.products, work, args.seed_cache)
    plan = _plan(args.judgments, args.queries)
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for i in range(args.repeats):
        for b in backends if i % 2 == 0 else backends[::-1]:  # alternate who goes first
            runs[b].append(_run_child(work, b, plan, args.k))
    per_backend = {b: _median_of(r) for b, r in runs.items()}
    default = settings.encoder_backend if settings.encoder_backend in per_backend else backends[0]
    top = per_backend[default]
    return {
        "n_items": top["n_items"], "default_backend": default,
        "unseen": top["unseen"], "cached": top["cached"], "session": top["session"],
        "qps": top["qps"], "qps_measured_on": "unseen queries, one thread",
        "peak_rss_mb": top["peak_rss_mb"], "stages_p50_ms": top["stages_p50_ms"],
        "backends": per_backend, "repeats": args.repeats, "queries_per_run": len(plan["unseen"]),
        "release": str(work), "build": build, "cpus": os.cpu_count(),
    }


def run(settings: Settings, args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.repeats > 0:  # --repeats 0 --quality: only the quality check
        out = _latency(settings, args)
    if args.quality:
        data = {name: (DATA / name / "products.parquet", DATA / name / "judgments.parquet")
                for name in ("homedepot", "crowdflower")}
        out["quality"] = query_backend_quality(
            settings.encoder_path, data,
            args.embed_cache or settings.home / "cache" / "embeddings.duckdb", None)
    return out
