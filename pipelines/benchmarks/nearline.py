"""Updater throughput and cross-process freshness (``instantrec bench nearline``).

Freshness is measured across processes, as a shop would see it: process A records a shopper's
page, click and purchase (what the bot filter lets through) and notes when it began to; the
nearline updater (its own process) applies it and publishes a checkpoint; process B, a serving
process with hot reload on, notes when its ``recommend()`` first reflects the purchase. What a
purchase moves online is the (query, item) memory (``signals["query_item_bias"]``; the adapter,
item biases and channel weights stay at their starting point, see :mod:`serving.ranker`), and
through it the item's final score and rank, so B watches that signal and reports the score and
rank it saw before and after. A probe that B never sees within the deadline is a failure of the
benchmark, not a figure.

The benchmark runs on a private copy of the home it is pointed at: its live release, and its
live ranker checkpoint (with its relevance model and memory) when there is one, re-based on the
copy's empty event log, so the figures are those of the ranker that home serves. A checkpoint
trained for an older release is carried over to the live one by the updater, as in the shop.

Throughput is events/s the updater applies from a backlog of synthetic but realistic feedback
(result lists of 10 impressions, one click at a position drawn from a position-biased
distribution, some carts).
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

from serving.checkpoint import load_latest, publish_checkpoint, read_latest
from serving.errors import MeasurementError
from serving.eventlog import SqliteEventLog
from serving.events import Event, parse_event
from serving.ranker import CheckpointMeta
from serving.release import read_pointer
from serving.schema import ITEM_ID
from serving.settings import Settings

QUERIES = ["coffee maker", "yoga mat", "headphones", "cordless drill", "office chair",
           "running shoes", "kids toys", "garden hose", "face moisturizer", "laptop",
           "cast iron skillet", "blender", "desk lamp", "backpack", "tent"]
PROBE_DEADLINE_S = 30.0
TARGET_S = 2.0          # DESIGN.md: a click changes everyone's ranking within seconds
LOOK_DEPTH = 50         # how deep process B looks for the probe item


def _link_or_copy(src: Path, dst: Path) -> None:
    """Copy a release directory by hard links where the filesystem allows (bundles are
    hundreds of MB and never change once published)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def _prepare_home(settings: Settings, work: Path) -> tuple[Path, dict[str, Any]]:
    """A private copy of the live release and ranker (or a fresh demo build) to benchmark on;
    returns the copy and what it holds."""
    home = work / "home"
    pointer = read_pointer(settings.releases_dir)
    if pointer is None:
        from pipelines.steps import run_build

        run_build(settings.model_copy(update={"home": home}), register=False)
        return home, {"source": "fresh demo build", "ranker": "untrained"}
    (home / "releases").mkdir(parents=True)
    _link_or_copy(settings.releases_dir / pointer.release_id,
                  home / "releases" / pointer.release_id)
    shutil.copy(settings.releases_dir / "CURRENT", home / "releases" / "CURRENT")
    held: dict[str, Any] = {"source": str(settings.home), "release_id": pointer.release_id,
                            "ranker": "untrained"}
    latest = load_latest(settings.home)
    if latest is None:
        return home, held
    ref, ranker = latest
    if ref.release_id != pointer.release_id:
        old = settings.releases_dir / ref.release_id
        if old.is_dir():  # the updater reads the old item ids to carry biases over
            _link_or_copy(old, home / "releases" / ref.release_id)
    # Re-based on this copy's empty event log: the parameters, the relevance model and the
    # memory are the home's; the offset and the updater's bookkeeping start afresh.
    kept = ranker.meta
    ranker.meta = CheckpointMeta(retrain_offset=kept.retrain_offset,
                                 retrain_version=kept.retrain_version,
                                 retrain_examples=kept.retrain_examples, extra=dict(kept.extra))
    publish_checkpoint(home, ranker, 0)
    held.update({
        "ranker": "relevance model" if ranker.relevance is not None else "zero-shot",
        "checkpoint_release_id": ref.release_id,
        "checkpoint_for_live_release": ref.release_id == pointer.release_id,
        "query_item_memory": len(ranker.query_item),
    })
    return home, held


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
                                       "query": q, ITEM_ID: item, "type": "impression",
                                       "position": p, "ts": ts}, key))
        pos = min(int(rng.expovariate(0.4)) + 1, len(items))
        events.append(parse_event({"event_id": f"b{i}-c", "session_id": session, "query": q,
                                   ITEM_ID: items[pos - 1], "type": "click", "position": pos,
                                   "ts": ts + 0.001}, key))
        if rng.random() < 0.1:
            events.append(parse_event({"event_id": f"b{i}-p", "session_id": session,
                                       ITEM_ID: items[pos - 1], "type": "add_to_cart",
                                       "ts": ts + 0.002}, key))
    return events


