"""The Redis event log and session store against a real redis-server on loopback.

The event-log contract tests run on both backends (SQLite and Redis), so the scale-out log
behaves exactly like the embedded one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis

from serving import QueryError, Recommender
from serving.eventlog import AppendResult, SqliteEventLog, iter_all
from serving.events import Event, parse_event, pseudonymise
from serving.redis_backends import (
    SEQ_LIMIT,
    RedisEventLog,
    RedisSessionStore,
    decode_offset,
    encode_offset,
)
from serving.session import Interaction, SessionState
from tests.conftest import REPO, make_settings, read_demo_rows
from tests.redis_server import RedisServer, redis_text, running_redis, unique_prefix

KEY = b"test-key"


@dataclass
class Backend:
    """How to open one event log (again, in this or another process)."""

    name: str
    open: Callable[[], object]
    snippet: str        # Python that binds ``log`` to a fresh instance of the same log
    args: list[str]


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "events" / "events.db"
        return Backend("sqlite", lambda: SqliteEventLog(path),
                       "from pathlib import Path\n"
                       "from serving.eventlog import SqliteEventLog\n"
                       "log = SqliteEventLog(Path(sys.argv[1]))\n", [str(path)])
    srv: RedisServer = request.getfixturevalue("redis_server")
    prefix = unique_prefix()
    return Backend("redis", lambda: RedisEventLog(srv.url, prefix),
                   "from serving.redis_backends import RedisEventLog\n"
                   "log = RedisEventLog(sys.argv[1], sys.argv[2])\n", [srv.url, prefix])


@pytest.fixture
def elog(backend):
    log = backend.open()
    yield log
    log.close()


def ev(event_id: str, **fields) -> Event:
    raw = {"event_id": event_id, "session_id": "s1", "item_id": "SKU-1", "type": "click",
           **fields}
    return parse_event(raw, KEY)


def sample_events(now: float) -> list[Event]:
    return [
        ev("e1", ts=now - 10.123456789, user_id="bob", query="Cordless DRILL", position=3),
        ev("e2", ts=now - 9.5, type="impression", position=1),
        ev("e3", ts=int(now - 8), session_id="s2", item_id="SKU-2", type="purchase"),
        ev("e4", ts=now - 7.25, query="ünïcode ✓ query", type="add_to_cart", position=10_000),
        ev("e5", ts=now - 1e-6, user_id="carol"),
    ]


def read_all(log, batch: int = 97) -> list:
    """Every logged event, in pages; fails (instead of looping) if ``read`` stops advancing."""
    out: list = []
    after = 0
    for _ in range(10_000):
        page = log.read(after, batch)
        if not page:
            return out
        assert page[0].offset > after, f"read(after={after}) returned offset {page[0].offset}"
        out += page
        after = page[-1].offset
    pytest.fail("read() never reached the end of the log")


def assert_same_event(got: Event, want: Event) -> None:
    assert got == want
    assert type(got.ts) is float and got.ts == want.ts            # exact float round-trip
    assert type(got.position) is type(want.position)              # int or None
    for name in ("event_id", "session_id", "item_id", "type"):
        assert type(getattr(got, name)) is str
    for name in ("user", "query"):
        assert getattr(got, name) is None or type(getattr(got, name)) is str


# -- offsets ------------------------------------------------------------------------------


def test_stream_ids_map_to_ordered_integer_offsets():
    assert encode_offset("1700000000000-0") == 1700000000000 * 2**20
    assert encode_offset("5-7") == 5 * 2**20 + 7
    assert decode_offset(encode_offset("1700000000123-42")) == "1700000000123-42"
    assert decode_offset(encode_offset("5-0") - 1) == f"4-{SEQ_LIMIT - 1}"
    ids = ["1-0", "1-1", "1-1048575", "2-0", "10-3", "1700000000000-0"]
    offsets = [encode_offset(i) for i in ids]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    with pytest.raises(AssertionError):
        encode_offset(f"1-{SEQ_LIMIT}")


# -- the event-log contract, on both backends --------------------------------------------


def live(event_id: str, now: float, **fields) -> Event:
    """An event as the serving API takes it: stamped with the server's time ``now``."""
    raw = {"event_id": event_id, "session_id": "s1", "item_id": "SKU-1", "type": "click",
           "query": "drill", "position": 2, "user_id": "bob", **fields}
    return parse_event(raw, KEY, now=now, live=True)


