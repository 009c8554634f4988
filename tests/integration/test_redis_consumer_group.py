"""The nearline updater consuming a Redis event log through a consumer group, for real.

Against a real redis-server on loopback: the group's primitives with hand-checkable answers,
then the updater. It acknowledges entries only after a checkpoint covering them is published;
SIGKILLed mid-stream (or between a checkpoint and its acknowledgement) it leaves entries
pending, and its successor ends exactly where an uninterrupted updater ends (same offset,
applied events, ledger, counters and parameters): what was past the checkpoint is applied
once, what was at or before it is acknowledged without being applied. Each reference run
reads the same stream through a group of its own (``redis_group``), so offsets compare.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from pipelines.learning.nearline import NearlineUpdater
from pipelines.reliability.updater import compare_rankers
from serving import Recommender
from serving.checkpoint import read_latest
from serving.errors import InstantrecError
from serving.eventlog import SqliteEventLog
from serving.events import parse_event
from serving.redis_backends import RedisEventLog
from tests.conftest import REPO, make_settings
from tests.redis_server import unique_prefix

USER_KEY = "consumer-group-test-key-0123456789abcdef"
QUERIES = ("coffee maker", "yoga mat", "headphones")


def redis_settings(home: Path, url: str, prefix: str, group: str | None = None, **extra):
    return make_settings(home, events_backend="redis", redis_url=url, redis_prefix=prefix,
                         redis_group=group, user_id_key=USER_KEY, **extra)


def raw_pending(url: str, stream: str, group: str) -> int:
    """XPENDING's count, asked on a connection of the test's own."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return int(client.xpending(stream, group)["pending"])
    finally:
        client.close()


def shop(rec: Recommender, tag: str, sessions: int, seed: int, one_by_one: bool = False) -> int:
    """``sessions`` shoppers on ``rec``: each sees a page of 8 results for a query, clicks one
    (position-biased), and one in four buys it. Returns how many events were recorded."""
    rng = random.Random(seed)
    recorded = 0
    for s in range(sessions):
        query = QUERIES[s % len(QUERIES)]
        session = f"{tag}-s{s}"
        page = [r.item_id for r in rec.recommend(query, k=8, session_id=session)]
        click = min(int(rng.expovariate(0.5)), len(page) - 1)
        events = [{"event_id": f"{tag}-{s}-i{p}", "session_id": session, "user_id": f"u{s % 4}",
                   "query": query, "item_id": item, "type": "impression", "position": p}
                  for p, item in enumerate(page, start=1)]
        events.append({"event_id": f"{tag}-{s}-c", "session_id": session, "user_id": f"u{s % 4}",
                       "query": query, "item_id": page[click], "type": "click",
                       "position": click + 1})
        if s % 4 == 0:
            events.append({"event_id": f"{tag}-{s}-p", "session_id": session,
                           "user_id": f"u{s % 4}", "query": query, "item_id": page[click],
                           "type": "purchase"})
        if one_by_one:
            for e in events:
                rec.record(e)
        else:
            rec.record_many(events)
        recorded += len(events)
    return recorded


def same_run(got: dict, want: dict) -> None:
    for name in ("offset", "applied_total", "ledger", "counters"):
        assert got[name] == want[name], name


# -- the group's primitives -----------------------------------------------------------------