def probe_state(rec: Any, query: str, item_id: str) -> dict[str, float] | None:
    """What ``rec`` serves for ``item_id`` under ``query``: its (query, item) memory, final
    logit and rank, or None if it is not among the first LOOK_DEPTH results."""
    for r in rec.recommend(query, k=LOOK_DEPTH):
        if r.item_id == item_id:
            return {"memory": r.signals["query_item_bias"], "logit": r.signals["logit"],
                    "rank": r.rank}
    return None


def _reader(home: str, reload_interval_s: float) -> None:
    """Process B: a serving process that reports when a probe's purchase shows in its
    results (the item's (query, item) memory moved), with what it saw before and after."""
    from serving.recommender import Recommender

    rec = Recommender.load(home, settings=Settings(home=Path(home),
                                                   reload_interval_s=reload_interval_s))
    print(json.dumps({"ready": rec.ranker_seq}), flush=True)
    for line in sys.stdin:
        probe = json.loads(line)
        # first serve the live checkpoint, so that "before" is what the shop serves now and
        # a checkpoint loaded later can only bring the probe's own purchase
        latest = read_latest(Path(home))
        sync_by = time.time() + PROBE_DEADLINE_S
        while latest is not None and rec.ranker_seq < latest.seq and time.time() < sync_by:
            time.sleep(0.002)
        before = probe_state(rec, probe["query"], probe[ITEM_ID])
        why = None
        if latest is not None and rec.ranker_seq < latest.seq:
            why = f"process B did not load checkpoint {latest.seq} (serves {rec.ranker_seq})"
        elif before is None:
            why = f"the item is not in process B's first {LOOK_DEPTH} results"
        print(json.dumps({"armed": why is None, "why": why}), flush=True)
        if why is not None:
            continue
        deadline = time.time() + PROBE_DEADLINE_S
        after = None
        while time.time() < deadline:
            now = probe_state(rec, probe["query"], probe[ITEM_ID])
            if now is not None and now["memory"] != before["memory"]:
                after = now
                break
            time.sleep(0.002)
        print(json.dumps({"seen": time.time() if after else None, "before": before,
                          "after": after}), flush=True)


