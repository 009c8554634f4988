"""Latency and throughput through HTTP against in-process calls (``instantrec bench http``).

The same requests, on the home's live release, three ways, each in a fresh process:

- in process: ``Recommender.recommend()`` called directly (the figure ``bench serving``
  reports), in a child process of its own;
- through HTTP: ``instantrec serve`` started as an operator starts it (its own process, on
  loopback, stopped by PID), asked by a small asyncio client (raw HTTP/1.1 over keep-alive
  connections, so the client adds little) at 1, 4 and 16 concurrent clients;
- with each server of ``--servers`` (uvicorn, the default, and granian as the peer).

Two request mixes: *unseen* queries (each asked once: encoder, ANN, BM25 and the ranker all
run) and a *repeated* query (its candidates cached: the cheapest request, where the HTTP
overhead shows most). The overhead is HTTP p50 at one client minus in-process p50 on the same
requests. Queries come from the release's own item titles (the first words of each title,
distinct), so the benchmark runs on any home. Figures are medians over ``--repeats``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import MeasurementError
from serving.settings import Settings

LEVELS = (1, 4, 16)
TARGET_OVERHEAD_MS = 1.0


def add_arguments(p: Any) -> None:
    p.add_argument("--queries", type=int, default=60, help="unseen queries per client level")
    p.add_argument("--repeated", type=int, default=300,
                   help="requests of the repeated (cached) query per level")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement")
    p.add_argument("--servers", default="uvicorn,granian",
                   help="comma-separated HTTP servers (uvicorn, granian)")
    p.add_argument("--k", type=int, default=10)


def run(settings: Settings, args: Any) -> dict[str, Any]:
    servers = [s for s in args.servers.split(",") if s]
    return bench_http(settings, n_queries=args.queries, n_repeated=args.repeated,
                      repeats=args.repeats, servers=servers, k=args.k)


# -- the request plan -----------------------------------------------------------------------

def plan(home: Path, n_queries: int, levels: tuple[int, ...] = LEVELS) -> dict[str, Any]:
    """Disjoint sets of distinct queries from the live release's titles: a warm-up, one set
    per client level, and the repeated query."""
    from pipelines.offline.splits import hash_unit
    from serving.layout import releases_dir
    from serving.release import current_bundle_dir, load_items

    try:
        bundle_dir = current_bundle_dir(releases_dir(home))
    except Exception as exc:  # noqa: BLE001 - no release: nothing to measure
        raise MeasurementError(f"bench http: no live release under {home} ({exc}); run "
                               "`make demo` or `instantrec build` first") from exc
    titles = load_items(bundle_dir / "items.parquet").titles.tolist()
    seen: dict[str, None] = {}
    for title in titles:
        words = re.findall(r"[a-z0-9]+", str(title).lower())
        for size in (3, 2, 4):
            if len(words) >= size:
                seen.setdefault(" ".join(words[:size]), None)
    queries = sorted(seen, key=hash_unit)  # a fixed order that mixes the catalogue
    need = 10 + n_queries * len(levels)
    if len(queries) < need:
        raise MeasurementError(f"bench http: the live release gives {len(queries)} distinct "
                               f"queries, {need} are needed (--queries {n_queries})")
    sets = {f"c{c}": queries[10 + i * n_queries: 10 + (i + 1) * n_queries]
            for i, c in enumerate(levels)}
    return {"warmup": queries[:9], "repeated": queries[9], "unseen": sets,
            "release_dir": str(bundle_dir)}


def _summary(latencies: list[float], wall: float | None = None) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    out = {"p50_ms": round(float(np.percentile(ms, 50)), 3),
           "p95_ms": round(float(np.percentile(ms, 95)), 3),
           "p99_ms": round(float(np.percentile(ms, 99)), 3), "requests": len(latencies)}
    if wall:
        out["qps"] = round(len(latencies) / wall, 1)
    return out


# -- in process -----------------------------------------------------------------------------

def _inprocess() -> None:
    """Child: the plan's requests through ``Recommender.recommend`` (one thread)."""
    job = json.loads(sys.stdin.read())
    from serving.recommender import Recommender
    from serving.settings import Settings

    rec = Recommender.load(settings=Settings(home=Path(job["home"])), watch=False)
    for q in job["warmup"]:
        rec.recommend(q, k=job["k"])
    out: dict[str, Any] = {}
    lat = []
    for q in job["unseen"]:
        t0 = time.perf_counter()
        rec.recommend(q, k=job["k"])
        lat.append(time.perf_counter() - t0)
    out["unseen"] = _summary(lat)
    rec.recommend(job["repeated"], k=job["k"])
    lat = []
    for _ in range(job["n_repeated"]):
        t0 = time.perf_counter()
        rec.recommend(job["repeated"], k=job["k"])
        lat.append(time.perf_counter() - t0)
    out["repeated"] = _summary(lat)
    rec.close()
    print(json.dumps(out))