def test_group_primitives_known_answers(redis_server):
    prefix = unique_prefix("g")
    log = RedisEventLog(redis_server.url, prefix)
    try:
        a = log.consumer_group(consumer="a")
        assert a.name == f"{prefix}:nearline" and a.stream == f"{prefix}:events"
        assert a.create(0) is True and a.create(0) is False      # BUSYGROUP is not an error
        assert log.count() == 0                                   # MKSTREAM made the stream
        assert a.state().last_delivered == 0 and a.pending() == 0
        events = [parse_event({"event_id": f"e{i}", "session_id": "s", "item_id": "SKU-1",
                               "type": "impression", "position": i, "user_id": f"user{i}"},
                              b"k") for i in range(1, 6)]
        log.append(events)
        off = [x.offset for x in log.read(0)]
        ids = lambda batch: [x.event.event_id for x in batch]  # noqa: E731

        assert ids(a.read_new(3)) == ["e1", "e2", "e3"] and a.pending() == 3
        assert ids(a.read_new(10)) == ["e4", "e5"] and a.read_new(10) == []
        assert a.state().last_delivered == off[-1] and a.pending() == 5
        # this consumer's pending entries, in order, from any offset
        assert ids(a.read_pending(0)) == ["e1", "e2", "e3", "e4", "e5"]
        assert ids(a.read_pending(off[2], limit=1)) == ["e4"]
        # acknowledging up to an offset: exactly the entries at or before it
        assert a.ack(off[1], batch=1) == 2 and a.pending() == 3 and a.ack(off[1]) == 0
        assert ids(a.read_pending(0)) == ["e3", "e4", "e5"]
        assert a.create(0) is False and a.state().last_delivered == off[-1]  # position kept

        # a successor takes over the dead consumer's entries, and the dead consumer goes
        b = log.consumer_group(consumer="b")
        assert b.read_pending(0) == []
        assert b.claim() == 3 and b.state().consumers == 1
        assert ids(b.read_pending(0)) == ["e3", "e4", "e5"]
        assert a.read_pending(0) == []              # (reading made "a" a consumer again)
        # an entry deleted while pending (forget) is acknowledged, not returned
        assert log.forget(events[3].user)[0] == 1
        assert ids(b.read_pending(0)) == ["e3", "e5"] and b.pending() == 2

        # moved back, the group delivers again what follows, pending entries included
        b.move(off[0])
        assert ids(b.read_new(10)) == ["e2", "e3", "e5"]
        assert b.pending() == 3 and b.ack(off[-1]) == 3 and b.pending() == 0
        assert raw_pending(redis_server.url, b.stream, b.name) == 0

        # a second group created at an offset delivers only what follows it
        other = log.consumer_group("other", "c")
        assert other.create(off[2]) is True
        assert ids(other.read_new(10)) == ["e5"] and b.pending() == 0
        with pytest.raises(InstantrecError, match="consumer group missing of stream"):
            log.consumer_group("missing", "x").state()
    finally:
        log.close()


def test_one_live_reader_per_group_holds_its_lease(redis_server):
    import socket
    import time

    prefix = unique_prefix("lease")
    log = RedisEventLog(redis_server.url, prefix)
    try:
        here = socket.gethostname()
        live = log.consumer_group(consumer=f"{here}-{os.getpid()}")  # this process: alive
        live.acquire(lease_s=5)
        other = log.consumer_group(consumer=f"{here}-other")
        began = time.monotonic()
        with pytest.raises(InstantrecError, match=r"is in use by .*INSTANTREC_REDIS_GROUP"):
            other.acquire(lease_s=5, wait_s=0.3)
        assert time.monotonic() - began < 3
        # a reader whose lease passed to another must stop
        live.release()
        other.acquire(lease_s=5)
        live._renewed = 0.0
        with pytest.raises(InstantrecError, match="the lease passed to"):
            live.renew(lease_s=5)
        other.release()

        # the lease of a dead process of this host is taken at once, not waited out
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        dead = log.consumer_group(consumer=f"{here}-{gone.pid}")
        dead.acquire(lease_s=60)
        began = time.monotonic()
        other.acquire(lease_s=5, wait_s=0)
        assert time.monotonic() - began < 1
        other.release()

        # one of another host is waited out until its lease expires
        remote = log.consumer_group(consumer="elsewhere-123")
        remote.acquire(lease_s=0.6)
        with pytest.raises(InstantrecError, match="in use by elsewhere-123"):
            other.acquire(lease_s=5, wait_s=0)
        other.acquire(lease_s=5, wait_s=3)
        assert log._r.get(other.lease_key) == other.consumer
    finally:
        log.close()


# -- the updater ----------------------------------------------------------------------------


def test_a_second_live_updater_on_the_group_is_refused(redis_server, demo_copy, demo_home,
                                                       encoder, tmp_path):
    prefix = unique_prefix("two")
    other = tmp_path / "other-home"
    shutil.copytree(demo_home, other)
    first = NearlineUpdater(redis_settings(demo_copy, redis_server.url, prefix,
                                           redis_group_lease_s=60.0), encoder)
    try:
        # another process (another consumer) on the same group, from another home; it waits
        # twice its own lease (1 s) for the first one's to expire, which it does not
        env = {**os.environ, "INSTANTREC_EVENTS_BACKEND": "redis",
               "INSTANTREC_REDIS_URL": redis_server.url, "INSTANTREC_REDIS_PREFIX": prefix,
               "INSTANTREC_USER_ID_KEY": USER_KEY, "INSTANTREC_REDIS_GROUP_LEASE_S": "1"}
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--home", str(other),
                              "nearline", "--once"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=REPO)
        assert out.returncode != 0, out.stdout + out.stderr
        assert f"is in use by {first.group.consumer}" in out.stderr, out.stderr[-2000:]
        assert "INSTANTREC_REDIS_GROUP" in out.stderr
        first.run_once()  # the first one reads on, its lease renewed
    finally:
        first.close()
    # stopped cleanly, it gave the lease up: the next one takes the group at once
    second = NearlineUpdater(redis_settings(other, redis_server.url, prefix,
                                            redis_group_lease_s=60.0), encoder)
    second.close()


