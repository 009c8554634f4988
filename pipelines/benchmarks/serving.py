"""Serving latency and throughput of the served path as a shop runs it after a retrain.

Runs on a real release of a judged catalogue (default: the 54,667 Home Depot products), built
once under ``<home>/bench/serving-<data set>`` and kept up to date. The bench catalogue carries
**synthetic** prices and stock (:func:`synthetic_offers`, deterministic from the item id, in
the benchmark's own catalogue file only), so business filters have something to filter.

What a shop runs after a retrain (:func:`prepare_ranker`, cached in the bench home by release
and model inputs, so a rerun fits nothing):

- the judged queries are split by a salted hash of their normalised text: the relevance model
  (ridge + compiled trees, :mod:`serving.relevance`) is fitted on the training part by the
  batch retrain's own :func:`pipelines.learning.retrain.fit_relevance` (its gate included) and
  published as the live ranker checkpoint; only held-out queries are ever asked as "unseen";
- the (query, item) memory gets real entries: synthetic position-biased clicks on result
  pages of training queries (shown as served, clicked with probability ~ judged gain / rank)
  are replayed through the real nearline updater, which publishes the checkpoint served.

Each repeat starts one fresh serving process per (ranker, encoder backend): ``relevance`` (the
live checkpoint above) and ``zero-shot`` (the same release with the untrained ranker, the
figures the README quoted before); figures are medians over repeats. In each process, after a
warm-up:

- ``unseen``: held-out queries never asked before in that process (every cache misses); a
  share of them (``--filter-share``) carries business filters (stock, price ranges), and
  every result of a filtered request is checked against its filters;
- ``stages``: where an unseen request's time goes, measured inside the real ``recommend()``
  call (its ``timings`` hook): parse, understand, encode, session, BM25, filters, ANN, union,
  vectors, relevance features (incl. term coverage), relevance scoring, ranker (online terms,
  the (query, item) memory), results;
- ``cached``: the most recent 100 plain unseen queries asked again (a hot query);
- ``memory``: training queries with clicks in the memory, first time in the process;
- ``session``: other held-out queries, each with a session that has three recorded clicks;
- ``concurrency``: p50/p99 and qps with 1, 2 and 4 client threads sharing the process, each
  level on its own held-out queries;
- ``levers``: the term coverage read from postings of the candidates against whole-catalogue
  score vectors (time and exact equality), and Annoy ``search_k`` against recall@10/@depth of
  real query vectors (versus exact search) and the ANN stage's time;
- ``qps``: single-thread requests/s over the unseen queries; ``peak_rss_mb``: the process's
  peak resident set (torch is loaded only where the ONNX query model's check against it is
  not yet recorded, see :mod:`serving.onnx_encoder`).

``--batch-job embed`` measures the same under a concurrent batch job, as on a shop's box while
the catalogue refresh runs: before each serving process starts, a separate process begins
embedding the bench catalogue's titles with the real encoder (catalogue precision, in
``--batch-threads`` torch threads) in a loop, and it is stopped by its PID once the serving
process is done; its items/s during the run are reported beside the latency figures.

``--quality`` adds the check that decides whether a query backend may serve: dense-channel
nDCG@10 with queries encoded by torch, ONNX fp32 and ONNX int8, items embedded by torch (from
an embedding cache), on both judged data sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.offline.splits import hash_unit
from serving.layout import bench_dir, embedding_cache
from serving.manifest import sha256_file
from serving.schema import CONTENT_HASH, ITEM_ID, QUERY_ID
from serving.settings import Settings

log = logging.getLogger(__name__)

DATA = Path("../shared/data")
BACKENDS = ("torch", "onnx")
RANKERS = ("relevance", "zero-shot")
HOT_QUERIES = 100   # within both the encoder's and the lexical scores' LRU caches
SESSION_CLICKS = 3
CONCURRENCY = (1, 2, 4)
SPLIT_SALT = "bench-serving-split-v1"
#: Business filters a filtered request carries, in turn (the bench catalogue's synthetic
#: prices are log-uniform over 2..800, 90% of items in stock).
FILTER_MIX: tuple[dict[str, Any], ...] = (
    {"in_stock": True}, {"max_price": 50.0}, {"min_price": 20.0, "max_price": 200.0,
                                               "in_stock": True})
SEARCH_K_FACTORS = (0.5, 1.0, 2.0)
OFFERS_LABEL = ("synthetic: price log-uniform 2..800 and in stock 90%, from a hash of the item "
                "id (Home Depot has no prices or stock)")


# -- the release ----------------------------------------------------------------------------

def synthetic_offers(item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Made-up (price, in_stock) per item id, the same on every machine and run: price
    log-uniform over 2..800 (two decimals), in stock nine times in ten."""
    prices, stock = np.empty(len(item_ids)), np.empty(len(item_ids), dtype=bool)
    for i, item in enumerate(item_ids):
        h = hashlib.blake2b(str(item).encode(), digest_size=8, person=b"bench-offers").digest()
        prices[i] = round(2.0 * 400.0 ** (int.from_bytes(h[:4], "big") / 2**32), 2)
        stock[i] = h[4] % 10 != 0
    return prices, stock


