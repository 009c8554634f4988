"""Two serving replicas and one updater on one Redis (``instantrec bench replicas``).

The scaled-out set-up on loopback, every process as an operator starts it: a ``redis-server``
(AOF ``appendfsync everysec`` here, Redis's production setting; the tests run ``always``), two
``instantrec serve`` replicas (``INSTANTREC_EVENTS_BACKEND=redis``,
``INSTANTREC_SESSIONS_BACKEND=redis``, one user-id key) and one ``instantrec nearline`` reading
the stream through its consumer group. The processes share the home's files (the release and
the ranker checkpoints, as a shared volume would) and the Redis; everything binds 127.0.0.1 and
is stopped by PID. :class:`Deployment` starts them; ``tests/integration/test_replicas.py``
starts the same.

Three figures:

1. events/s accepted through the two replicas together: ``--clients`` threads post
   ``POST /events`` batches (one result list per request: 10 impressions, a position-biased
   click, some carts and purchases, as ``bench nearline`` makes them) to the replicas in
   turns, over keep-alive connections, until ``--events`` are recorded; the updater is not
   running yet, so the backlog stays in the stream;
2. events/s the single updater consumes from the group: it is started on that backlog and
   timed until its checkpoint covers the stream's last entry and the group has 0 entries
   pending (``XPENDING``): from its first checkpoint on (the events after it over the time
   after it; its first batch also loads the query encoder), and from its first read (its
   consumer appears in the group);
3. freshness across replicas: a purchase posted to replica A (the page shown, a click, the
   purchase, in a session of its own), timed until replica B's ``POST /recommend`` for the
   query, in a fresh session, shows the item's (query, item) memory moved (the probe of
   ``bench nearline``: ``signals["query_item_bias"]``), with the rank before and after.

A probe B never shows within the deadline, or a figure that is not finite, fails the
benchmark (exit code 2) instead of printing a figure.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import redis

from pipelines.benchmarks.nearline import (
    LOOK_DEPTH,
    PROBE_DEADLINE_S,
    QUERIES,
    _prepare_home,
    add_freshness_arguments,
    freshness_report,
)
from pipelines.service import NearlineProcess, RedisProcess, ServiceProcess
from serving.checkpoint import read_latest
from serving.errors import MeasurementError
from serving.redis_backends import RedisEventLog, decode_offset
from serving.schema import ITEM_ID
from serving.settings import Settings

REPLICAS = 2
DRAIN_TIMEOUT_S = 600.0
UPDATER_START_TIMEOUT_S = 120.0


# -- HTTP -----------------------------------------------------------------------------------

class Client:
    """JSON over one keep-alive HTTP/1.1 connection to a replica on 127.0.0.1:``port``
    (reconnects when the server closed it); one per thread."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        """The status and JSON body of ``POST path`` with ``payload``."""
        body = json.dumps(payload).encode()
        try:
            return self._send(path, body)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # a keep-alive connection the server had closed, once: a new one (an /events
            # request that had been taken would come back as duplicates, which the callers
            # count as a failure)
            self.close()
            return self._send(path, body)

    def _send(self, path: str, body: bytes) -> tuple[int, Any]:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        self._conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = self._conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")

    def recommend(self, query: str | None, k: int = 10,
                  session_id: str | None = None) -> dict[str, Any]:
        """``POST /recommend``; raises MeasurementError on anything but 200."""
        payload: dict[str, Any] = {"query": query, "k": k}
        if session_id is not None:
            payload["session_id"] = session_id
        status, out = self.post("/recommend", payload)
        if status != 200:
            raise MeasurementError(f"POST /recommend on port {self.port} answered {status}: "
                                   f"{out}")
        return out

    def events(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """``POST /events`` with a batch; raises MeasurementError on anything but 200."""
        status, out = self.post("/events", {"events": events})
        if status != 200:
            raise MeasurementError(f"POST /events on port {self.port} answered {status}: {out}")
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- the deployment -------------------------------------------------------------------------

class Deployment:
    """``replicas`` serving processes and one nearline updater for ``home``, sharing the Redis
    at ``redis_url`` (keys under ``prefix``; the updater's group ``group``) and the user-id
    key ``user_key``; their output goes to ``work``. Start with :meth:`start_replicas` and
    :meth:`start_updater` (in either order), stop with :meth:`stop` (by PID)."""

    def __init__(self, home: Path, work: Path, redis_url: str, *, prefix: str | None = None,
                 group: str | None = None, user_key: str | None = None,
                 replicas: int = REPLICAS, reload_interval_s: float = 1.0,
                 checkpoint_every_s: float = 0.5) -> None:
        self.home = Path(home)
        self.work = Path(work)
        self.redis_url = redis_url
        self.prefix = prefix or f"replicas{uuid.uuid4().hex[:12]}"
        self.group = group or f"{self.prefix}:nearline"
        self.user_key = user_key or uuid.uuid4().hex + uuid.uuid4().hex
        self.reload_interval_s = reload_interval_s
        self.checkpoint_every_s = checkpoint_every_s
        self.env = {
            "INSTANTREC_EVENTS_BACKEND": "redis", "INSTANTREC_SESSIONS_BACKEND": "redis",
            "INSTANTREC_REDIS_URL": redis_url, "INSTANTREC_REDIS_PREFIX": self.prefix,
            "INSTANTREC_REDIS_GROUP": self.group, "INSTANTREC_USER_ID_KEY": self.user_key,
            "INSTANTREC_RELOAD_INTERVAL_S": str(reload_interval_s),
            "INSTANTREC_CHECKPOINT_EVERY_S": str(checkpoint_every_s),
        }
        self.replicas = [ServiceProcess(self.home, self.work / f"serve-{i}.log", env=self.env)
                         for i in range(replicas)]
        self.updater = NearlineProcess(self.home, self.work / "nearline.log", env=self.env)
        self._log: RedisEventLog | None = None

    @property
    def log(self) -> RedisEventLog:
        """The event log the replicas write, opened by this (observing) process."""
        if self._log is None:
            self._log = RedisEventLog(self.redis_url, self.prefix)
        return self._log

    def start_replicas(self) -> Deployment:
        """Start every replica, then wait until each answers ``/readyz``."""
        for replica in self.replicas:
            replica.spawn()
        for replica in self.replicas:
            replica.wait()
        return self

    def start_updater(self, wait: bool = True) -> float:
        """Start the updater; with ``wait``, return the time (``time.monotonic()``) its
        consumer first showed in the group, i.e. it began to read."""
        self.updater.spawn()
        return self.wait_updater_reading() if wait else time.monotonic()

    def wait_updater_reading(self, timeout_s: float = UPDATER_START_TIMEOUT_S) -> float:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self.updater.check_alive()
                try:
                    if client.xinfo_consumers(self.log.stream, self.group):
                        return time.monotonic()
                except redis.ResponseError:  # no stream or no group yet
                    pass
                time.sleep(0.005)
        finally:
            client.close()
        raise MeasurementError(f"the nearline updater did not read through group {self.group} "
                               f"within {timeout_s:.0f} s:\n{self.updater.output()}")

    def wait_first_checkpoint(self, timeout_s: float = DRAIN_TIMEOUT_S) -> tuple[float, int]:
        """Block until the updater has published a checkpoint past offset 0; returns when
        (``time.monotonic()``) it was seen and how many stream entries it covers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.updater.check_alive()
            latest = read_latest(self.home)
            if latest is not None and latest.offset > 0:
                seen = time.monotonic()
                client = redis.Redis.from_url(self.redis_url, decode_responses=True)
                try:
                    covered = len(client.xrange(self.log.stream, min="-",
                                                max=decode_offset(latest.offset)))
                finally:
                    client.close()
                return seen, covered
            time.sleep(0.005)
        raise MeasurementError(f"the nearline updater published no checkpoint within "
                               f"{timeout_s:.0f} s:\n{self.updater.output()}")

    def pending(self) -> int:
        """Entries the updater's group holds delivered and not yet acknowledged (XPENDING)."""
        return self.log.consumer_group(self.group, "observer").pending()

    def wait_drained(self, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        """Block until the updater's checkpoint covers the stream's last entry and its group
        has nothing pending; returns when (``time.monotonic()``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.updater.check_alive()
            last = self.log.last_offset()
            latest = read_latest(self.home)
            if latest is not None and latest.offset >= last and self.pending() == 0:
                return time.monotonic()
            time.sleep(0.01)
        raise MeasurementError(f"the nearline updater did not checkpoint the stream's end "
                               f"within {timeout_s:.0f} s:\n{self.updater.output()}")

    def pids(self) -> dict[str, int]:
        """The PIDs of the processes started here (running or not yet reaped)."""
        out = {f"serve-{i}": r.pid for i, r in enumerate(self.replicas) if r.proc is not None}
        if self.updater.proc is not None:
            out["nearline"] = self.updater.pid
        return out

    def stop(self) -> None:
        """Stop the updater and the replicas, each by its PID (SIGTERM, then SIGKILL)."""
        self.updater.stop()
        for replica in self.replicas:
            replica.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- traffic --------------------------------------------------------------------------------

def result_lists(pages: dict[str, list[str]], n_events: int, tag: str, seed: int = 0,
                 ) -> list[list[dict[str, Any]]]:
    """Result lists as a shop's client posts them, one session each, at least ``n_events``
    events in all: the page's impressions, a click at a position-biased position, an
    add-to-cart for one in ten and a purchase for one in thirty. Users (raw ids, which the
    replicas hash) have two sessions each; event ids start with ``tag``."""
    rng = random.Random(seed)
    out: list[list[dict[str, Any]]] = []
    total = 0
    queries = sorted(pages)
    while total < n_events:
        i = len(out)
        q = queries[i % len(queries)]
        items = pages[q]
        common = {"session_id": f"{tag}-s{i}", "user_id": f"{tag}-user-{i // 2}", "query": q}
        batch = [{**common, "event_id": f"{tag}-{i}-i{p}", ITEM_ID: item, "type": "impression",
                  "position": p} for p, item in enumerate(items, start=1)]
        pos = min(int(rng.expovariate(0.4)) + 1, len(items))
        batch.append({**common, "event_id": f"{tag}-{i}-c", ITEM_ID: items[pos - 1],
                      "type": "click", "position": pos})
        roll = rng.random()
        if roll < 0.1:
            batch.append({**common, "event_id": f"{tag}-{i}-a", ITEM_ID: items[pos - 1],
                          "type": "add_to_cart"})
        if roll < 1 / 30:
            batch.append({**common, "event_id": f"{tag}-{i}-p", ITEM_ID: items[pos - 1],
                          "type": "purchase"})
        out.append(batch)
        total += len(batch)
    return out


def pages_of(client: Client, queries: list[str] | tuple[str, ...] = QUERIES,
             k: int = 10) -> dict[str, list[str]]:
    """The first page a replica serves each query (no session)."""
    return {q: [r[ITEM_ID] for r in client.recommend(q, k=k)["results"]] for q in queries}


def post_lists(ports: list[int], lists: list[list[dict[str, Any]]], clients: int,
               ) -> dict[str, Any]:
    """Post ``lists`` (one ``POST /events`` each) from ``clients`` threads, list i to replica
    ``i % len(ports)``; returns what was recorded and how fast. Raises MeasurementError on any
    answer but 200 or an event not recorded exactly once."""
    if clients < 1:
        raise MeasurementError("--clients must be at least 1")
    next_list = itertools.count()
    lock = threading.Lock()
    per_replica = [0] * len(ports)
    latencies: list[float] = []
    errors: list[Exception] = []

    def work() -> None:
        conns = [Client(port) for port in ports]
        own: list[float] = []
        try:
            while True:
                with lock:
                    i = next(next_list)
                if i >= len(lists) or errors:
                    return
                replica = i % len(ports)
                t0 = time.perf_counter()
                out = conns[replica].events(lists[i])
                own.append(time.perf_counter() - t0)
                if out["recorded"] != len(lists[i]) or out["duplicates"]:
                    raise MeasurementError(f"replica {replica} recorded {out['recorded']} of "
                                           f"{len(lists[i])} new events ({out['duplicates']} "
                                           "duplicates)")
                with lock:
                    per_replica[replica] += out["recorded"]
        except Exception as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
        finally:
            with lock:
                latencies.extend(own)
            for conn in conns:
                conn.close()

    threads = [threading.Thread(target=work, name=f"bench-client-{c}") for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    recorded = sum(per_replica)
    ms = np.asarray(latencies) * 1000
    return {"events": recorded, "requests": len(lists), "clients": clients,
            "seconds": round(wall, 3), "events_per_s": round(recorded / wall, 1),
            "events_per_replica": per_replica,
            "request_p50_ms": round(float(np.percentile(ms, 50)), 3),
            "request_p95_ms": round(float(np.percentile(ms, 95)), 3)}


# -- freshness across replicas ----------------------------------------------------------------

def probe_state(client: Client, query: str, item_id: str,
                session_id: str) -> tuple[int, dict[str, float] | None]:
    """What a replica serves ``item_id`` for ``query`` in session ``session_id``: the ranker
    checkpoint it scored with, and the item's (query, item) memory, logit and rank (None if
    it is not among the first LOOK_DEPTH results)."""
    out = client.recommend(query, k=LOOK_DEPTH, session_id=session_id)
    for r in out["results"]:
        if r[ITEM_ID] == item_id:
            return out["ranker_seq"], {"memory": r["signals"]["query_item_bias"],
                                       "logit": r["signals"]["logit"], "rank": r["rank"]}
    return out["ranker_seq"], None


def probe(deployment: Deployment, a: Client, b: Client, query: str, item_id: str,
          page: list[str], tag: str, deadline_s: float = PROBE_DEADLINE_S) -> dict[str, Any]:
    """One purchase of ``item_id`` (shown on ``page`` for ``query``) posted to replica ``a``,
    timed until replica ``b`` serves its moved (query, item) memory in a fresh session. Each
    of ``b``'s requests is a new session, so what moves is shared state, not a session's.
    Returns the row :func:`pipelines.benchmarks.nearline.freshness_report` takes (``lag_s``
    None when ``b`` never showed it within ``deadline_s``)."""
    fresh = (f"{tag}-watch-{n}" for n in itertools.count())
    # first B serves the live checkpoint, so "before" is what the shop serves now and a
    # checkpoint loaded later can only bring this purchase
    latest = read_latest(deployment.home)
    sync_by = time.monotonic() + deadline_s
    while True:
        seq, before = probe_state(b, query, item_id, next(fresh))
        if latest is None or seq >= latest.seq or time.monotonic() > sync_by:
            break
        time.sleep(0.01)
    if latest is not None and seq < latest.seq:
        raise MeasurementError(f"replica B did not load checkpoint {latest.seq} (serves {seq})")
    if before is None:
        raise MeasurementError(f"{item_id} is not in replica B's first {LOOK_DEPTH} results "
                               f"for {query!r}: the probe cannot be watched")
    session = f"{tag}-buyer"
    shown = [{"event_id": f"{tag}-i{p}", "session_id": session, "query": query, ITEM_ID: it,
              "type": "impression", "position": p} for p, it in enumerate(page, start=1)]
    t0 = time.time()
    a.events([*shown,
              {"event_id": f"{tag}-c", "session_id": session, "query": query, ITEM_ID: item_id,
               "type": "click", "position": page.index(item_id) + 1},
              {"event_id": f"{tag}-p", "session_id": session, "query": query, ITEM_ID: item_id,
               "type": "purchase"}])
    after, seen = None, None
    while time.time() - t0 < deadline_s:
        _, now = probe_state(b, query, item_id, next(fresh))
        if now is not None and now["memory"] != before["memory"]:
            after, seen = now, time.time()
            break
        time.sleep(0.01)
    return {"query": query, ITEM_ID: item_id, "before": before, "after": after,
            "lag_s": None if seen is None else seen - t0}


def freshness(deployment: Deployment, probes: int, tag: str) -> list[dict[str, Any]]:
    """``probes`` purchases through replica A watched on replica B (see :func:`probe`); the
    item of probe i is the (i % 3 + 1)-th of A's page for the query."""
    a, b = (Client(r.port) for r in deployment.replicas[:2])
    rows: list[dict[str, Any]] = []
    try:
        for i in range(probes):
            q = QUERIES[i % len(QUERIES)]
            page = [r[ITEM_ID] for r in a.recommend(q, k=10)["results"]]
            rows.append(probe(deployment, a, b, q, page[i % 3], page, f"{tag}-probe{i}"))
            time.sleep(0.1)
    finally:
        a.close()
        b.close()
    return rows


# -- the whole benchmark --------------------------------------------------------------------

def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def bench_replicas(settings: Settings, n_events: int = 20_000, clients: int = 8,
                   probes: int = 20, appendfsync: Literal["always", "everysec"] = "everysec",
                   checkpoint_every_s: float | None = None,
                   reload_interval_s: float | None = None) -> dict[str, Any]:
    """The three figures (see the module) on a private copy of ``settings.home``'s live
    release and ranker; the intervals default to the settings' (what a shop runs)."""
    if n_events < 1 or probes < 1:
        raise MeasurementError("--events and --probes must be at least 1")
    checkpoint_every_s = checkpoint_every_s or settings.checkpoint_every_s
    reload_interval_s = reload_interval_s or settings.reload_interval_s
    work = Path(tempfile.mkdtemp(prefix="instantrec-bench-replicas-"))
    try:
        home, held = _prepare_home(settings, work)
        with RedisProcess(work / "redis", appendfsync=appendfsync) as server, \
                Deployment(home, work / "logs", server.url, reload_interval_s=reload_interval_s,
                           checkpoint_every_s=checkpoint_every_s) as deployment:
            deployment.start_replicas()
            ports = [r.port for r in deployment.replicas]
            first = Client(ports[0])
            try:
                pages = pages_of(first)
            finally:
                first.close()
            lists = result_lists(pages, n_events, tag="load")

            # 1. events/s through both replicas (the backlog stays in the stream)
            ingest = post_lists(ports, lists, clients)
            backlog = deployment.log.count()
            if backlog != ingest["events"]:
                raise MeasurementError(f"the replicas answered {ingest['events']} events "
                                       f"recorded, the stream holds {backlog}")

            # 2. the updater drains it through its consumer group. Its first batch also
            # loads the query encoder (the first query it meets): the rate is timed from its
            # first checkpoint on, and also reported from its first read
            spawned = time.monotonic()
            began = deployment.start_updater()
            first, covered = deployment.wait_first_checkpoint()
            drained = deployment.wait_drained()
            latest = read_latest(home)
            if covered >= backlog or drained <= first:
                raise MeasurementError(f"the updater's first checkpoint covered the whole "
                                       f"backlog ({backlog} events): nothing left to time; "
                                       "post more (--events)")
            updater = {"backlog_events": backlog, "startup_s": round(began - spawned, 3),
                       "first_checkpoint_s": round(first - began, 3),
                       "events_in_first_checkpoint": covered,
                       "drain_seconds": round(drained - began, 3),
                       "events_per_s": round((backlog - covered) / (drained - first), 1),
                       "events_per_s_from_first_read": round(backlog / (drained - began), 1),
                       "pending_after": deployment.pending(),
                       "checkpoint_offset_is_stream_end":
                           latest is not None and latest.offset == deployment.log.last_offset()}

            # 3. freshness across replicas
            rows = freshness(deployment, probes, tag="fresh")
            out: dict[str, Any] = {
                "set_up": {
                    "redis": f"redis-server {redis_version(server.url)} on 127.0.0.1, AOF "
                             f"(appendonly yes, appendfsync {appendfsync})",
                    "replicas": len(deployment.replicas), "server": "uvicorn",
                    "http_threads_per_replica": settings.http_threads,
                    "updater": "one `instantrec nearline` through consumer group "
                               f"{deployment.group}",
                    "checkpoint_every_s": checkpoint_every_s,
                    "serving_reload_interval_s": reload_interval_s,
                    "home": held, "cpu_count": os.cpu_count(),
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
                "ingest": ingest, "updater": updater}
            return freshness_report(rows, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_arguments(p: Any) -> None:
    p.add_argument("--home", dest="replicas_home", metavar="HOME", type=Path, default=None,
                   help="home whose live release (and ranker) to copy and run on (default: "
                        "the settings' home, built by `make demo`)")
    p.add_argument("--events", type=int, default=20_000,
                   help="events posted through the two replicas (whole result lists)")
    p.add_argument("--clients", type=int, default=8, help="client threads posting them")
    add_freshness_arguments(p)


def run(settings: Settings, args: Any) -> dict[str, Any]:
    if args.replicas_home is not None:
        settings = settings.model_copy(update={"home": args.replicas_home})
    return bench_replicas(settings, n_events=args.events, clients=args.clients,
                          probes=args.probes, checkpoint_every_s=args.checkpoint_every_s,
                          reload_interval_s=args.reload_interval_s)