def test_empty_log(elog):
    assert elog.last_offset() == 0
    assert elog.read(0) == []
    assert elog.append([]) == AppendResult(0, 0)


def test_append_read_round_trip_exact_types_and_offsets(elog):
    events = sample_events(time.time())
    assert elog.append(events) == AppendResult(5, 0, frozenset({"e1", "e2", "e3", "e4", "e5"}))
    logged = elog.read(0)
    assert len(logged) == 5
    for got, want in zip(logged, events, strict=True):
        assert_same_event(got.event, want)
    offsets = [x.offset for x in logged]
    assert all(type(o) is int for o in offsets)
    assert all(a < b for a, b in zip(offsets, offsets[1:], strict=False)), offsets
    assert offsets[0] > 0
    assert elog.last_offset() == offsets[-1]
    # exclusive `after`, and `limit`
    assert elog.read(offsets[1]) == logged[2:]
    assert elog.read(offsets[1] - 1) == logged[1:]
    for after in (0, offsets[0] - 1, *offsets, offsets[2] + 1, offsets[-1] + 1):
        assert elog.read(after) == [x for x in logged if x.offset > after]
    assert elog.read(offsets[-1]) == []
    assert elog.read(0, limit=2) == logged[:2]
    assert elog.read(offsets[0], limit=1) == logged[1:2]
    assert list(iter_all(elog, batch=2)) == logged
    assert list(iter_all(elog, after=offsets[2], batch=2)) == logged[3:]
    # the raw user id is pseudonymised before it is stored
    assert logged[0].event.user == pseudonymise("bob", KEY)


def test_resending_event_ids_is_a_no_op_counted_as_duplicates(elog, backend):
    now = time.time()
    events = sample_events(now)
    assert elog.append(events) == AppendResult(5, 0, frozenset({"e1", "e2", "e3", "e4", "e5"}))
    before = elog.read(0)
    last = elog.last_offset()

    assert elog.append(events) == AppendResult(0, 5)
    # the same id with another payload is a conflict: reported, and nothing overwritten
    assert elog.append([ev("e1", ts=now, item_id="SKU-999")]) == AppendResult(
        0, 0, frozenset(), frozenset({"e1"}))
    assert elog.read(0) == before and elog.last_offset() == last

    mixed = [events[0], ev("e6", ts=now - 0.5), events[3], ev("e6", ts=now - 0.25), ev("e7")]
    assert elog.append(mixed) == AppendResult(2, 3, frozenset({"e6", "e7"}))
    after = elog.read(last)
    assert [x.event.event_id for x in after] == ["e6", "e7"]
    assert after[0].event.ts == now - 0.5                       # the first of the repeated id
    assert all(x.offset > last for x in after)

    # a fresh instance (a restarted process) sees the same log and the same dedupe state
    again = backend.open()
    try:
        assert again.read(0) == elog.read(0)
        assert again.append(events + [ev("e8")]) == AppendResult(1, 5, frozenset({"e8"}))
        assert again.last_offset() == elog.last_offset()
    finally:
        again.close()
    ids = [x.event.event_id for x in elog.read(0)]
    assert ids == ["e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8"]


_WRITER = """
import json, sys
{open_log}
proc, n_shared, n_own = sys.argv[-3], int(sys.argv[-2]), int(sys.argv[-1])
from serving.events import parse_event
events = [parse_event({{"event_id": f"shared-{{i}}", "session_id": "p", "item_id": "SKU-1",
                        "type": "click"}}, b"k") for i in range(n_shared)]
events += [parse_event({{"event_id": f"{{proc}}-{{i}}", "session_id": "p", "item_id": "SKU-2",
                         "type": "impression", "position": 1 + i % 10}}, b"k")
           for i in range(n_own)]
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
accepted = duplicates = 0
for i in range(0, len(events), 10):          # many small appends, interleaved with the others
    r = log.append(events[i:i + 10])
    accepted += r.accepted
    duplicates += r.duplicates
log.close()
print(json.dumps({{"accepted": accepted, "duplicates": duplicates}}), flush=True)
"""