def test_the_updater_applies_each_event_once_and_acks_after_its_checkpoint(
        redis_server, demo_copy, demo_home, encoder, tmp_path):
    """(a) Through the group, the updater applies what an updater reading a SQLite log with
    the same events applies; an entry is acknowledged only once a checkpoint covers it."""
    prefix = unique_prefix("g")
    settings = redis_settings(demo_copy, redis_server.url, prefix, checkpoint_every_events=25)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    try:
        recorded = shop(rec, "a", 12, seed=1)
    finally:
        rec.close()

    updater = NearlineUpdater(settings, encoder)
    try:
        group = updater.group
        assert group is not None and group.name == f"{prefix}:nearline"
        assert updater.poll(limit=40) == 40
        latest = read_latest(demo_copy)
        assert latest.offset == updater.log.read(0, 25)[-1].offset     # published at 25 events
        # the 15 applied since are not covered by a checkpoint: still pending
        assert group.pending() == 15 == raw_pending(redis_server.url, group.stream, group.name)
        summary = updater.run_once()
        assert summary["offset"] == updater.log.last_offset()
        assert summary["pending_acks"] == 0 == raw_pending(redis_server.url, group.stream, group.name)
        assert summary["redelivered_skipped"] == 0
        assert read_latest(demo_copy).offset == summary["offset"]
        assert updater.run_once()["read"] == 0
        logged = updater.log.read(0, 10_000)
    finally:
        updater.close()
    assert len(logged) == recorded

    # the same events in a SQLite log, read by offset
    reference = tmp_path / "reference"
    shutil.copytree(demo_home, reference)
    SqliteEventLog(reference / "events" / "events.db").append([x.event for x in logged])
    want = NearlineUpdater(make_settings(reference), encoder).run_once()
    assert want["counters"]["positives"] > 0 and want["applied_total"] > 0
    for name in ("applied_total", "ledger", "counters"):
        assert summary[name] == want[name], name


@pytest.mark.parametrize("point", ["nearline.applied:40", "checkpoint.published:3"])
def test_a_killed_updater_leaves_pending_entries_and_its_successor_applies_each_once(
        redis_server, demo_copy, demo_home, encoder, tmp_path, point):
    """(b) ``instantrec nearline`` SIGKILLed after applying 40 events (checkpoints every 7),
    or right after its third checkpoint moved the pointer (before it acknowledged): the
    restarted updater ends as an uninterrupted one over the same stream."""
    prefix = unique_prefix("g")
    settings = redis_settings(demo_copy, redis_server.url, prefix, checkpoint_every_events=7)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    try:
        recorded = shop(rec, "b", 10, seed=2)
    finally:
        rec.close()
    assert recorded > 60

    env = {**os.environ, "INSTANTREC_HOME": str(demo_copy), "INSTANTREC_EVENTS_BACKEND": "redis",
           "INSTANTREC_REDIS_URL": redis_server.url, "INSTANTREC_REDIS_PREFIX": prefix,
           "INSTANTREC_USER_ID_KEY": USER_KEY, "INSTANTREC_CHECKPOINT_EVERY_EVENTS": "7",
           "INSTANTREC_FAILPOINT": point}
    env.pop("INSTANTREC_REDIS_GROUP", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "nearline", "--once"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]

    log = RedisEventLog(redis_server.url, prefix)
    group = log.consumer_group()
    try:
        checkpoint = read_latest(demo_copy)
        offsets = [x.offset for x in log.read(0, 10_000)]
        assert checkpoint.offset == offsets[20 if point.startswith("checkpoint") else 34]
        left = group.pending()
        assert left == raw_pending(redis_server.url, group.stream, group.name)
        # everything delivered after the last acknowledgement is pending
        acked = offsets.index(checkpoint.offset) + 1
        if point.startswith("checkpoint"):
            acked -= 7                       # killed before acknowledging its last checkpoint
        assert left == len(offsets) - acked > 0
    finally:
        log.close()

    resumed = NearlineUpdater(settings, encoder)
    try:
        got = resumed.run_once()
    finally:
        resumed.close()
    # entries at or before the checkpoint came back and were acknowledged, not applied
    assert got["redelivered_skipped"] == (7 if point.startswith("checkpoint") else 0)
    assert got["pending_acks"] == 0 == raw_pending(redis_server.url, group.stream, group.name)
    assert got["offset"] == offsets[-1]

    reference = tmp_path / "reference"
    shutil.copytree(demo_home, reference)
    uninterrupted = NearlineUpdater(redis_settings(reference, redis_server.url, prefix, "reference"),
                                    encoder)
    try:
        want = uninterrupted.run_once()
    finally:
        uninterrupted.close()
    assert want["applied_total"] > 0
    same_run(got, want)
    assert compare_rankers(demo_copy, reference) == 0


