"""Event-log durability: the writer SIGKILLed mid-append, again and again.

A writer process appends batches of events whose every field follows from the event id, and
reports each batch to the probe only after ``append`` returned (the acknowledgement a client
gets). The probe kills it at a random instant, or inside an append's transaction (the
``eventlog.inserted`` failpoint), then reads the log as the updater does. Counted: a torn
event (a stored row whose fields are not the ones sent), a lost event (acknowledged, not
stored), a duplicated one (stored twice), and a log SQLite's integrity check rejects. The next
writer re-sends everything not acknowledged, as a client retries.

Durability mode: SQLite in WAL mode with ``synchronous=FULL``: an append returns only after
its commit is fsynced, so an acknowledged event survives a process kill and a power cut.
"""

from __future__ import annotations

import os
import random
import select
import sqlite3
from pathlib import Path
from typing import Any

from pipelines.reliability import figures, fork_call, kill, wait_exit
from serving.eventlog import SqliteEventLog
from serving.events import Event

T0 = 1_800_000_000.0
TYPES = ("impression", "click", "add_to_cart", "purchase")


def event_for(i: int) -> Event:
    """Event number ``i``: every field a function of ``i``, so a stored row can be checked."""
    return Event(event_id=f"e{i:09d}", ts=T0 + i, session_id=f"s{i % 97}",
                 user=f"{i % 31:064x}", query=f"query {i % 13}", item_id=f"item-{i % 311}",
                 type=TYPES[i % 4], position=i % 10 + 1, received=T0 + i)


def _writer(path: Path, start: int, seed: int, ack_fd: int) -> None:
    log = SqliteEventLog(path)
    rng = random.Random(seed)
    os.write(ack_fd, b"ready\n")
    i = start
    while True:
        n = rng.randint(1, 50)
        log.append([event_for(j) for j in range(i, i + n)])
        os.write(ack_fd, f"{i} {i + n}\n".encode())  # acknowledged: the append returned
        i += n


def _read_acks(fd: int, timeout_s: float) -> tuple[list[tuple[int, int]], bool]:
    """Ranges acknowledged so far, and whether the writer said it was ready."""
    data = b""
    while select.select([fd], [], [], timeout_s)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        timeout_s = 0.0
    ready = False
    ranges = []
    for line in data.decode().splitlines():
        if line == "ready":
            ready = True
        elif line:
            a, b = line.split()
            ranges.append((int(a), int(b)))
    return ranges, ready


def check_log(path: Path, acked: set[int]) -> dict[str, Any]:
    """Read the whole log as the updater does and count what is wrong with it."""
    con = sqlite3.connect(path)
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    log = SqliteEventLog(path)
    stored: dict[int, int] = {}
    torn = 0
    last = 0
    out_of_order = 0
    after = 0
    while batch := log.read(after, 5000):
        for logged in batch:
            i = int(logged.event.event_id[1:])
            stored[i] = stored.get(i, 0) + 1
            if logged.event != event_for(i):
                torn += 1
            if logged.offset <= last:
                out_of_order += 1
            last = logged.offset
        after = batch[-1].offset
    log.close()
    return {"integrity": integrity, "stored": len(stored), "torn": torn,
            "lost": len(acked - stored.keys()),
            "duplicated": sum(c - 1 for c in stored.values()), "out_of_order": out_of_order}


def run_append_kills(work: Path, kills: int = 200, seed: int = 0) -> dict[str, Any]:
    """Kill the event-log writer ``kills`` times (half at random instants, half inside an
    append's transaction) and check the log after each kill."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "events.db"
    path.unlink(missing_ok=True)
    rng = random.Random(seed)
    acked: set[int] = set()
    next_start = 0
    crashed = torn = lost = duplicated = bad_integrity = mid_transaction = 0
    for k in range(kills):
        targeted = k % 2 == 1
        point = f"eventlog.inserted:{rng.randint(1, 120)}" if targeted else None
        r, w = os.pipe()
        pid = fork_call(lambda s=next_start, w=w, k=k: _writer(path, s, seed * 100_003 + k, w),
                        point)
        os.close(w)
        _, ready = _read_acks(r, 30.0)
        if not targeted:
            code = None if not ready else wait_exit(pid, rng.uniform(0.005, 0.15))
            code = kill(pid) if code is None else code
        else:
            code = wait_exit(pid, 30.0)
            code = kill(pid) if code is None else code  # the point never came: a hang
        ranges, _ = _read_acks(r, 0.5)
        os.close(r)
        if code != -9:
            crashed += 1
        elif targeted:
            mid_transaction += 1
        for a, b in ranges:
            acked.update(range(a, b))
        # the client re-sends what was not acknowledged
        next_start = min(set(range(next_start, max(acked, default=-1) + 2)) - acked)
        check = check_log(path, acked)
        torn, lost, duplicated = check["torn"], check["lost"], check["duplicated"]
        bad_integrity += check["integrity"] != "ok"
    final = check_log(path, acked)
    return figures(
        tried=kills, survived=kills - crashed - (final["torn"] > 0) - bad_integrity,
        lost=lost, duplicated=duplicated, crashed=crashed, torn=torn,
        killed_mid_transaction=mid_transaction, integrity_failures=bad_integrity,
        acknowledged=len(acked), stored=final["stored"], out_of_order=final["out_of_order"],
        durability="SQLite WAL, synchronous=FULL: acknowledged after the commit is fsynced")