def test_an_id_resent_with_another_payload_is_a_conflict_and_stores_nothing(elog):
    now = time.time()
    first = live("c1", now, ts=now - 60)
    assert elog.append([first]) == AppendResult(1, 0, frozenset({"c1"}))
    logged = elog.read(0)
    # a retry: the server's time differs, the payload does not
    assert elog.append([live("c1", now + 5, ts=now - 60)]) == AppendResult(0, 1)
    for patch in ({"item_id": "SKU-2"}, {"type": "purchase"}, {"session_id": "s2"},
                  {"query": "hammer"}, {"position": 3}, {"user_id": "carol"}, {"user_id": None},
                  {"query": None}, {"ts": now - 61}):
        other = live("c1", now + 5, **{"ts": now - 60, **patch})
        assert elog.append([other]) == AppendResult(0, 0, frozenset(), frozenset({"c1"})), patch
    # a conflict anywhere in an append stores none of it, not even its new events
    assert elog.append([live("c2", now), live("c1", now, ts=now - 1), first]) == AppendResult(
        0, 1, frozenset(), frozenset({"c1"}))
    # an id twice in one append: the same payload is a duplicate, another one a conflict
    assert elog.append([live("c3", now), live("c3", now, position=9)]) == AppendResult(
        0, 0, frozenset(), frozenset({"c3"}))
    assert elog.read(0) == logged and elog.count() == 1
    assert elog.append([live("c3", now), live("c3", now + 1)]) == AppendResult(
        1, 1, frozenset({"c3"}))
    # without a ts of its own, a live event's retry matches whatever the server's clock says
    assert elog.append([live("c4", now)]) == AppendResult(1, 0, frozenset({"c4"}))
    assert elog.append([live("c4", now + 30)]) == AppendResult(0, 1)
    assert elog.append([live("c4", now + 30, ts=now + 10)]) == AppendResult(0, 1)
    assert elog.append([live("c4", now + 30, item_id="SKU-3")]).conflicts == {"c4"}
    assert [x.event.event_id for x in elog.read(0)] == ["c1", "c3", "c4"]


def test_a_dedupe_marker_from_before_payloads_were_compared_matches_any_payload(redis_server):
    prefix = unique_prefix()
    log = RedisEventLog(redis_server.url, prefix)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client.set(f"{prefix}:event-id:old", "1")  # what an older version wrote
        now = time.time()
        assert log.append([live("old", now), live("old", now, item_id="SKU-9")]) == AppendResult(
            0, 2)
        assert log.count() == 0
        assert log.append([live("new", now)]) == AppendResult(1, 0, frozenset({"new"}))
        marker = client.get(f"{prefix}:event-id:new")
        digest, ts = marker.split(" ")
        assert len(digest) == 32 and ts == "-"              # a digest: no query or user in it
        assert "drill" not in marker and "bob" not in marker
    finally:
        client.close()
        log.close()


