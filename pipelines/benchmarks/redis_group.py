"""Updater throughput on a Redis event log: through the consumer group against by offset.

One backlog of synthetic feedback (that of ``bench nearline``) is appended to a Redis stream
under a fresh prefix of the Redis at ``INSTANTREC_REDIS_URL``, and to a SQLite log. The
nearline updater then drains it, from the same starting ranker each time, three ways in
turns: through a consumer group (``XREADGROUP``, acknowledged after each checkpoint, what
``INSTANTREC_EVENTS_BACKEND=redis`` runs), by offset on the same stream (``XRANGE``, what it
ran before) and by offset on SQLite. Each reports the median events/s of its runs; all three
must apply exactly the same events (same ledger), or the figures are not compared. The
prefix's keys are deleted at the end.

``INSTANTREC_REDIS_URL=redis://... instantrec bench redis_group [--lists N] [--repeats R]
[--json]`` (the home needs a live release: ``make demo``).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from serving.errors import MeasurementError
from serving.settings import Settings

MODES = ("group", "redis_offset", "sqlite_offset")


def _drop_prefix(url: str, prefix: str) -> int:
    """Delete every key of ``prefix`` (the stream with its groups, the dedupe markers)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i:i + 1000])
        return len(keys)
    finally:
        client.close()


def bench_redis_group(settings: Settings, n_lists: int = 2000, repeats: int = 3,
                      ) -> dict[str, Any]:
    """Median events/s of the updater over a backlog of ``n_lists`` result lists (about 11
    events each), ``repeats`` runs per way of reading it."""
    from pipelines.benchmarks.nearline import _prepare_home, synthetic_feedback
    from pipelines.learning.nearline import NearlineUpdater
    from serving.eventlog import SqliteEventLog
    from serving.recommender import Recommender
    from serving.redis_backends import RedisEventLog

    prefix = f"bench{uuid.uuid4().hex[:12]}"
    work = Path(tempfile.mkdtemp(prefix="instantrec-bench-redis-"))
    stream = RedisEventLog(settings.redis_url, prefix)
    try:
        home, held = _prepare_home(settings, work)
        base = settings.model_copy(update={
            "home": home, "events_backend": "sqlite", "sessions_backend": "memory",
            "user_id_key": settings.user_id_key or SecretStr("bench-redis-group-key")})
        pristine = work / "pristine-rankers"
        rankers = home / "rankers"
        if rankers.is_dir():
            shutil.copytree(rankers, pristine)
        with Recommender.load(home, settings=base, watch=False) as rec:
            events = synthetic_feedback(rec, n_lists)
        for i in range(0, len(events), 1000):
            stream.append(events[i:i + 1000])
        SqliteEventLog(base.events_path).append(events)

        encoder = None
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for r in range(repeats):
            for mode in MODES:
                shutil.rmtree(rankers, ignore_errors=True)
                if pristine.is_dir():
                    shutil.copytree(pristine, rankers)
                if mode == "group":
                    run_settings = base.model_copy(update={
                        "events_backend": "redis", "redis_url": settings.redis_url,
                        "redis_prefix": prefix, "redis_group": f"{prefix}:bench-{r}"})
                    updater = NearlineUpdater(run_settings, encoder)
                elif mode == "redis_offset":
                    # a Redis log handed to an updater not configured for it: read by offset
                    updater = NearlineUpdater(base, encoder,
                                              event_log=RedisEventLog(settings.redis_url, prefix))
                else:
                    updater = NearlineUpdater(base, encoder)
                try:
                    encoder = updater.encoder
                    runs[mode].append(updater.run_once())
                finally:
                    updater.close()
        ledgers = {mode: {run["ledger"] for run in runs[mode]} for mode in MODES}
        if len(set().union(*ledgers.values())) != 1:
            raise MeasurementError("bench redis_group: the runs applied different events "
                                   f"(ledgers {ledgers}): their speeds are not comparable")
        out: dict[str, Any] = {"home": held, "events": len(events), "repeats": repeats,
                               "applied": runs["group"][0]["applied_total"]}
        for mode in MODES:
            out[f"{mode}_events_per_s"] = round(statistics.median(
                run["read"] / run["seconds"] for run in runs[mode]), 1)
        out["group_pending_after"] = [run["pending_acks"] for run in runs["group"]]
        out["group_vs_redis_offset"] = round(
            out["group_events_per_s"] / out["redis_offset_events_per_s"], 3)
        return out
    finally:
        stream.close()
        _drop_prefix(settings.redis_url, prefix)
        shutil.rmtree(work, ignore_errors=True)


def add_arguments(p: Any) -> None:
    p.add_argument("--lists", type=int, default=2000, help="result lists in the backlog")
    p.add_argument("--repeats", type=int, default=3, help="runs per way of reading")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    return bench_redis_group(settings, n_lists=args.lists, repeats=args.repeats)
