"""Updater crash-exactness: the nearline updater SIGKILLed again and again while events flow.

A writer process appends shopper-like events (result lists of impressions, a click, some
purchases) to the home's event log at a steady rate. Updater after updater starts on the home
(holding its lock, resuming from the live checkpoint) and is killed: at a random instant, or
at a chosen point (mid-batch after N events, between a complete checkpoint file and its
rename, between the file and the pointer, while the pointer is written, after it moved).
Sometimes a second updater tries to start beside a running one: it must be refused.

When the stream ends, a last updater drains the log; one uninterrupted updater runs over the
same log in a copy of the starting home. The two must agree exactly: offset, events applied
(fewer is a loss, more a double application), the sha256 chain over the applied event ids in
order (the per-event sequence check), the counters and every parameter.

The updaters are forked from a parent that has loaded the encoder but never run it (a fork
after torch ran is unsafe), so each restart costs the bundle load and the warm-up replay, not
the imports: the same code path as ``instantrec nearline``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.reliability import figures, fork_call, kill, wait_exit

POINTS = ("nearline.applied", "checkpoint.saved", "checkpoint.written", "atomic.written",
          "atomic.synced", "atomic.replaced", "checkpoint.published")
QUERIES = ("coffee maker", "yoga mat", "headphones", "cordless drill", "office chair",
           "running shoes", "desk lamp")


def _write_events(home: Path, rate: float, seconds: float, seed: int) -> None:
    """The writer process: shopper-like events at ``rate`` events/s for ``seconds``."""
    from serving.eventlog import SqliteEventLog
    from serving.events import parse_event
    from serving.layout import events_path, releases_dir
    from serving.release import ITEMS_FILE, current_bundle_dir, load_items

    items = load_items(current_bundle_dir(releases_dir(home)) / ITEMS_FILE).item_ids.tolist()
    log = SqliteEventLog(events_path(home))
    rng = random.Random(seed)
    start = time.monotonic()
    sent = 0
    r = 0
    while time.monotonic() - start < seconds:
        now = time.time()
        query = QUERIES[r % len(QUERIES)]
        shown = rng.sample(items, 8)
        session, user = f"s{r % 53}", f"user{r % 29}"
        raw = [{"event_id": f"i{seed}-{r}-{p}", "session_id": session, "query": query,
                "item_id": item, "type": "impression", "position": p, "ts": now,
                "user_id": user} for p, item in enumerate(shown, start=1)]
        click = rng.randrange(1, 9)
        raw.append({"event_id": f"c{seed}-{r}", "session_id": session, "query": query,
                    "item_id": shown[click - 1], "type": "click", "position": click,
                    "ts": now + 0.5, "user_id": user})
        if r % 5 == 0:
            raw.append({"event_id": f"p{seed}-{r}", "session_id": session, "query": query,
                        "item_id": shown[click - 1], "type": "purchase", "ts": now + 0.7,
                        "user_id": user})
        events = [replace(parse_event(e, b"probe-key", now=now + 1), received=time.time())
                  for e in raw]
        log.append(events)
        sent += len(events)
        r += 1
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    log.close()


def _settings(home: Path) -> Any:
    from serving.settings import Settings

    # a short session window keeps each restart's warm-up replay short; 50 events or 0.2 s
    # between checkpoints puts many checkpoints, and so many kill points, in every run
    return Settings(home=home, checkpoint_every_events=50, checkpoint_every_s=0.2,
                    session_ttl_s=120.0)


def _updater(home: Path, encoder: Any, ready_fd: int | None, once: bool,
             summary: Path | None = None) -> None:
    from pipelines.learning.nearline import NearlineUpdater, UpdaterLock

    with UpdaterLock(home):
        if ready_fd is not None:
            os.write(ready_fd, b"locked\n")
        updater = NearlineUpdater(_settings(home), encoder)
        if once:
            result = updater.run_once()
            if summary is not None:
                summary.write_text(json.dumps(result))
        else:
            updater.run_forever(max_seconds=120)


def _second_updater(home: Path) -> None:
    from pipelines.learning.nearline import UpdaterLock

    UpdaterLock(home).acquire()  # must raise UpdaterLockedError: exit 3


def _drain(home: Path, encoder: Any, out: Path) -> dict[str, Any]:
    pid = fork_call(lambda: _updater(home, encoder, None, True, out))
    code = wait_exit(pid, 1800)
    if code != 0:
        raise RuntimeError(f"the draining updater in {home} exited {code}")
    return json.loads(out.read_text())


def copy_log(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite event log (its write-ahead log included)."""
    import sqlite3

    target.parent.mkdir(parents=True, exist_ok=True)
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()