def in_process(home: Path, p: dict[str, Any], n_repeated: int, k: int) -> dict[str, Any]:
    job = {"home": str(home), "warmup": p["warmup"], "unseen": p["unseen"]["c1"],
           "repeated": p["repeated"], "n_repeated": n_repeated, "k": k}
    proc = subprocess.run(
        [sys.executable, "-c", "from pipelines.benchmarks.http import _inprocess; _inprocess()"],
        input=json.dumps(job), capture_output=True, text=True, check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise MeasurementError(f"bench http: the in-process child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- through HTTP ---------------------------------------------------------------------------

async def _ask(port: int, bodies: list[bytes], concurrency: int,
               ) -> tuple[list[float], float, dict[str, int], list[float]]:
    """Send ``bodies`` as POST /recommend over ``concurrency`` keep-alive connections; each
    connection sends its next request when the previous answer has arrived. Returns the
    latencies, the wall time, the status counts and, per answered request, the client's
    latency minus the server's own ``took_ms`` (the time around ``recommend()``): what HTTP
    added to that very request."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    answers: list[tuple[float, bytes]] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                request = (b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: "
                           + str(len(body)).encode() + b"\r\n\r\n" + body)
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1].decode()
                match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if match is None:
                    raise MeasurementError("bench http: a response without Content-Length "
                                           f"(status {status}); the client reads only those")
                payload = await reader.readexactly(int(match.group(1)))
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    answers.append((latencies[-1], payload))
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    added = [latency - json.loads(payload)["took_ms"] / 1000 for latency, payload in answers]
    return latencies, wall, statuses, added


def _bodies(queries: list[str], k: int) -> list[bytes]:
    return [json.dumps({"query": q, "k": k}).encode() for q in queries]


def through_http(home: Path, p: dict[str, Any], n_repeated: int, k: int, server: str,
                 log_dir: Path, levels: tuple[int, ...] = LEVELS) -> dict[str, Any]:
    from pipelines.service import ServiceProcess

    out: dict[str, Any] = {}
    with ServiceProcess(home, log_dir / f"serve-{server}.log", server=server) as proc:
        asyncio.run(_ask(proc.port, _bodies(p["warmup"], k), 1))  # same warm-up as in process
        asyncio.run(_ask(proc.port, _bodies([p["repeated"]], k), 1))
        for c in levels:
            for mix, queries in (("unseen", p["unseen"][f"c{c}"]),
                                 ("repeated", [p["repeated"]] * n_repeated)):
                lat, wall, statuses, added = asyncio.run(_ask(proc.port, _bodies(queries, k), c))
                _check(statuses, server, f"{mix} c{c}")
                out[f"{mix}_c{c}"] = {**_summary(lat, wall), "http_added_p50_ms": round(
                    float(np.percentile(np.asarray(added) * 1000, 50)), 3)}
    return out


def _check(statuses: dict[str, int], server: str, what: str) -> None:
    bad = {s: n for s, n in statuses.items() if s != "200"}
    if bad:
        raise MeasurementError(f"bench http: {server} answered {bad} to the {what} requests")


# -- the whole benchmark --------------------------------------------------------------------

def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = _median([r[key] for r in runs])
        else:
            out[key] = round(float(np.median([r[key] for r in runs])), 3)
    return out


def bench_http(settings: Settings, n_queries: int = 60, n_repeated: int = 300, repeats: int = 3,
               servers: list[str] | None = None, k: int = 10) -> dict[str, Any]:
    from serving.api import SERVERS

    servers = servers or ["uvicorn"]
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        raise MeasurementError(f"bench http: unknown server(s) {unknown} (one of {SERVERS})")
    if repeats < 1:
        raise MeasurementError("bench http: --repeats must be at least 1")
    home = Path(settings.home).resolve()
    p = plan(home, n_queries)
    inproc_runs: list[dict[str, Any]] = []
    http_runs: dict[str, list[dict[str, Any]]] = {s: [] for s in servers}
    with tempfile.TemporaryDirectory(prefix="instantrec-bench-http-") as tmp:
        for _ in range(repeats):  # interleaved, so a busy spell hits every contender alike
            inproc_runs.append(in_process(home, p, n_repeated, k))
            for server in servers:
                http_runs[server].append(through_http(home, p, n_repeated, k, server,
                                                      Path(tmp)))
    inproc = _median(inproc_runs)
    out: dict[str, Any] = {
        "release_dir": p["release_dir"], "k": k, "repeats": repeats,
        "unseen_queries_per_level": n_queries, "repeated_requests_per_level": n_repeated,
        "in_process": inproc, "loadavg_1m": round(os.getloadavg()[0], 2),
        "target_overhead_p50_ms": TARGET_OVERHEAD_MS,
    }
    for server in servers:
        figures = _median(http_runs[server])
        out[server] = figures
        # two views of what HTTP adds at one client: per request (its latency minus the
        # server's own time in recommend()), and p50 against the in-process child's p50
        out[f"{server}_overhead_p50_ms"] = {
            mix: {"per_request": figures[f"{mix}_c1"]["http_added_p50_ms"],
                  "vs_in_process": round(figures[f"{mix}_c1"]["p50_ms"]
                                         - inproc[mix]["p50_ms"], 3)}
            for mix in ("unseen", "repeated")}
    return out