def test_threads_and_processes_lose_nothing_and_store_each_id_once(elog, backend):
    threads_n, per_thread = 8, 50
    n_shared, n_own = 80, 120                       # 200 events per process, 80 ids in common
    code = _WRITER.format(open_log=backend.snippet)
    procs = [subprocess.Popen([sys.executable, "-c", code, *backend.args, name, str(n_shared),
                               str(n_own)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("procA", "procB")]
    try:
        for p in procs:
            line = p.stdout.readline()
            assert line.strip() == "ready", f"writer did not start: {line!r} {p.stderr.read()}"

        totals: Counter[str] = Counter()
        errors: list[BaseException] = []
        barrier = threading.Barrier(threads_n + 1)
        lock = threading.Lock()

        def writer(t: int) -> None:
            try:
                barrier.wait()
                for i in range(per_thread):
                    r = elog.append([ev(f"thread{t}-{i}", session_id=f"t{t}")])
                    with lock:
                        totals["accepted"] += r.accepted
                        totals["duplicates"] += r.duplicates
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        for th in pool:
            th.start()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        barrier.wait()
        for th in pool:
            th.join(timeout=120)
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not errors, errors

    expected = ({f"thread{t}-{i}" for t in range(threads_n) for i in range(per_thread)}
                | {f"shared-{i}" for i in range(n_shared)}
                | {f"{name}-{i}" for name in ("procA", "procB") for i in range(n_own)})
    logged = read_all(elog)
    ids = [x.event.event_id for x in logged]
    assert len(ids) == len(set(ids)), [i for i, c in Counter(ids).items() if c > 1][:10]
    assert set(ids) == expected
    offsets = [x.offset for x in logged]
    assert all(a < b for a, b in zip(offsets, offsets[1:], strict=False))
    assert totals["accepted"] == threads_n * per_thread and totals["duplicates"] == 0
    assert sum(r["accepted"] for r in results) == 2 * n_own + n_shared
    assert sum(r["duplicates"] for r in results) == n_shared
    assert elog.last_offset() == offsets[-1]


# -- Redis specifics ------------------------------------------------------------------------


def _run_id(url: str) -> str:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return client.info("server")["run_id"]
    finally:
        client.close()


@pytest.mark.parametrize("how", ["graceful", "crash"])
def test_acknowledged_events_survive_a_server_restart(tmp_path, how):
    with running_redis(tmp_path / "redis") as srv:
        prefix = unique_prefix()
        log = RedisEventLog(srv.url, prefix)
        events = sample_events(time.time())
        assert log.append(events) == AppendResult(5, 0, frozenset({"e1", "e2", "e3", "e4", "e5"}))
        before = log.read(0)
        first_run, first_pid = _run_id(srv.url), srv.proc.pid

        if how == "crash":
            srv.proc.kill()               # SIGKILL by PID: no shutdown hook, only the fsynced AOF
            srv.proc.wait()
        port = srv.port
        srv.restart()
        assert srv.port == port and srv.proc.pid != first_pid
        assert _run_id(srv.url) != first_run

        reopened = RedisEventLog(srv.url, prefix)
        assert reopened.read(0) == before
        assert reopened.last_offset() == before[-1].offset
        assert reopened.append(events) == AppendResult(0, 5)         # dedupe state survived too
        # the old client reconnects on its own, and offsets keep increasing after the restart
        assert log.read(0) == before
        assert log.append([ev("after-restart")]) == AppendResult(1, 0, frozenset({"after-restart"}))
        assert log.last_offset() > before[-1].offset
        reopened.close()
        log.close()


def test_unreachable_redis_is_a_clear_error():
    from serving.errors import InstantrecError
    from tests.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(InstantrecError, match="cannot reach Redis at redis://127.0.0.1"):
        RedisEventLog(url)
    with pytest.raises(InstantrecError, match="cannot reach Redis"):
        RedisSessionStore(url)


def test_session_state_round_trips(redis_server):
    store = RedisSessionStore(redis_server.url, unique_prefix(), ttl_s=60)
    try:
        state = SessionState(
            interactions=(Interaction("SKU-1", 1.0, 1_700_000_000.123456),
                          Interaction("SKU-ü", 3.0, 1_700_000_100.5)),
            shift_ts=1_700_000_050.25, last_ts=1_700_000_100.5, extra={"clicks": 2.0})
        assert store.get("s1") is None
        store.put("s1", state)
        got = store.get("s1")
        assert got == state and isinstance(got.interactions, tuple)
        assert all(type(i.ts) is float and type(i.weight) is float for i in got.interactions)
        assert store.get("s2") is None
        store.put("s2", SessionState())
        assert store.get("s2") == SessionState()
        client = redis.Redis.from_url(redis_server.url)
        try:
            ttl_ms = client.pttl(f"{store.prefix}:session:s1")
        finally:
            client.close()
        assert 0 < ttl_ms <= 60_000
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_concurrent_session_updates_lose_no_interaction(redis_server, backend):
    """Two replicas (two connections, two threads each) record into one session at once:
    every interaction is kept (a get-then-put kept 158 of 400 here)."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.session import MemorySessionStore, SessionConfig

    cfg = SessionConfig(max_interactions=10_000)
    prefix = unique_prefix()
    memory = MemorySessionStore()
    stores = ([RedisSessionStore(redis_server.url, prefix, ttl_s=60) for _ in range(2)]
              if backend == "redis" else [memory, memory])
    per_writer, writers = 100, 4

    def write(w: int) -> None:
        store = stores[w % 2]
        for i in range(per_writer):
            store.update("s-race", lambda cur, i=i: (cur or SessionState()).add(
                f"SKU-{w}-{i}", 1.0, time.time(), cfg))

    try:
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(write, range(writers)))
        got = stores[0].get("s-race")
        assert len({it.item_id for it in got.interactions}) == per_writer * writers
    finally:
        if backend == "redis":
            for store in stores:
                store.close()


def test_sessions_expire(redis_server):
    store = RedisSessionStore(redis_server.url, unique_prefix(), ttl_s=1)
    try:
        store.put("s1", SessionState(interactions=(Interaction("SKU-1", 1.0, time.time()),)))
        assert store.get("s1") is not None
        time.sleep(1.5)
        assert store.get("s1") is None
    finally:
        store.close()


def test_two_replicas_share_sessions_and_the_log(redis_server, demo_home, encoder):
    prefix = unique_prefix()
    settings = make_settings(demo_home, sessions_backend="redis", events_backend="redis",
                             redis_url=redis_server.url, redis_prefix=prefix,
                             user_id_key="replica-test-key")
    a = Recommender.load(demo_home, settings=settings, encoder=encoder, watch=False)
    b = Recommender.load(demo_home, settings=settings, encoder=encoder, watch=False)
    try:
        item = read_demo_rows()[7]["id"]
        stored = a.record({"session_id": "s1", "item_id": item, "type": "click",
                           "query": "something to browse", "user_id": "alice"})
        results = b.recommend(None, session_id="s1", k=10)
        assert item in [r.item_id for r in results]
        with pytest.raises(QueryError, match="no recent interactions"):
            b.recommend(None, session_id="other")

        # both replicas (and the updater) read one log
        log = RedisEventLog(redis_server.url, prefix)
        try:
            logged = log.read(0)
        finally:
            log.close()
        assert [x.event for x in logged] == [stored]
        assert stored.user == pseudonymise("alice", b"replica-test-key")
        # re-sending on the other replica is a no-op
        b.record(stored)
        assert b.counters["events_duplicate"] == 1 and a.counters["events_recorded"] == 1

        text = redis_text(redis_server.url)
        assert any(prefix in t for t in text) and any(stored.user in t for t in text)
        assert not [t for t in text if "alice" in t.lower()]
    finally:
        a.close()
        b.close()


def test_a_scaled_out_replica_refuses_to_start_without_the_shared_user_key(redis_server, demo_home,
                                                                         tmp_path):
    from pipelines.cli import main
    from serving.errors import ConfigurationError
    from serving.recommender import Recommender

    settings = make_settings(demo_home, events_backend="redis", redis_url=redis_server.url,
                             redis_prefix=unique_prefix())
    with pytest.raises(ConfigurationError, match="set INSTANTREC_USER_ID_KEY"):
        Recommender.load(settings=settings, watch=False)
    with pytest.raises(ConfigurationError, match="set INSTANTREC_USER_ID_KEY"):
        settings.user_key()
    env = {"INSTANTREC_SESSIONS_BACKEND": "redis", "INSTANTREC_REDIS_URL": redis_server.url}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("INSTANTREC_USER_ID_KEY", raising=False)
        assert main(["--home", str(tmp_path), "serve", "--port", "1"]) == 2
