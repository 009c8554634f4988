"""Flood probe: one session and one user flood a real ``instantrec serve`` while shoppers
shop at a person's pace; the per-session and per-user rate limits must hold and no shopper
may be refused or starved.

The server runs as operators start it (its own process on 127.0.0.1, stopped by PID) on a
copy of the live release. Shoppers first shop alone (the baseline latency), then beside the
flood: ``flooders`` threads sending as fast as they can, half ``POST /recommend`` for one
session, half ``POST /events`` for one user across ever new sessions (the per-user limit). The
limits are set low for the probe (2 recommendations, 5 event posts a second; bursts of
twice that), so that what this machine can send is a flood of 100x and more.
"""

from __future__ import annotations

import itertools
import logging
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.reliability import figures

RATE_RECOMMEND, RATE_EVENTS = 2.0, 5.0


def _queries(home: Path, n: int, seed: int) -> tuple[list[str], list[str]]:
    from serving.release import ITEMS_FILE, current_bundle_dir, load_items

    items = load_items(current_bundle_dir(home / "releases") / ITEMS_FILE)
    rng = random.Random(seed)
    rows = rng.sample(range(len(items.titles)), min(n, len(items.titles)))
    titles = items.titles.tolist()
    return ([" ".join(str(titles[r]).split()[:3]) for r in rows],
            [str(items.item_ids[r]) for r in rows])


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values) * 1000.0, q)), 2) if values else 0.0


def run_flood(source: Path, work: Path, seconds: float = 60.0, baseline_s: float = 20.0,
              shoppers: int = 16, flooders: int = 4, seed: int = 0) -> dict[str, Any]:
    """Shoppers alone for ``baseline_s``, then beside the flood for ``seconds``."""
    import httpx

    from pipelines.service import ServiceProcess

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line for each request
    from serving.layout import releases_dir

    shutil.rmtree(work, ignore_errors=True)
    home = work / "home"
    shutil.copytree(releases_dir(source), releases_dir(home))
    queries, items = _queries(home, 200, seed)
    env = {"INSTANTREC_HTTP_RATE_RECOMMEND": str(RATE_RECOMMEND),
           "INSTANTREC_HTTP_RATE_EVENTS": str(RATE_EVENTS),
           "INSTANTREC_USER_ID_KEY": "flood-probe-key-0123456789abcdef"}
    server = ServiceProcess(home, work / "serve.log", env=env).start()
    phase = {"name": "baseline"}
    stop = threading.Event()
    lock = threading.Lock()
    shop: dict[str, dict[str, Any]] = {p: {"lat": [], "codes": []} for p in ("baseline", "flood")}
    flood: dict[str, list[int]] = {"recommend": [], "events": []}
    errors: list[str] = []
    flood_window: list[float] = []

    def shopper(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        session = f"shopper-{i}"
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            time.sleep(rng.uniform(0.0, 1.0))
            while not stop.is_set():
                body: dict[str, Any] = {"query": rng.choice(queries), "k": 10,
                                        "session_id": session}
                if rng.random() < 0.25:
                    body["filters"] = {"max_price": 100.0}
                name = phase["name"]
                t = time.perf_counter()
                try:
                    code = client.post("/recommend", json=body).status_code
                except httpx.HTTPError as exc:
                    code = -1
                    with lock:
                        errors.append(f"shopper: {type(exc).__name__}: {exc}"[:200])
                took = time.perf_counter() - t
                with lock:
                    shop[name]["codes"].append(code)
                    if code == 200:
                        shop[name]["lat"].append(took)
                # a person's pace: a search every 1-2 s, under the session's 2 a second
                stop.wait(rng.uniform(1.0, 2.0))

    def flooder(i: int) -> None:
        kind = "recommend" if i % 2 == 0 else "events"
        fresh = itertools.count()
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            while not stop.is_set():
                if kind == "recommend":
                    body: dict[str, Any] = {"query": queries[0], "k": 10,
                                            "session_id": "flood-session"}
                else:  # one user, a new session each time: only the per-user limit can hold
                    body = {"events": [{"type": "click", "item_id": items[0], "position": 1,
                                        "query": queries[0], "user_id": "flood-user",
                                        "session_id": f"flood-{i}-{next(fresh)}"}]}
                try:
                    code = client.post(f"/{kind}", json=body).status_code
                except httpx.HTTPError as exc:
                    code = -1
                    with lock:
                        errors.append(f"flooder: {type(exc).__name__}: {exc}"[:200])
                with lock:
                    flood[kind].append(code)

    pool = [threading.Thread(target=shopper, args=(i,), daemon=True) for i in range(shoppers)]
    try:
        for t in pool:
            t.start()
        time.sleep(baseline_s)
        phase["name"] = "flood"
        floods = [threading.Thread(target=flooder, args=(i,), daemon=True)
                  for i in range(flooders)]
        flood_window.append(time.monotonic())
        for t in floods:
            t.start()
        time.sleep(seconds)
        stop.set()
        flood_window.append(time.monotonic())
        for t in pool + floods:
            t.join(timeout=60)
        alive = server.proc is not None and server.proc.poll() is None
        healthy = alive and server.get("/healthz")[0] == 200
    finally:
        server.stop()
    span = flood_window[1] - flood_window[0]
    codes = shop["flood"]["codes"]
    result: dict[str, Any] = {}
    for kind, rate in (("recommend", RATE_RECOMMEND), ("events", RATE_EVENTS)):
        sent = flood[kind]
        ceiling = int(2 * rate + rate * span) + 1   # burst + refill over the flood
        result[f"flood_{kind}"] = {
            "sent": len(sent), "per_s": round(len(sent) / span, 1),
            "x_allowed_pace": round(len(sent) / span / rate, 1),
            "served": sent.count(200), "refused_429": sent.count(429),
            "other": len(sent) - sent.count(200) - sent.count(429),
            "ceiling": ceiling, "held": sent.count(200) <= ceiling}
    served = codes.count(200)
    return figures(
        tried=len(codes), survived=served, lost=len(codes) - served,
        crashed=0 if healthy else 1,
        shoppers=shoppers, flooders=flooders, flood_s=round(span, 1),
        limits_held=all(r["held"] for r in result.values()),
        shopper_refused_429=codes.count(429),
        shopper_failed=len(codes) - served - codes.count(429),
        shopper_requests_baseline=len(shop["baseline"]["codes"]),
        shopper_p50_baseline_ms=_pct(shop["baseline"]["lat"], 50),
        shopper_p99_baseline_ms=_pct(shop["baseline"]["lat"], 99),
        shopper_p50_flood_ms=_pct(shop["flood"]["lat"], 50),
        shopper_p99_flood_ms=_pct(shop["flood"]["lat"], 99),
        rates={"recommend_per_s": RATE_RECOMMEND, "events_per_s": RATE_EVENTS},
        errors=errors[:5], **result)