def compare_rankers(home: Path, reference: Path) -> int:
    """How many parameters of the two homes' live rankers differ (0 = identical)."""
    import numpy as np

    from serving.checkpoint import read_latest
    from serving.layout import rankers_dir
    from serving.ranker import Ranker

    a = Ranker.load(rankers_dir(home) / read_latest(home).file)
    b = Ranker.load(rankers_dir(reference) / read_latest(reference).file)
    differ = 0
    for name in ("U", "V", "w", "b0", "item_bias"):
        differ += int(not np.array_equal(np.asarray(getattr(a, name)),
                                         np.asarray(getattr(b, name))))
    differ += int(a.query_item != b.query_item)
    return differ


def run_updater_kills(source: Path, work: Path, kills: int = 200, seed: int = 0,
                      rate: float = 200.0) -> dict[str, Any]:
    """Kill the updater ``kills`` times while events flow into a copy of home ``source``."""
    import subprocess
    import sys

    from serving.encoder import Encoder
    from serving.layout import events_path, rankers_dir, releases_dir

    shutil.rmtree(work, ignore_errors=True)
    home, reference = work / "home", work / "reference"
    for target in (home, reference):
        shutil.copytree(releases_dir(source), releases_dir(target), symlinks=True)
        if rankers_dir(source).is_dir():
            shutil.copytree(rankers_dir(source), rankers_dir(target), symlinks=True)
    encoder = Encoder(max_length=128)  # loaded, never run here: the forked updaters run it
    rng = random.Random(seed)
    seconds = kills * 10.0  # longer than the campaign: the writer is stopped after it
    writer = subprocess.Popen(
        [sys.executable, "-m", "pipelines.reliability.updater", "--home", str(home),
         "--rate", str(rate), "--seconds", str(seconds), "--seed", str(seed)])
    crashed = not_reached = locked_out = lock_probes = at_point = 0
    try:
        for k in range(kills):
            targeted = k % 2 == 1
            point = None
            if targeted:
                name = rng.choice(POINTS)
                point = f"{name}:{rng.randint(1, 300 if name == 'nearline.applied' else 3)}"
            r, w = os.pipe()
            pid = fork_call(lambda w=w: _updater(home, encoder, w, False), point)
            os.close(w)
            locked = os.read(r, 16)  # blocks until the updater holds the lock (or died)
            os.close(r)
            if locked and k % 10 == 0:
                lock_probes += 1
                locked_out += wait_exit(fork_call(lambda: _second_updater(home)), 60) == 3
            code = wait_exit(pid, 20.0 if targeted else rng.uniform(0.2, 2.5))
            if code is None:
                not_reached += targeted
                code = kill(pid)
            elif targeted and code == -9:
                at_point += 1
            if code != -9:
                crashed += 1
    finally:
        writer.terminate()  # a kill mid-append is fine: an unacknowledged batch is not stored
        writer.wait()
    copy_log(events_path(home), events_path(reference))
    got = _drain(home, encoder, work / "resumed.json")
    want = _drain(reference, encoder, work / "uninterrupted.json")
    lost = max(0, want["applied_total"] - got["applied_total"])
    duplicated = max(0, got["applied_total"] - want["applied_total"])
    same = (got["offset"] == want["offset"] and got["ledger"] == want["ledger"]
            and got["counters"] == want["counters"])
    differing = compare_rankers(home, reference)
    return figures(
        tried=kills, survived=kills - crashed if same and not differing else 0, lost=lost,
        duplicated=duplicated, crashed=crashed, killed_at_chosen_point=at_point,
        chosen_point_not_reached=not_reached, random_instant=kills - kills // 2,
        events=want["offset"], applied=got["applied_total"],
        ledger_equal=got["ledger"] == want["ledger"], counters_equal=(
            got["counters"] == want["counters"]), parameters_differing=differing,
        second_updater_locked_out=f"{locked_out} of {lock_probes}")


def main() -> None:
    parser = argparse.ArgumentParser(description="the event writer of the updater probe")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _write_events(args.home, args.rate, args.seconds, args.seed)


if __name__ == "__main__":
    main()
