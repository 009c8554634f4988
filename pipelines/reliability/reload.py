"""Hot reload under load: requests from many threads while releases and checkpoints swap.

A recommender serving the home (following its pointers every 100 ms) answers requests from
``threads`` threads: first alone (the steady state), then while a publisher process
publishes a new release every second and a ranker checkpoint every 100 ms, and once, half-way,
a corrupt release (a file changed after its checksum was taken). Counted: failed requests,
requests answered by an older release or checkpoint than one the same thread saw before,
p99 against the steady state, the process's memory over the run, and whether the corrupt
release was refused while the one before kept serving.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.reliability import figures, stage_copy

PREFIX = "probe"


def _rank(release_id: str) -> int:
    """Publication order of a release: the probe names them in order, the base is 0."""
    return int(release_id[len(PREFIX):]) if release_id.startswith(PREFIX) else 0


def _publisher(home: Path, seconds: float, release_every_s: float, checkpoint_every_s: float,
               corrupt_at_s: float, seed: int) -> None:
    """The publisher process: a release every ``release_every_s``, a checkpoint every
    ``checkpoint_every_s``, one corrupt release at ``corrupt_at_s``."""
    from pipelines.catalogue.publish import publish_release
    from serving.checkpoint import publish_checkpoint
    from serving.manifest import read_manifest
    from serving.ranker import Ranker
    from serving.release import Pointer, read_pointer, write_pointer

    releases = home / "releases"
    base = read_pointer(releases).release_id
    manifest = read_manifest(releases / base, verify_files=False)
    rng = np.random.default_rng(seed)
    start = time.monotonic()
    n = 0
    offset = 0
    corrupt: str | None = None
    next_release = start + release_every_s
    while (now := time.monotonic()) - start < seconds:
        if now >= next_release:
            n += 1
            new_id = f"{PREFIX}{n:06d}"
            if corrupt is None and now - start >= corrupt_at_s:
                # bit rot in a published release: in place after its checksums were taken (a
                # real copy of the file, never the shared link), then the pointer moved to it
                publish_release(stage_copy(releases, base, new_id, passed=False), releases)
                vectors = releases / new_id / "vectors.npy"
                data = bytearray(vectors.read_bytes())
                data[-8:] = b"\x7f" * 8
                vectors.unlink()
                vectors.write_bytes(bytes(data))
                write_pointer(releases, Pointer(new_id, read_pointer(releases).generation + 1))
                corrupt = new_id
            else:
                publish_release(stage_copy(releases, base, new_id), releases)
            next_release += release_every_s
        live = read_pointer(releases).release_id
        ranker = Ranker.initial(live, manifest.encoder.dim, manifest.item_count)
        ranker.w = ranker.w + rng.normal(0.0, 0.01, ranker.w.shape)
        offset += 1
        publish_checkpoint(home, ranker, offset)
        time.sleep(checkpoint_every_s)
    (home / "publisher.json").write_text(json.dumps({"releases": n, "checkpoints": offset,
                                                     "corrupt": corrupt}))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_hot_reload(source: Path, work: Path, seconds: float = 300.0, steady_s: float = 30.0,
                   threads: int = 8, seed: int = 0) -> dict[str, Any]:
    """``threads`` request threads for ``steady_s`` alone, then for ``seconds`` under swaps."""
    from serving.layout import rankers_dir, releases_dir
    from serving.recommender import Recommender
    from serving.release import ITEMS_FILE, current_bundle_dir, load_items
    from serving.settings import Settings

    shutil.rmtree(work, ignore_errors=True)
    home = work / "home"
    shutil.copytree(releases_dir(source), releases_dir(home))
    rankers_dir(home).mkdir(parents=True)
    base = current_bundle_dir(releases_dir(home)).name
    titles = load_items(current_bundle_dir(releases_dir(home)) / ITEMS_FILE).titles.tolist()
    rng = random.Random(seed)
    queries = [" ".join(str(t).split()[:3]) for t in rng.sample(titles, min(200, len(titles)))]
    settings = Settings(home=home, reload_interval_s=0.1)
    rec = Recommender.load(settings=settings)
    for q in queries[:20]:
        rec.recommend(q, k=10)  # warm the caches a first request would warm
    phase = {"name": "steady"}
    stop = threading.Event()
    lat: dict[str, list[float]] = {"steady": [], "reload": []}
    failures: list[str] = []
    backwards = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        r = random.Random(seed * 1000 + i)
        seen = (0, 0)
        while not stop.is_set():
            q = r.choice(queries)
            filters = {"max_price": 100.0} if r.random() < 0.3 else None
            info: dict[str, Any] = {}
            t = time.perf_counter()
            try:
                rec.recommend(q, k=10, filters=filters, info=info)
            except Exception as exc:  # noqa: BLE001 - a failed request is what this counts
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            took = time.perf_counter() - t
            version = (_rank(info["release_id"]), info["ranker_seq"])
            with lock:
                lat[phase["name"]].append(took)
                if version < seen:
                    backwards[0] += 1
            seen = max(seen, version)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    time.sleep(steady_s)
    rss: list[float] = [_rss_mb()]
    publisher = subprocess.Popen(
        [sys.executable, "-m", "pipelines.reliability.reload", "--home", str(home),
         "--seconds", str(seconds), "--corrupt-at", str(seconds / 2), "--seed", str(seed)])
    phase["name"] = "reload"
    served_during_corrupt: set[str] = set()
    corrupt_seen = False
    deadline = time.monotonic() + seconds
    while publisher.poll() is None and time.monotonic() < deadline + 60:
        time.sleep(1.0)
        rss.append(_rss_mb())
        if rec.counters["reload_failures"] and not corrupt_seen:
            corrupt_seen = True
            served_during_corrupt.add(rec.release_id)
    publisher.wait()
    # the last publish may land just before the publisher ends: let the watcher see it
    from serving.release import read_pointer

    final = read_pointer(releases_dir(home))
    settle = time.monotonic() + 10
    while time.monotonic() < settle and rec.release_id != final.release_id:
        if rec.counters["reload_failures"]:
            if not corrupt_seen:
                corrupt_seen = True
                served_during_corrupt.add(rec.release_id)
            break
        time.sleep(0.1)
    stop.set()
    for t in pool:
        t.join(timeout=30)
    published = json.loads((home / "publisher.json").read_text())
    rec.close()
    steady, loaded = np.array(lat["steady"]) * 1000, np.array(lat["reload"]) * 1000
    result = figures(
        tried=len(steady) + len(loaded) + len(failures),
        survived=len(steady) + len(loaded), crashed=len(failures),
        failed_requests=len(failures), threads=threads, seconds=seconds,
        releases_published=published["releases"], checkpoints_published=published["checkpoints"],
        releases_swapped_in=rec.counters["reloads"],
        checkpoints_swapped_in=rec.counters["ranker_reloads"],
        versions_backwards=backwards[0],
        corrupt_release=published["corrupt"], corrupt_refused=rec.counters["reload_failures"] > 0,
        kept_serving_during_corrupt=sorted(served_during_corrupt),
        p99_steady_ms=round(float(np.percentile(steady, 99)), 2),
        p99_reload_ms=round(float(np.percentile(loaded, 99)), 2),
        p99_ratio=round(float(np.percentile(loaded, 99) / np.percentile(steady, 99)), 2),
        p50_steady_ms=round(float(np.percentile(steady, 50)), 2),
        p50_reload_ms=round(float(np.percentile(loaded, 50)), 2),
        rss_start_mb=round(rss[0], 1), rss_end_mb=round(rss[-1], 1),
        rss_max_mb=round(max(rss), 1), base_release=base, failures=failures[:5])
    shutil.rmtree(work, ignore_errors=True)
    return result


def run_swap_memory(source: Path, work: Path, swaps: int = 600,
                    every: int = 50) -> dict[str, Any]:
    """Memory over many release swaps alone: ``swaps`` releases published and swapped into one
    recommender (a request after each), its resident memory after every ``every`` swaps.
    Flat means the second half of the run adds nothing: old releases are freed."""
    import gc

    from pipelines.catalogue.publish import publish_release
    from serving.layout import releases_dir
    from serving.recommender import Recommender
    from serving.settings import Settings

    every = max(1, min(every, swaps // 2))  # at least two samples
    shutil.rmtree(work, ignore_errors=True)
    home = work / "home"
    shutil.copytree(releases_dir(source), releases_dir(home))
    rec = Recommender.load(settings=Settings(home=home), watch=False)
    base = rec.release_id
    rec.recommend("yoga mat", k=10)
    rss: list[float] = []
    failed = 0
    for n in range(1, swaps + 1):
        publish_release(stage_copy(releases_dir(home), base, f"{PREFIX}{n:06d}"),
                        releases_dir(home))
        failed += not rec.reload()
        rec.recommend("yoga mat", k=10)
        if n % every == 0:
            gc.collect()
            rss.append(round(_rss_mb(), 1))
    rec.close()
    shutil.rmtree(work, ignore_errors=True)
    half = rss[len(rss) // 2 - 1]
    return figures(tried=swaps, survived=swaps - failed, crashed=failed,
                   rss_mb_every=dict(zip(range(every, swaps + 1, every), rss, strict=True)),
                   rss_growth_second_half_mb=round(rss[-1] - half, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description="the publisher of the hot-reload probe")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--corrupt-at", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--release-every", type=float, default=1.0)
    parser.add_argument("--checkpoint-every", type=float, default=0.1)
    args = parser.parse_args()
    _publisher(args.home, args.seconds, args.release_every, args.checkpoint_every,
               args.corrupt_at, args.seed)


if __name__ == "__main__":
    main()
