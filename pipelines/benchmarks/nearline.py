"""Updater throughput and cross-process freshness (``instantrec bench nearline``).

Freshness is measured across processes, as a shop would see it: process A records a click
and notes when ``record()`` returned; the nearline updater (its own process) applies it and
publishes a checkpoint; process B, a serving process with hot reload on, notes when its
``recommend()`` first reflects the click. Throughput is events/s the updater applies from a
backlog of synthetic but realistic feedback (result lists of 10 impressions, one click at a
position drawn from a position-biased distribution, some carts and purchases).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.eventlog import SqliteEventLog
from serving.events import Event, parse_event
from serving.release import read_pointer
from serving.settings import Settings

QUERIES = ["coffee maker", "yoga mat", "headphones", "cordless drill", "office chair",
           "running shoes", "kids toys", "garden hose", "face moisturizer", "laptop",
           "cast iron skillet", "blender", "desk lamp", "backpack", "tent"]


def _prepare_home(settings: Settings, work: Path) -> Path:
    """A private copy of the live release (or a fresh demo build) to benchmark on."""
    home = work / "home"
    pointer = read_pointer(settings.releases_dir)
    if pointer is None:
        from pipelines.steps import run_build

        run_build(settings.model_copy(update={"home": home}), register=False)
        return home
    (home / "releases").mkdir(parents=True)
    shutil.copytree(settings.releases_dir / pointer.release_id,
                    home / "releases" / pointer.release_id)
    shutil.copy(settings.releases_dir / "CURRENT", home / "releases" / "CURRENT")
    return home


def synthetic_feedback(rec: Any, n_lists: int, seed: int = 0) -> list[Event]:
    """``n_lists`` result lists with impressions and position-biased clicks."""
    rng = random.Random(seed)
    key = rec.settings.user_key()
    shown = {q: [r.item_id for r in rec.recommend(q, k=10)] for q in QUERIES}
    t0 = time.time() - n_lists * 0.01 - 60
    events: list[Event] = []
    for i in range(n_lists):
        q = QUERIES[i % len(QUERIES)]
        items = shown[q]
        session, ts = f"bench-{i % 5000}", t0 + i * 0.01
        for p, item in enumerate(items, start=1):
            events.append(parse_event({"event_id": f"b{i}-i{p}", "session_id": session,
                                       "query": q, "item_id": item, "type": "impression",
                                       "position": p, "ts": ts}, key))
        pos = min(int(rng.expovariate(0.4)) + 1, len(items))
        events.append(parse_event({"event_id": f"b{i}-c", "session_id": session, "query": q,
                                   "item_id": items[pos - 1], "type": "click", "position": pos,
                                   "ts": ts + 0.001}, key))
        if rng.random() < 0.1:
            events.append(parse_event({"event_id": f"b{i}-p", "session_id": session,
                                       "item_id": items[pos - 1], "type": "add_to_cart",
                                       "ts": ts + 0.002}, key))
    return events


def _reader(home: str) -> None:
    """Process B: a serving process that reports when a probe's click shows in its results."""
    from serving.recommender import Recommender

    rec = Recommender.load(home, settings=Settings(home=Path(home), reload_interval_s=0.02))
    print("ready", flush=True)
    for line in sys.stdin:
        probe = json.loads(line)
        base = _bias(rec, probe)
        print("armed", flush=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if _bias(rec, probe) != base:
                print(json.dumps({"seen": time.time()}), flush=True)
                break
            time.sleep(0.002)
        else:
            print(json.dumps({"seen": None}), flush=True)


def _wait_caught_up(home: Path, offset: int, timeout_s: float = 300.0) -> None:
    """Block until the updater has published a checkpoint covering ``offset``."""
    from serving.checkpoint import read_latest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = read_latest(home)
        if latest is not None and latest.offset >= offset:
            time.sleep(0.2)  # let serving pick it up too
            return
        time.sleep(0.05)
    raise TimeoutError(f"the nearline updater did not reach offset {offset} in {timeout_s} s")


def _bias(rec: Any, probe: dict[str, str]) -> float:
    for r in rec.recommend(probe["query"], k=10):
        if r.item_id == probe["item_id"]:
            return r.signals["item_bias"]
    return float("nan")


def bench_nearline(settings: Settings, n_lists: int = 2000, probes: int = 20) -> dict[str, Any]:
    from pipelines.nearline import NearlineUpdater
    from serving.recommender import Recommender

    work = Path(tempfile.mkdtemp(prefix="instantrec-bench-"))
    try:
        home = _prepare_home(settings, work)
        env_settings = settings.model_copy(update={"home": home})
        rec = Recommender.load(home, settings=env_settings, watch=False)

        # 1. throughput over a backlog
        events = synthetic_feedback(rec, n_lists)
        SqliteEventLog(env_settings.events_path).append(events)
        updater = NearlineUpdater(env_settings, encoder=rec.encoder)
        for q in QUERIES:  # query encodings are cached in serving too; time the learning
            updater.encoder.encode_query(q)
        summary = updater.run_once()
        events_per_s = summary["read"] / summary["seconds"]

        # 2. freshness across processes
        env = {**os.environ, "INSTANTREC_HOME": str(home),
               "INSTANTREC_CHECKPOINT_EVERY_S": "0.05"}
        updater_proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "nearline"],
                                        env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        reader = subprocess.Popen(
            [sys.executable, "-c",
             f"from pipelines.benchmarks.nearline import _reader; _reader({str(home)!r})"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        try:
            assert reader.stdout.readline().strip() == "ready"
            # one event after the updater started: once it is applied, the updater is live
            rec.record({"session_id": "bench-warmup", "item_id": str(rec.bundle.items.item_ids[0]),
                        "type": "impression"})
            _wait_caught_up(home, SqliteEventLog(env_settings.events_path).last_offset())
            lags = []
            for i in range(probes):
                q = QUERIES[i % len(QUERIES)]
                item = rec.recommend(q, k=10)[i % 3].item_id
                reader.stdin.write(json.dumps({"query": q, "item_id": item}) + "\n")
                reader.stdin.flush()
                assert reader.stdout.readline().strip() == "armed"
                rec.record({"session_id": f"fresh-{i}", "query": q, "item_id": item,
                            "type": "purchase"})
                t0 = time.time()
                seen = json.loads(reader.stdout.readline())["seen"]
                lags.append(float("nan") if seen is None else seen - t0)
                time.sleep(0.1)
        finally:
            for proc in (reader, updater_proc):
                proc.kill()
                proc.wait()
        lag = np.array(lags)
        return {
            "events_per_s": round(events_per_s, 1),
            "backlog_events": summary["read"],
            "backlog_seconds": summary["seconds"],
            "counters": summary["counters"],
            "freshness_p50_s": round(float(np.nanpercentile(lag, 50)), 3),
            "freshness_p95_s": round(float(np.nanpercentile(lag, 95)), 3),
            "freshness_max_s": round(float(np.nanmax(lag)), 3),
            "probes": probes, "probes_not_seen": int(np.isnan(lag).sum()),
            "checkpoint_every_s": 0.05, "serving_reload_interval_s": 0.02,
            "event_log": "sqlite (WAL, synchronous=FULL)",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_arguments(p: Any) -> None:
    p.add_argument("--lists", type=int, default=2000, help="result lists in the backlog")
    p.add_argument("--probes", type=int, default=20, help="freshness probes")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    return bench_nearline(settings, n_lists=args.lists, probes=args.probes)