def _seed_vectors(settings: Settings, encoder: Any, cache_path: Path) -> int:
    """Reuse vectors of an evaluation embedding cache for items whose exact text (hash of the
    embedded string) was embedded there under the same encoder version; returns how many.

    Written as an embed shard file and folded in by ``store_vectors``, so the items left over
    are embedded as usual and nothing is trusted that another text or encoder produced.
    """
    import duckdb
    import polars as pl

    from pipelines.catalogue.embed import pending_items, shard_dir, store_vectors
    from pipelines.offline.evaluation import read_cached, text_key
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
    frame = todo[hit].select(ITEM_ID, CONTENT_HASH).with_columns(
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
    """A published release of ``products`` (product_uid/item_id, title) under ``home``, with
    :func:`synthetic_offers`, built by the real pipeline steps; re-running them is cheap when
    nothing changed (no item is re-embedded and an identical release is kept), and rebuilds
    the index when the code that builds it changed."""
    import polars as pl

    from pipelines.offline.judged import load_products
    from pipelines.steps import run_embed, run_evaluate, run_index, run_ingest, run_publish
    from serving.encoder import Encoder
    from serving.release import read_pointer

    bench = settings.model_copy(update={"home": home, "golden_queries": None, "judgments": None})
    before = read_pointer(bench.releases_dir)
    start = time.perf_counter()
    home.mkdir(parents=True, exist_ok=True)
    catalogue = home / "catalogue.parquet"
    items = load_products(products).select(pl.col(ITEM_ID).alias("id"), "title", "description")
    prices, stock = synthetic_offers(items["id"].to_list())
    items = items.with_columns(pl.Series("price", [f"{p:.2f}" for p in prices]),
                               pl.Series("in_stock", ["true" if s else "false" for s in stock]))
    items.write_parquet(catalogue)
    encoder = Encoder(settings.encoder_path, max_length=settings.item_max_tokens)
    out: dict[str, Any] = {"ingest": run_ingest(bench, catalogue), "offers": OFFERS_LABEL}
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


# -- what a shop runs after a retrain -------------------------------------------------------

def in_training_split(text: str, train_share: float) -> bool:
    """Whether a normalised query trains the bench's relevance model (a salted hash of the
    text, so the split is the same on every run and machine); the rest are held out."""
    return hash_unit(f"{SPLIT_SALT}:{text}") < train_share


def training_judgments(judgments: Path, item_ids: Sequence[str], out_dir: Path,
                       train_share: float, max_queries: int | None) -> tuple[Path, list[str]]:
    """The training part of ``judgments`` as a judgments file of its own (queries that judge
    at least one item of the catalogue, at most ``max_queries`` of them, chosen by hash), and
    those queries' normalised texts."""
    import polars as pl

    from pipelines.offline.judged import id_column, read_table
    from serving.text import normalise_query

    raw = read_table(judgments)
    col = id_column(raw, judgments)
    raw = raw.with_columns(pl.col("query").map_elements(
        lambda q: normalise_query(q, 10_000), return_dtype=pl.String).alias("_text"))
    known = raw.filter(pl.col(col).cast(pl.String).is_in(list(item_ids)))
    texts = sorted({t for t in known["_text"].unique().to_list()
                    if in_training_split(t, train_share)},
                   key=lambda t: hashlib.sha256(t.encode()).digest())
    if max_queries:
        texts = texts[:max_queries]
    out_dir.mkdir(parents=True, exist_ok=True)
    train = raw.filter(pl.col("_text").is_in(texts)).drop("_text")
    tmp = out_dir / f".train-{os.getpid()}.parquet"
    train.write_parquet(tmp)
    path = out_dir / f"judgments-train-{sha256_file(tmp)[:16]}.parquet"
    os.replace(tmp, path)
    return path, texts


def _fitted_relevance(bench: Settings, bundle: Any, encoder: Any, train: Path,
                      cache: Path) -> tuple[Any, dict[str, Any]]:
    """The relevance model the batch retrain fits on ``train`` against this release (cached
    as ``cache``.npz/.json); if its gate refuses it, the same recipe fitted anyway, marked."""
    from pipelines.learning.retrain import fit_relevance, relevance_data
    from pipelines.offline.judged import load_judgments
    from serving.query import parse_steps
    from serving.relevance import RelevanceModel
    from serving.retrieval import QueryRelevance

    arrays, report_path = cache.with_suffix(".npz"), cache.with_suffix(".json")
    if arrays.is_file() and report_path.is_file():
        with np.load(arrays, allow_pickle=False) as data:
            model = RelevanceModel.from_arrays({k: data[k] for k in data.files})
        return model, {**json.loads(report_path.read_text()), "cached": True}
    start = time.perf_counter()
    lookup = QueryRelevance(bundle, encoder, parse_steps(bench.query_steps), bench.candidates)
    fit_settings = bench.model_copy(update={"judgments": train, "relevance_source": "judgments"})
    model, report = fit_relevance(fit_settings, lookup)
    report["gate_passed"] = model is not None
    if model is None:
        log.warning("the relevance model failed its gate (%s); served anyway for the benchmark",
                    report)
        data = relevance_data(load_judgments(train), lookup)
        model = RelevanceModel.fit([d[1] for d in data.values()], [d[2] for d in data.values()],
                                   source="judgments")
    report["fit_seconds"] = round(time.perf_counter() - start, 1)
    report["trees"] = model.trees is not None
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = arrays.with_name(f".{arrays.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        np.savez(fh, **model.to_arrays())
    os.replace(tmp, arrays)
    report_path.write_text(json.dumps(report, sort_keys=True, default=str))
    return model, {**report, "cached": False}


def synthetic_clicks(rec: Any, texts: Sequence[str], gains: dict[str, dict[str, float]],
                     pages: int, k: int, seed: int, tag: str) -> list[dict[str, Any]]:
    """Impressions of each query's first result page as ``rec`` serves it, ``pages`` times
    (one session each), and one click per page at rank p with probability proportional to
    (0.1 + judged gain) / p: position-biased, and drawn to what the judges found relevant."""
    rng = random.Random(seed)
    now = time.time() - 600.0
    events: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        shown = [r.item_id for r in rec.recommend(text, k=k)]
        if not shown:
            continue
        judged = gains.get(text, {})
        weights = [(0.1 + judged.get(item, 0.0)) / pos for pos, item in enumerate(shown, 1)]
        for page in range(pages):
            sid = f"bench-{tag}-{i}-{page}"
            ts = now + (i * pages + page) * 1e-3
            events += [{"event_id": f"{sid}-i{pos}", "session_id": sid, "type": "impression",
                        ITEM_ID: item, "query": text, "position": pos, "ts": ts}
                       for pos, item in enumerate(shown, 1)]
            pos = rng.choices(range(1, len(shown) + 1), weights=weights)[0]
            events.append({"event_id": f"{sid}-c", "session_id": sid, "type": "click",
                           ITEM_ID: shown[pos - 1], "query": text, "position": pos,
                           "ts": ts + 0.5})
    return events


def prepare_ranker(settings: Settings, work: Path, judgments: Path, *, train_share: float,
                   max_train_queries: int | None, click_queries: int, pages: int,
                   k: int = 10, seed: int = 0) -> dict[str, Any]:
    """Make the bench home's live ranker what a shop runs after a retrain: the relevance model
    fitted on the training split of ``judgments`` (:func:`_fitted_relevance`) under a fresh
    ranker, then ``pages`` pages of :func:`synthetic_clicks` on ``click_queries`` training
    queries replayed through the nearline updater (the (query, item) memory). Reuses the live
    checkpoint when it was made from the same inputs. Returns what was set up."""
    import serving.relevance as relevance_module
    from pipelines.learning.nearline import NearlineUpdater
    from pipelines.offline.judged import load_judgments
    from serving.checkpoint import load_latest, publish_checkpoint
    from serving.eventlog import SqliteEventLog
    from serving.events import parse_event
    from serving.ranker import Ranker
    from serving.recommender import Recommender, release_encoder
    from serving.release import current_bundle_dir, load_bundle
    from serving.relevance import FEATURES_VERSION
    from serving.text import normalise_query

    bench = settings.model_copy(update={"home": work, "golden_queries": None, "judgments": None,
                                        "checkpoint_every_events": 10**9})
    bundle = load_bundle(current_bundle_dir(bench.releases_dir))
    train, texts = training_judgments(judgments, bundle.items.item_ids.tolist(),
                                      work / "relevance", train_share, max_train_queries)
    relevance_code = hashlib.sha256(Path(relevance_module.__file__).read_bytes()).hexdigest()[:16]
    inputs = {"release_id": bundle.release_id, "judgments": train.name,
              "features_version": FEATURES_VERSION, "relevance_code": relevance_code,
              "candidates": bench.candidates, "query_steps": bench.query_steps}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    setup = hashlib.sha256(f"{key}:{click_queries}:{pages}:{k}:{seed}".encode()).hexdigest()[:16]
    out: dict[str, Any] = {"split": {"salt": SPLIT_SALT, "train_share": train_share,
                                     "train_queries": len(texts)},
                           "model_key": key, "setup_key": setup}
    latest = load_latest(work)
    if (latest is not None and latest[0].release_id == bundle.release_id
            and latest[1].meta.extra.get("bench_setup") == setup and latest[1].relevance is not None):
        ref, ranker = latest
        return {**out, "reused": True, "checkpoint_seq": ref.seq,
                "relevance": dict(ranker.meta.extra.get("bench_relevance", {})),
                "memory_entries": len(ranker.query_item),
                "click_queries": ranker.meta.extra.get("bench_click_queries", [])}
    encoder = release_encoder(bundle, bench, backend="torch")  # as the batch jobs encode
    model, report = _fitted_relevance(bench, bundle, encoder, train,
                                      work / "relevance" / f"model-{key}")
    ranker = Ranker.initial(bundle.release_id, bundle.manifest.encoder.dim, len(bundle.items))
    ranker.relevance = model
    clicked = texts[:click_queries]
    ranker.meta.extra.update({"bench_setup": setup, "bench_click_queries": clicked,
                        "bench_relevance": {k_: report[k_] for k_ in (
                            "queries", "cross_fitted", "zero_shot", "gate_passed", "trees",
                            "fit_seconds") if k_ in report}})
    publish_checkpoint(work, ranker, 0)

    # the clicks, in a log of their own (the checkpoint's offset counts events of this log)
    gains = {}
    judged = load_judgments(train)
    by_qid = judged.gains()
    for qid, query in judged.queries().iter_rows():
        gains.setdefault(normalise_query(query, 10_000), {}).update(by_qid.get(qid, {}))
    start = time.perf_counter()
    rec = Recommender.load(work, settings=bench, watch=False)
    events = synthetic_clicks(rec, clicked, gains, pages, k, seed, setup[:8])
    rec.close()
    log_path = work / "setup" / setup / "events.db"
    for old in log_path.parent.glob("events.db*"):
        old.unlink()
    event_log = SqliteEventLog(log_path)
    user_key = bench.user_key()
    event_log.append([parse_event(e, user_key, bench.max_query_chars) for e in events])
    updater = NearlineUpdater(bench, encoder=encoder, event_log=event_log)
    summary = updater.run_once()
    event_log.close()
    ref, ranker = load_latest(work)
    return {**out, "reused": False, "checkpoint_seq": ref.seq,
            "relevance": dict(ranker.meta.extra.get("bench_relevance", {})),
            "memory_entries": len(ranker.query_item), "click_queries": clicked,
            "events": len(events), "nearline": summary["counters"],
            "setup_seconds": round(time.perf_counter() - start, 1)}


# -- one serving process --------------------------------------------------------------------

def _percentiles(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "n": len(ms)}


def _timed(fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[float]:
    out = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def _violates(result: Any, filters: dict[str, Any]) -> bool:
    price = result.price
    if filters.get("in_stock") is not None and result.in_stock != filters["in_stock"]:
        return True
    if "min_price" in filters and (price is None or price < filters["min_price"]):
        return True
    return "max_price" in filters and (price is None or price > filters["max_price"])


def filtered_requests(n: int, share: float, seed: int = 0) -> dict[int, dict[str, Any]]:
    """Which of ``n`` requests carry filters (exactly round(share * n) of them, chosen at
    random with ``seed``) and which filters (:data:`FILTER_MIX` in turn)."""
    chosen = sorted(random.Random(seed).sample(range(n), round(share * n)))
    return {j: FILTER_MIX[i % len(FILTER_MIX)] for i, j in enumerate(chosen)}


def _stage_figures(timings: list[dict[str, float]], walls: list[float]) -> dict[str, Any]:
    from serving.retrieval import STAGES

    mean_wall = float(np.mean(walls))
    out: dict[str, Any] = {"p50_ms": {}, "p99_ms": {}, "mean_ms": {}, "share_of_request": {}}
    for stage in STAGES:
        got = [t[stage] for t in timings if stage in t]
        if not got:
            continue
        mean = float(np.sum(got)) / len(timings)  # per request, 0 where the stage did not run
        out["p50_ms"][stage] = round(float(np.median(got)) * 1e3, 3)
        out["p99_ms"][stage] = round(float(np.percentile(got, 99)) * 1e3, 3)
        out["mean_ms"][stage] = round(mean * 1e3, 3)
        out["share_of_request"][stage] = round(mean / mean_wall, 4)
    sums = [sum(t.values()) for t in timings]
    out["sum_over_request"] = {"min": round(min(s / w for s, w in zip(sums, walls, strict=True)), 4),
                               "max": round(max(s / w for s, w in zip(sums, walls, strict=True)), 4)}
    return out


def _concurrent(rec: Any, queries: Sequence[str], clients: int, k: int) -> dict[str, Any]:
    """``queries`` issued by ``clients`` threads of a pool at once."""
    def one(q: str) -> float:
        t0 = time.perf_counter()
        rec.recommend(q, k=k)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=clients) as pool:
        t0 = time.perf_counter()
        lat = list(pool.map(one, queries))
        wall = time.perf_counter() - t0
    return {**_percentiles(lat), "clients": clients, "qps": round(len(lat) / wall, 1)}


def search_k_sweep(bundle: Any, qvecs: np.ndarray, depth: int,
                   factors: Sequence[float] = SEARCH_K_FACTORS) -> list[dict[str, Any]]:
    """The release's Annoy index at ``factors`` times its search_k: recall@10 and
    recall@``depth`` of real query vectors against exact search, and the ANN call's time."""
    depth = min(depth, len(bundle.items))
    sims = -(np.asarray(bundle.vectors) @ qvecs.T)   # (items, queries)
    exact_d = np.argpartition(sims, depth - 1, axis=0)[:depth].T
    exact_10 = np.argpartition(sims, 9, axis=0)[:10].T
    del sims
    base = bundle.index.search_k
    out = []
    for factor in factors:
        index = dataclasses.replace(bundle.index, search_k=max(1, round(base * factor)))
        found, seconds = [], []
        for q in qvecs:
            t0 = time.perf_counter()
            rows, _ = index.nearest(q, depth)
            seconds.append(time.perf_counter() - t0)
            found.append(rows)
        rec10 = np.mean([len(set(f[:10]) & set(e.tolist())) / 10
                         for f, e in zip(found, exact_10, strict=True)])
        rec_d = np.mean([len(set(f) & set(e.tolist())) / depth
                         for f, e in zip(found, exact_d, strict=True)])
        out.append({"search_k": index.search_k, "factor": factor,
                    "recall_at_10": round(float(rec10), 4),
                    f"recall_at_{depth}": round(float(rec_d), 4),
                    "ann": _percentiles(seconds)})
    return out


def coverage_lever(bundle: Any, texts: Sequence[str], qvecs: np.ndarray,
                   depth: int) -> dict[str, Any]:
    """Term coverage of each query's candidates: whole-catalogue score vectors per term (the
    way it was) against the candidates' postings; times and whether they are identical."""
    from serving.retrieval import LexicalCache, retrieve_candidates

    lexical, cache = bundle.lexical, LexicalCache()
    whole, postings, same, sizes = [], [], 0, []
    for text, q in zip(texts, qvecs, strict=True):
        rows = np.asarray(retrieve_candidates(bundle, q, cache.relative(bundle, text), depth))
        sizes.append(len(rows))
        t0 = time.perf_counter()
        cov, n_terms = lexical.coverage(text)
        old = cov[rows]
        t1 = time.perf_counter()
        new, n_new = lexical.coverage_rows(text, rows)
        t2 = time.perf_counter()
        whole.append(t1 - t0)
        postings.append(t2 - t1)
        same += int(np.array_equal(old, new) and old.dtype == new.dtype and n_terms == n_new)
    return {"whole_catalogue": _percentiles(whole), "postings": _percentiles(postings),
            "identical": same, "queries": len(texts),
            "candidates_p50": float(np.median(sizes))}


def measure_process(job: dict[str, Any]) -> dict[str, Any]:
    """Everything measured inside one serving process (run by :func:`_child`)."""
    from serving.recommender import Recommender
    from serving.release import current_bundle_dir

    home, plan, k = job["home"], job["plan"], job["k"]
    t0 = time.perf_counter()
    settings = Settings(home=Path(home), encoder_backend=job["backend"])
    if job["ranker"] == "relevance":   # the live checkpoint: relevance model + memory
        rec = Recommender.load(home, settings=settings, watch=False)
    else:                              # the same release, untrained (zero-shot) ranker
        rec = Recommender.from_bundle(current_bundle_dir(settings.releases_dir),
                                      settings=settings)
    load_s = time.perf_counter() - t0
    for q in plan["warmup"]:
        rec.recommend(q, k=k)
        rec.recommend(q, k=k)

    # unseen queries, a share of them filtered; stages timed inside recommend()
    unseen_q = plan["unseen"]
    filtered = filtered_requests(len(unseen_q), job["filter_share"], job.get("seed", 0))
    walls, timings, relevance_ran, violations, checked = [], [], 0, 0, 0
    for j, q in enumerate(unseen_q):
        f = filtered.get(j)
        stages: dict[str, float] = {}
        t = time.perf_counter()
        results = rec.recommend(q, k=k, filters=f, timings=stages)
        walls.append(time.perf_counter() - t)
        timings.append(stages)
        relevance_ran += bool(results) and "relevance" in results[0].signals
        if f is not None:
            checked += len(results)
            violations += sum(_violates(r, f) for r in results)
    plain = [w for j, w in enumerate(walls) if j not in filtered]
    with_filters = [w for j, w in enumerate(walls) if j in filtered]

    hot = [q for j, q in enumerate(unseen_q) if j not in filtered][-HOT_QUERIES:]
    cached = _timed(lambda q: rec.recommend(q, k=k),
                    [(hot[i % len(hot)],) for i in range(len(unseen_q))])

    memory_hits, memory = 0, []
    for q in plan.get("memory", []):
        t = time.perf_counter()
        results = rec.recommend(q, k=k)
        memory.append(time.perf_counter() - t)
        memory_hits += sum(r.signals.get("query_item_bias", 0.0) != 0.0 for r in results)

    # sessions with clicks on random items, then an unseen query in each
    ids = rec.bundle.items.item_ids
    rng = random.Random(7)
    sessions = []
    run_id = f"{os.getpid()}-{time.time_ns()}"  # the log ignores a re-sent event id
    for i, _ in enumerate(plan["session"]):
        sid = f"bench-{run_id}-s{i}"
        rec.record_many([{"event_id": f"{sid}-{c}", "session_id": sid, "type": "click",
                          ITEM_ID: str(ids[rng.randrange(len(ids))]), "position": c + 1}
                         for c in range(SESSION_CLICKS)])
        sessions.append(sid)
    shaped = []

    def in_session(q: str, s: str) -> None:
        results = rec.recommend(q, k=k, session_id=s)
        shaped.append(any(r.signals.get("session_affinity", 0.0) != 0.0 for r in results))

    session = _timed(in_session, list(zip(plan["session"], sessions, strict=True)))

    concurrency = [_concurrent(rec, qs, c, k)
                   for c, qs in zip(job["concurrency"], plan["concurrency"], strict=True)]

    bundle = rec.bundle
    depth = max(k, settings.candidates)
    qvecs = np.vstack([rec.encoder.encode_query(q) for q in unseen_q]).astype(np.float32)
    levers: dict[str, Any] = {"search_k": search_k_sweep(bundle, qvecs, depth)}
    if bundle.lexical is not None:
        levers["coverage"] = coverage_lever(bundle, unseen_q, qvecs, depth)

    from threadpoolctl import threadpool_info

    from pipelines.benchmarks.ann import memory_mb, peak_rss_mb

    return {
        "memory_at_end": memory_mb(),  # anonymous (heap) vs file-backed (mapped) pages
        "backend": rec.encoder.backend, "ranker": job["ranker"], "n_items": len(bundle.items),
        "load_s": round(load_s, 2), "ranker_seq": rec.ranker_seq,
        "relevance_ran": relevance_ran,
        "unseen": {**_percentiles(walls), "plain": _percentiles(plain),
                   "filtered": {**(_percentiles(with_filters) if with_filters else {"n": 0}),
                                "share": round(len(with_filters) / len(walls), 4),
                                "results_checked": checked, "violations": violations}},
        "stages": _stage_figures(timings, walls),
        "cached": _percentiles(cached),
        "memory": {**(_percentiles(memory) if memory else {"n": 0}),
                   "results_with_memory": memory_hits},
        "session": {**_percentiles(session), "sessions_with_clicks": sum(shaped)},
        "concurrency": concurrency, "levers": levers,
        "qps": round(len(walls) / sum(walls), 1),
        "qps_cached": round(len(cached) / sum(cached), 1),
        "peak_rss_mb": peak_rss_mb(),
        "threadpools": [{"api": p.get("internal_api"), "threads": p.get("num_threads")}
                        for p in threadpool_info()],
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def _child() -> None:
    """Entry point of a serving process: reads its job as JSON on stdin, prints figures."""
    print(json.dumps(measure_process(json.loads(sys.stdin.read()))))


def run_child(job: dict[str, Any], blas_threads: int | None = None) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if blas_threads:
        env.update({v: str(blas_threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                    "MKL_NUM_THREADS")})
    proc = subprocess.run(
        [sys.executable, "-c", "from pipelines.benchmarks.serving import _child; _child()"],
        input=json.dumps(job), capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"serving benchmark process ({job['ranker']}, {job['backend']}) "
                           f"failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _batch_child() -> None:
    """Entry point of the concurrent batch job: embeds the catalogue titles (argv: catalogue
    parquet, status file, torch threads) in batches of 256, round after round, until it is
    terminated; after each batch it overwrites the status file with ``items seconds``."""
    import polars as pl
    import torch

    from pipelines.steps import yield_cpu
    from serving.encoder import Encoder

    catalogue, status, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    yield_cpu(Settings())  # as the catalogue's embed step does
    torch.set_num_threads(threads)
    titles = pl.read_parquet(catalogue, columns=["title"])["title"].cast(pl.Utf8).to_list()
    encoder = Encoder(precision=Settings().embed_precision)
    done, started = 0, time.perf_counter()
    while True:
        for i in range(0, len(titles), 256):
            encoder.encode(titles[i:i + 256], batch_size=64)
            done += len(titles[i:i + 256])
            tmp = status.with_suffix(".tmp")
            tmp.write_text(f"{done} {time.perf_counter() - started:.3f}")
            os.replace(tmp, status)


class BatchJob:
    """The concurrent batch job around one serving process: started (and waited for until its
    first batch is embedded, so the serving process meets it at full speed), then stopped by
    its PID; :attr:`figures` holds its items/s over the serving process's lifetime."""

    def __init__(self, catalogue: Path, threads: int, status_dir: Path) -> None:
        self.catalogue, self.threads = catalogue, threads
        self.status = status_dir / f"batch-job-{os.getpid()}.status"
        self.figures: dict[str, Any] = {}

    def _read(self) -> tuple[int, float] | None:
        try:
            items, seconds = self.status.read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return int(items), float(seconds)

    def __enter__(self) -> BatchJob:
        self.status.unlink(missing_ok=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from pipelines.benchmarks.serving import _batch_child; "
             "_batch_child()", str(self.catalogue), str(self.status), str(self.threads)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while self._read() is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the concurrent batch job exited before its first batch:\n"
                                   f"{self.proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the concurrent batch job embedded nothing in 300 s")
            time.sleep(0.2)
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        os.kill(self.proc.pid, 15)
        self.proc.wait(timeout=30)
        self.status.unlink(missing_ok=True)
        items, seconds = end[0] - self._start[0], end[1] - self._start[1]
        self.figures = {"items": items, "items_per_s": round(items / seconds, 1)
                        if seconds > 0 else None, "threads": self.threads}


def plan_queries(judgments: Path, n: int, seed: int = 0, keep: Callable[[str], bool] | None = None,
          memory: Sequence[str] = (), levels: Sequence[int] = CONCURRENCY,
          ) -> dict[str, Any]:
    """Disjoint sets of distinct, normalised real queries (only those ``keep`` accepts): a
    warm-up, ``n`` unseen, ``n`` for sessions, ``n`` per concurrency level; ``memory`` are
    asked as they are."""
    from pipelines.offline.judged import load_judgments
    from serving.text import normalise_query

    raw = load_judgments(judgments).queries()["query"].to_list()
    queries = sorted({normalise_query(q, 10_000) for q in raw})
    queries = [q for q in queries if keep is None or keep(q)]
    random.Random(seed).shuffle(queries)
    warm = min(20, len(queries) // 8)
    n = min(n, (len(queries) - warm) // (2 + len(levels)))
    if n < 1:
        raise ValueError(f"{judgments} has too few distinct queries for the benchmark")
    rest = queries[warm:]
    return {"warmup": queries[:warm], "unseen": rest[:n], "session": rest[n:2 * n],
            "concurrency": [rest[(2 + i) * n:(3 + i) * n] for i in range(len(levels))],
            "memory": list(memory)}


def _median(values: Sequence[float]) -> float:
    return round(float(np.median(values)), 3)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeated processes of the same (ranker, backend)."""
    first = runs[0]
    out: dict[str, Any] = {"backend": first["backend"], "ranker": first["ranker"],
                           "n_items": first["n_items"], "runs": len(runs),
                           "relevance_ran_min": min(r["relevance_ran"] for r in runs)}
    pct = ("p50_ms", "p95_ms", "p99_ms")
    for part in ("unseen", "cached", "session", "memory"):
        if first[part]["n"] == 0:
            out[part] = {"n_per_run": 0}
            continue
        out[part] = {p: _median([r[part][p] for r in runs]) for p in pct}
        out[part]["n_per_run"] = first[part]["n"]
    out["unseen"]["plain"] = {p: _median([r["unseen"]["plain"][p] for r in runs]) for p in pct}
    filt = first["unseen"]["filtered"]
    out["unseen"]["filtered"] = {
        **({p: _median([r["unseen"]["filtered"][p] for r in runs]) for p in pct}
           if filt["n"] else {}),
        "n_per_run": filt["n"], "share": filt["share"],
        "violations": sum(r["unseen"]["filtered"]["violations"] for r in runs),
        "results_checked": sum(r["unseen"]["filtered"]["results_checked"] for r in runs)}
    out["session"]["sessions_with_clicks_min"] = min(r["session"]["sessions_with_clicks"]
                                                     for r in runs)
    if first["memory"]["n"]:
        out["memory"]["results_with_memory_min"] = min(r["memory"]["results_with_memory"]
                                                       for r in runs)
    out["stages"] = {
        fig: {s: _median([r["stages"][fig].get(s, 0.0) for r in runs])
              for s in first["stages"][fig]}
        for fig in ("p50_ms", "p99_ms", "mean_ms", "share_of_request")}
    out["stages"]["sum_over_request_max"] = max(r["stages"]["sum_over_request"]["max"]
                                                for r in runs)
    out["concurrency"] = [
        {"clients": level["clients"], "n_per_run": level["n"],
         **{p: _median([r["concurrency"][i][p] for r in runs]) for p in (*pct, "qps")}}
        for i, level in enumerate(first["concurrency"])]
    out["levers"] = {"search_k": [
        {"search_k": s["search_k"], "factor": s["factor"],
         **{key: s[key] for key in s if key.startswith("recall")},
         "ann_p50_ms": _median([r["levers"]["search_k"][i]["ann"]["p50_ms"] for r in runs]),
         "ann_p99_ms": _median([r["levers"]["search_k"][i]["ann"]["p99_ms"] for r in runs])}
        for i, s in enumerate(first["levers"]["search_k"])]}
    if "coverage" in first["levers"]:
        cov = [r["levers"]["coverage"] for r in runs]
        out["levers"]["coverage"] = {
            "whole_catalogue_p50_ms": _median([c["whole_catalogue"]["p50_ms"] for c in cov]),
            "whole_catalogue_p99_ms": _median([c["whole_catalogue"]["p99_ms"] for c in cov]),
            "postings_p50_ms": _median([c["postings"]["p50_ms"] for c in cov]),
            "postings_p99_ms": _median([c["postings"]["p99_ms"] for c in cov]),
            "identical": sum(c["identical"] for c in cov),
            "queries": sum(c["queries"] for c in cov),
            "candidates_p50": cov[0]["candidates_p50"]}
    for key in ("qps", "qps_cached", "peak_rss_mb", "load_s", "loadavg_1m"):
        out[key] = round(float(np.median([r[key] for r in runs])), 2)
    out["loadavg_1m_max"] = max(r["loadavg_1m"] for r in runs)
    out["threadpools"] = first["threadpools"]
    return out


# -- quality of a query backend -------------------------------------------------------------

def query_backend_quality(encoder_path: Path | None, data: dict[str, tuple[Path, Path]],
                          embed_cache: Path, onnx_cache: Path | None) -> dict[str, Any]:
    """Dense-channel nDCG@10 (retrieval protocol; CrowdFlower also re-rank) per query backend,
    items embedded by torch through ``embed_cache``; and the cosine of each backend's query
    vectors to torch's."""
    from pipelines.offline.evaluation import embed_cached, product_texts
    from pipelines.offline.judged import load_judgments, load_products, score_rankings
    from serving.encoder import Encoder
    from serving.onnx_encoder import OnnxQueryEncoder
    from serving.text import normalise_query

    torch_enc = Encoder(encoder_path)
    onnx = {v: OnnxQueryEncoder(torch_enc.path, torch_enc.revision, torch_enc.max_length,
                                onnx_cache, variant=v) for v in ("fp32", "int8")}

    out: dict[str, Any] = {}
    for name, (products_path, judgments_path) in data.items():
        products = load_products(products_path)
        judgments = load_judgments(judgments_path)
        items = embed_cached(torch_enc, product_texts(products), embed_cache, progress=False)
        ids = products[ITEM_ID].to_list()
        queries = judgments.queries()
        qids = queries[QUERY_ID].to_list()
        texts = [normalise_query(q, 10_000) for q in queries["query"].to_list()]
        # one query at a time, as served (int8 quantises activations per call)
        qv = {"torch": torch_enc.encode(texts),
              "onnx_fp32": np.vstack([onnx["fp32"].embed(t) for t in texts]),
              "onnx_int8": np.vstack([onnx["int8"].embed(t) for t in texts])}
        judged = dict(judgments.frame.group_by(QUERY_ID).agg(ITEM_ID).iter_rows())
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

def add_shop_arguments(p: Any) -> None:
    """How the bench shop is set up as after a retrain (this benchmark's and ``bench
    growth``'s options): filtered requests, the relevance model's training split, clicks."""
    p.add_argument("--filter-share", type=float, default=0.25,
                   help="share of unseen requests that carry business filters")
    p.add_argument("--train-share", type=float, default=0.7,
                   help="share of judged queries (by hash) that train the relevance model")
    p.add_argument("--train-queries", type=int, default=0,
                   help="at most this many training queries (0: all of the training split)")
    p.add_argument("--click-queries", type=int, default=1000,
                   help="training queries whose result pages get synthetic clicks")
    p.add_argument("--click-pages", type=int, default=3, help="result pages per click query")


def add_arguments(p: Any) -> None:
    p.add_argument("--products", type=Path, default=DATA / "homedepot" / "products.parquet")
    p.add_argument("--judgments", type=Path, default=DATA / "homedepot" / "judgments.parquet",
                   help="judged queries: the training split fits the relevance model, the "
                        "held-out split is asked")
    p.add_argument("--queries", type=int, default=300,
                   help="unseen queries per process (and as many per session / concurrency "
                        "level)")
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh processes per (ranker, backend) (0: skip the latency part)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    p.add_argument("--ranker", choices=[*RANKERS, "both"], default="both",
                   help="relevance: the live checkpoint after a retrain (relevance model + "
                        "memory); zero-shot: the untrained ranker on the same release")
    add_shop_arguments(p)
    p.add_argument("--memory-queries", type=int, default=100,
                   help="clicked training queries asked once per process (memory lookups)")
    p.add_argument("--blas-threads", type=int, default=0,
                   help="OPENBLAS/OMP/MKL_NUM_THREADS of the serving processes (0: as set)")
    p.add_argument("--batch-job", choices=["none", "embed"], default="none",
                   help="embed: a concurrent batch job (the encoder embedding the catalogue "
                        "in a loop) runs beside every serving process")
    p.add_argument("--batch-threads", type=int, default=1,
                   help="torch threads of the concurrent batch job")
    p.add_argument("--work", type=Path, default=None,
                   help="release directory (default <home>/bench/serving-<data set>)")
    p.add_argument("--seed-cache", type=Path, default=None,
                   help="evaluation embedding cache (DuckDB) to reuse item vectors from")
    p.add_argument("--quality", action="store_true",
                   help="also check query backends' dense nDCG@10 on both judged data sets")
    p.add_argument("--embed-cache", type=Path, default=None,
                   help="item embedding cache for --quality (default <home>/cache/embeddings.duckdb)")


def prepare_shop(settings: Settings, args: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The bench home with its release and (for the relevance ranker) its retrained live
    checkpoint: (directory, release build report, ranker set-up report)."""
    work = args.work or bench_dir(settings.home) / f"serving-{args.products.parent.name}"
    work = work.resolve()
    build = prepare_release(settings, args.products, work, args.seed_cache)
    shop = prepare_ranker(settings, work, args.judgments, train_share=args.train_share,
                          max_train_queries=args.train_queries or None,
                          click_queries=args.click_queries, pages=args.click_pages, k=args.k)
    return work, build, shop


def _latency(settings: Settings, args: Any) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    work, build, shop = prepare_shop(settings, args)
    clicked = shop["click_queries"]
    plan = plan_queries(args.judgments, args.queries,
                 keep=lambda q: not in_training_split(q, args.train_share),
                 memory=clicked[:args.memory_queries])
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    rankers = list(RANKERS) if args.ranker == "both" else [args.ranker]
    peers = [(r, b) for r in rankers for b in backends]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {p: [] for p in peers}
    batch: dict[tuple[str, str], list[dict[str, Any]]] = {p: [] for p in peers}
    for i in range(args.repeats):
        for ranker, backend in peers if i % 2 == 0 else peers[::-1]:  # alternate the order
            job = {"home": str(work), "backend": backend, "ranker": ranker, "plan": plan,
                   "k": args.k, "filter_share": args.filter_share,
                   "concurrency": list(CONCURRENCY)}
            if args.batch_job == "embed":
                with BatchJob(work / "catalogue.parquet", args.batch_threads, work) as bj:
                    runs[(ranker, backend)].append(run_child(job, args.blas_threads or None))
                batch[(ranker, backend)].append(bj.figures)
            else:
                runs[(ranker, backend)].append(run_child(job, args.blas_threads or None))
    by_ranker: dict[str, dict[str, Any]] = {r: {} for r in rankers}
    for (ranker, backend), r in runs.items():
        by_ranker[ranker][backend] = median_of(r)
        if batch[(ranker, backend)]:
            b = batch[(ranker, backend)]
            by_ranker[ranker][backend]["batch_job"] = {
                "items_per_s": _median([x["items_per_s"] for x in b]),
                "items": sum(x["items"] for x in b), "threads": args.batch_threads}
    default_backend = settings.encoder_backend if settings.encoder_backend in backends \
        else backends[0]
    default_ranker = rankers[0]
    top = by_ranker[default_ranker][default_backend]
    return {
        "n_items": top["n_items"], "default_backend": default_backend,
        "default_ranker": default_ranker,
        "unseen": top["unseen"], "cached": top["cached"], "session": top["session"],
        "memory": top["memory"], "stages": top["stages"],
        "stages_p50_ms": top["stages"]["p50_ms"], "concurrency": top["concurrency"],
        "levers": top["levers"],
        "qps": top["qps"], "qps_measured_on": "unseen queries, one thread",
        "peak_rss_mb": top["peak_rss_mb"], "backends": by_ranker[default_ranker],
        "rankers": by_ranker, "repeats": args.repeats, "queries_per_run": len(plan["unseen"]),
        "filter_share": args.filter_share, "filters": list(FILTER_MIX),
        "catalogue_offers": OFFERS_LABEL, "blas_threads": args.blas_threads or "as set",
        "batch_job": (top.get("batch_job", {}) | {"kind": "embed the catalogue titles in a "
                      "loop, beside every serving process"}) if args.batch_job == "embed"
        else "none",
        "release": str(work), "build": build,
        "shop": {k_: v for k_, v in shop.items() if k_ != "click_queries"},
        "cpus": os.cpu_count(),
        "loadavg_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "seconds": round(time.perf_counter() - started, 1),
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
            args.embed_cache or embedding_cache(settings.home), None)
    return out