def test_two_writers_interleaved_are_consumed_once_each(redis_server, demo_copy, demo_home, encoder,
                                                        tmp_path):
    """(c) Two serving replicas (two Redis clients) record one event at a time, at once, while
    the updater consumes: each event is applied once, in the stream's order."""
    prefix = unique_prefix("g")
    settings = redis_settings(demo_copy, redis_server.url, prefix, checkpoint_every_events=20)
    replicas = [Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
                for _ in range(2)]
    updater = NearlineUpdater(settings, encoder)
    done = threading.Event()
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    reads: list[int] = []

    def write(i: int) -> None:
        try:
            start.wait(timeout=60)
            shop(replicas[i], f"w{i}", 6, seed=10 + i, one_by_one=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def consume() -> None:
        try:
            while not done.is_set():
                reads.append(updater.poll(limit=16))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    consumer = threading.Thread(target=consume)
    try:
        consumer.start()
        for t in writers:
            t.start()
        for t in writers:
            t.join(timeout=120)
        done.set()
        consumer.join(timeout=120)
        assert not errors, errors
        got = updater.run_once()
        logged = updater.log.read(0, 10_000)
    finally:
        done.set()
        updater.close()
        for r in replicas:
            r.close()

    writer_of = [x.event.event_id.split("-")[0] for x in logged]
    switches = sum(a != b for a, b in zip(writer_of, writer_of[1:], strict=False))
    assert switches > 2, "the two writers did not interleave: the test proves nothing"
    assert len(logged) == len({x.event.event_id for x in logged})
    # every entry delivered exactly once (none re-delivered), the concurrent reads included
    assert sum(reads) + got["read"] == len(logged) and sum(reads) > 0
    assert got["redelivered_skipped"] == 0 and got["pending_acks"] == 0
    assert got["offset"] == logged[-1].offset

    reference = tmp_path / "reference"
    shutil.copytree(demo_home, reference)
    want = NearlineUpdater(redis_settings(reference, redis_server.url, prefix, "reference"),
                           encoder).run_once()
    assert want["applied_total"] > 0
    same_run(got, want)


def test_a_checkpoint_behind_the_group_moves_it_back(redis_server, demo_copy, demo_home, encoder,
                                                     tmp_path):
    """The checkpoint's offset, not the group, says what was applied: a home restored to an
    older checkpoint (or a retrain's) finds entries the group acknowledged under a newer one,
    and entries pending past a gap; it applies all of them once, in order."""
    prefix = unique_prefix("g")
    settings = redis_settings(demo_copy, redis_server.url, prefix, checkpoint_every_events=1000)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    restored = tmp_path / "restored"
    try:
        shop(rec, "r1", 4, seed=3)
        first = NearlineUpdater(settings, encoder)
        first.run_once()
        shutil.copytree(demo_copy, restored)               # a backup of the home at this point
        shop(rec, "r2", 4, seed=4)
        first.run_once()                                   # applied and acknowledged
        shop(rec, "r3", 4, seed=5)
        assert first.poll(limit=20) == 20                  # delivered, no checkpoint: pending
        first.close()
    finally:
        rec.close()

    later = NearlineUpdater(redis_settings(restored, redis_server.url, prefix,
                                           checkpoint_every_events=1000), encoder)
    try:
        assert later.group.pending() == 20
        got = later.run_once()
    finally:
        later.close()
    assert got["pending_acks"] == 0 and got["redelivered_skipped"] == 0

    reference = tmp_path / "reference"
    shutil.copytree(demo_home, reference)
    want = NearlineUpdater(redis_settings(reference, redis_server.url, prefix, "reference"),
                           encoder).run_once()
    same_run(got, want)
    assert compare_rankers(restored, reference) == 0