def _wait_caught_up(home: Path, offset: int, timeout_s: float = 300.0) -> None:
    """Block until the updater has published a checkpoint covering ``offset``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = read_latest(home)
        if latest is not None and latest.offset >= offset:
            return
        time.sleep(0.05)
    raise MeasurementError(f"the nearline updater did not reach offset {offset} in "
                           f"{timeout_s:.0f} s: no freshness can be measured")


def _read_json(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    line = proc.stdout.readline()
    if not line:
        raise MeasurementError(f"the serving process (B) exited while {what} "
                               f"(exit code {proc.poll()})")
    return json.loads(line)


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3)


def bench_nearline(settings: Settings, n_lists: int = 2000, probes: int = 20,
                   checkpoint_every_s: float | None = None,
                   reload_interval_s: float | None = None) -> dict[str, Any]:
    """Throughput over ``n_lists`` synthetic result lists, then ``probes`` purchases timed
    from process A's ``record()`` to process B's results. The intervals default to the
    settings' (what a shop runs)."""
    from pipelines.learning.nearline import NearlineUpdater
    from serving.recommender import Recommender

    checkpoint_every_s = checkpoint_every_s or settings.checkpoint_every_s
    reload_interval_s = reload_interval_s or settings.reload_interval_s
    work = Path(tempfile.mkdtemp(prefix="instantrec-bench-"))
    try:
        home, held = _prepare_home(settings, work)
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
        del updater

        # 2. freshness across processes
        env = {**os.environ, "INSTANTREC_HOME": str(home),
               "INSTANTREC_CHECKPOINT_EVERY_S": str(checkpoint_every_s)}
        updater_proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "nearline"],
                                        env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        reader = subprocess.Popen(
            [sys.executable, "-c",
             "from pipelines.benchmarks.nearline import _reader; "
             f"_reader({str(home)!r}, {reload_interval_s!r})"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        rows: list[dict[str, Any]] = []
        try:
            _read_json(reader, "starting")
            # one event after the updater started: once it is applied, the updater is live
            rec.record({"session_id": "bench-warmup", ITEM_ID: str(rec.bundle.items.item_ids[0]),
                        "type": "impression"})
            _wait_caught_up(home, SqliteEventLog(env_settings.events_path).last_offset())
            for i in range(probes):
                q = QUERIES[i % len(QUERIES)]
                page = [r.item_id for r in rec.recommend(q, k=10)]
                item = page[i % 3]
                reader.stdin.write(json.dumps({"query": q, ITEM_ID: item}) + "\n")
                reader.stdin.flush()
                armed = _read_json(reader, "arming a probe")
                if not armed["armed"]:
                    raise MeasurementError(f"probe {i} ({item} for {q!r}) cannot be watched: "
                                           f"{armed['why']}")
                # as a shopper does it (the bot filter drops a purchase of nothing shown or
                # clicked): the page shown, a click on the item, its purchase
                session = f"fresh-{i}"
                t0 = time.time()
                rec.record_batch([
                    *({"session_id": session, "query": q, ITEM_ID: shown, "type": "impression",
                       "position": p} for p, shown in enumerate(page, start=1)),
                    {"session_id": session, "query": q, ITEM_ID: item, "type": "click",
                     "position": page.index(item) + 1},
                    {"session_id": session, "query": q, ITEM_ID: item, "type": "purchase"}])
                seen = _read_json(reader, "watching a probe")
                rows.append({"query": q, ITEM_ID: item, "before": seen["before"],
                             "after": seen["after"],
                             "lag_s": None if seen["seen"] is None else seen["seen"] - t0})
                time.sleep(0.1)
        finally:
            for proc in (reader, updater_proc):
                proc.kill()
                proc.wait()
        return freshness_report(rows, {
            "events_per_s": round(events_per_s, 1),
            "backlog_events": summary["read"],
            "backlog_seconds": summary["seconds"],
            "counters": summary["counters"],
            "home": held,
            "checkpoint_every_s": checkpoint_every_s,
            "serving_reload_interval_s": reload_interval_s,
            "event_log": "sqlite (WAL, synchronous=FULL)",
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


def freshness_report(rows: list[dict[str, Any]], out: dict[str, Any]) -> dict[str, Any]:
    """The freshness figures of the probes; raises MeasurementError if any went unseen."""
    missed = [r for r in rows if r["lag_s"] is None]
    if missed:
        raise MeasurementError(
            f"{len(missed)} of {len(rows)} purchases never reached process B within "
            f"{PROBE_DEADLINE_S:.0f} s (its (query, item) memory for the item did not move), "
            f"e.g. {missed[0]['item_id']} for {missed[0]['query']!r}: freshness is not measured")
    lags = [r["lag_s"] for r in rows]
    moved = [r["after"]["memory"] - r["before"]["memory"] for r in rows]
    ranks = [(r["before"]["rank"], r["after"]["rank"]) for r in rows]
    out.update({
        "probes": len(rows), "probes_not_seen": 0,
        "freshness_p50_s": _percentile(lags, 50),
        "freshness_p95_s": _percentile(lags, 95),
        "freshness_max_s": round(max(lags), 3),
        "target_s": TARGET_S, "within_target": sum(lag <= TARGET_S for lag in lags),
        "watched": "signals['query_item_bias'] of the purchased item for the probe's query",
        "memory_step_mean": round(float(np.mean(moved)), 4),
        "logit_change_mean": round(float(np.mean(
            [r["after"]["logit"] - r["before"]["logit"] for r in rows])), 4),
        "rank_before_after": ranks,
        "moved_up": sum(after < before for before, after in ranks),
        "moved_down": sum(after > before for before, after in ranks),
    })
    return out


def add_freshness_arguments(p: Any) -> None:
    """The freshness probe's options (this benchmark's and ``bench replicas``')."""
    p.add_argument("--probes", type=int, default=20, help="freshness probes")
    p.add_argument("--checkpoint-every-s", type=float, default=None,
                   help="the updater's checkpoint interval (default: the settings', 0.5 s)")
    p.add_argument("--reload-interval-s", type=float, default=None,
                   help="serving's pointer polling interval (default: the settings', 1.0 s)")


def add_arguments(p: Any) -> None:
    p.add_argument("--lists", type=int, default=2000, help="result lists in the backlog")
    add_freshness_arguments(p)


def run(settings: Settings, args: Any) -> dict[str, Any]:
    return bench_nearline(settings, n_lists=args.lists, probes=args.probes,
                          checkpoint_every_s=args.checkpoint_every_s,
                          reload_interval_s=args.reload_interval_s)
