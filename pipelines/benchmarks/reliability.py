"""The fault-injection campaign: crashes, I/O errors, hot reload under load, abuse.

``instantrec bench reliability --json`` runs every probe of :mod:`pipelines.reliability` on
copies of the live release of this home (``make demo`` first) and prints, for each, what was
tried, what survived, and what was lost, duplicated or crashed, with the probe's own details.
Probes that fork run before those that start threads or run the encoder here (a fork after
either is unsafe). ``--only`` picks probes; the counts default to the campaign's full size
(the suite runs the same probes small).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from serving.errors import MeasurementError
from serving.settings import Settings

PROBES = ("appends", "publish_crashes", "io_errors", "concurrent_publishes", "disk_full",
          "updater", "dag_kills", "hot_reload", "swap_memory", "flood", "bots", "bad_input")


def add_arguments(p: Any) -> None:
    p.add_argument("--only", default=",".join(PROBES),
                   help=f"comma-separated probes ({', '.join(PROBES)})")
    p.add_argument("--updater-kills", type=int, default=200)
    p.add_argument("--append-kills", type=int, default=200)
    p.add_argument("--publish-rounds", type=int, default=3,
                   help="kill/fail every publish step this many times over")
    p.add_argument("--publishes", type=int, default=1000)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--reload-s", type=float, default=300.0)
    p.add_argument("--steady-s", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--swaps", type=int, default=600, help="release swaps of swap_memory")
    p.add_argument("--flood-s", type=float, default=120.0,
                   help="seconds of flood (after a third as long of shoppers alone)")
    p.add_argument("--seed", type=int, default=0)


def run(settings: Settings, args: Any) -> dict[str, Any]:
    only = [p for p in args.only.split(",") if p]
    unknown = sorted(set(only) - set(PROBES))
    if unknown:
        raise MeasurementError(f"bench reliability: unknown probes {unknown} "
                               f"(one of {', '.join(PROBES)})")
    return campaign(settings.home, only, args)


def campaign(home: Path, only: list[str], args: Any) -> dict[str, Any]:
    from serving.layout import bench_dir
    from serving.release import read_pointer

    if read_pointer(home / "releases") is None:
        raise MeasurementError(f"bench reliability: no live release under {home}; run "
                               "`make demo` or `instantrec build` first")
    work = bench_dir(home) / "reliability"
    out: dict[str, Any] = {}
    for name in PROBES:
        if name not in only:
            continue
        start = time.monotonic()
        out[name] = _probe(name, home, work / name, args)
        out[name]["probe_seconds"] = round(time.monotonic() - start, 1)
    return {"home": str(home), "probes": out}


def _probe(name: str, home: Path, work: Path, args: Any) -> dict[str, Any]:
    from pipelines.reliability import appends, publish, reload, updater

    if name == "appends":
        return appends.run_append_kills(work, args.append_kills, args.seed)
    if name == "publish_crashes":
        return publish.run_publish_crashes(home, work, args.publish_rounds)
    if name == "io_errors":
        return publish.run_io_errors(home, work)
    if name == "concurrent_publishes":
        return publish.run_concurrent_publishes(home, work, args.publishes, args.readers)
    if name == "disk_full":
        return publish.run_real_disk_full(work)
    if name == "updater":
        return updater.run_updater_kills(home, work, args.updater_kills, args.seed)
    if name == "dag_kills":
        from pipelines.reliability.dags import run_dag_kills

        return run_dag_kills(home, work)
    if name == "hot_reload":
        return reload.run_hot_reload(home, work, args.reload_s, args.steady_s, args.threads,
                                     args.seed)
    if name == "swap_memory":
        return reload.run_swap_memory(home, work, args.swaps)
    if name == "flood":
        from pipelines.reliability.flood import run_flood

        return run_flood(home, work, seconds=args.flood_s, baseline_s=args.flood_s / 3,
                         seed=args.seed)
    if name == "bots":
        from pipelines.reliability import bots, figures

        out = bots.run_bots(home, seed=args.seed)
        # survived: events classified right (bot dropped, shopper kept); lost: shoppers' dropped
        return figures(tried=out["bot_events"] + out["human_events"],
                       survived=out["bot_dropped"] + out["human_events"] - out["human_dropped"],
                       lost=out["human_dropped"], **{k: v for k, v in out.items()
                                                       if k != "tried"}, bot_sessions=out["tried"])
    from pipelines.reliability import inputs

    return inputs.run_bad_input()
