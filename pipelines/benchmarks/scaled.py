"""Wall time of catalogue_refresh on the scaled-out set-up, by Celery workers and embedding shards.

For each combination of ``--workers`` and ``--shards``, in a fresh directory, starts
``infra/scaled/loopback.sh`` (a private Postgres, Redis, the MLflow server, Airflow with the
CeleryExecutor and that many Celery workers of one task slot each, all on 127.0.0.1) with an
empty ``INSTANTREC_HOME`` and no scheduled runs, triggers ``catalogue_refresh`` through the REST
API with ``{"shards": s, "catalogue": <file>}``, waits for it to end, reads what Airflow
recorded, and stops everything by PID before the next combination.

A full build: the home is empty, so every item is new and embedded. The DAG reuses vectors
only from the home's warehouse (``item_vectors``, keyed by content hash and encoder), and the
offline evaluation's embedding cache (``<home>/cache/embeddings.duckdb``) is not used by the
DAG at all; the benchmark checks that the shards embedded exactly the items ingested, and fails
if not. What is not fresh: the encoder's weights come from the local Hugging Face cache
(``HF_HUB_OFFLINE=1``), and the page cache may hold the catalogue file and Python's modules.

Figures, per combination: the run's wall time (the REST API's ``start_date`` to ``end_date``),
each task instance's duration and the worker that ran it (its ``hostname``, the worker's
``--celery-hostname``), each embedding shard's items and duration, the embed tasks' summed
duration against the wall time, ``loopback.sh start`` and ``stop`` times, and whether the
release went live. A run that fails, times out or leaves a figure unmeasured fails the
benchmark (the directory is then kept); ``--keep`` keeps every directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from serving.errors import MeasurementError
from serving.settings import Settings

log = logging.getLogger(__name__)

DAG = "catalogue_refresh"
TERMINAL = {"success", "failed"}
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CATALOGUES = {"homedepot": DATA / "homedepot" / "products.parquet",
              "crowdflower": DATA / "crowdflower" / "products.parquet"}
# The DAG's parse by the fresh dag-processor (seconds), after loopback.sh start returns.
PARSE_TIMEOUT_S = 300.0


def catalogue_file(catalogue: str) -> Path | None:
    """The catalogue the run ingests, as an absolute path (the Celery workers open it), or
    None for ``demo`` (the DAG's default, the packaged demo catalogue). ``catalogue`` is
    ``homedepot``, ``crowdflower``, ``demo`` or a CSV/Parquet path."""
    if catalogue == "demo":
        return None
    path = CATALOGUES.get(catalogue, Path(catalogue)).resolve()
    if not path.is_file():
        raise MeasurementError(f"bench scaled: no catalogue file {path}")
    return path


def int_list(text: str, what: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``: positive integers, each once, in the order given."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise MeasurementError(f"bench scaled: --{what} {text!r} is not a list of integers"
                               ) from exc
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise MeasurementError(f"bench scaled: --{what} {text!r}: give distinct positive "
                               "integers, e.g. 1,2")
    return values


def seconds_between(start: str | None, end: str | None, what: str) -> float:
    if not start or not end:
        raise MeasurementError(f"bench scaled: {what} has no start or end date "
                               f"({start!r}, {end!r})")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def label(ti: dict[str, Any]) -> str:
    return ti["task_id"] + ("" if ti["map_index"] < 0 else f"[{ti['map_index']}]")


def worker_name(hostname: str | None) -> str:
    """``worker-2@host`` -> ``worker-2``."""
    return (hostname or "?").split("@", 1)[0]


def stop_times(output: str) -> dict[str, int]:
    """Whole seconds each component took to stop, from ``loopback.sh stop``'s lines
    ``NAME stopped (PID 123, 4 s)``."""
    found = re.findall(r"^(\S+) stopped \(PID \d+, (\d+) s\)$", output, re.MULTILINE)
    return {name: int(seconds) for name, seconds in found}


def xcom(af: Any, run_id: str, task_id: str, map_index: int = -1) -> Any:
    """A task instance's return value, as the task returned it."""
    entry = af.api("GET", f"/dags/{DAG}/dagRuns/{af.quote(run_id)}/taskInstances/{task_id}"
                          f"/xcomEntries/return_value?map_index={map_index}")
    value = entry["value"]
    return json.loads(value) if isinstance(value, str) else value


def summarise(run: dict[str, Any], tis: list[dict[str, Any]],
              outputs: dict[str, Any]) -> dict[str, Any]:
    """The figures of one finished run from what the REST API reported: ``run`` (the DAG run),
    ``tis`` (its task instances) and ``outputs`` (return values: ``ingest``, ``publish``,
    ``register`` and ``embed``, a list by shard). Raises :class:`MeasurementError` when a
    figure is missing or the build was not full."""
    wall_s = seconds_between(run.get("start_date"), run.get("end_date"), "the run")
    tasks = []
    for ti in sorted(tis, key=lambda t: (t["start_date"] or "", t["task_id"], t["map_index"])):
        if ti["duration"] is None:
            raise MeasurementError(f"bench scaled: task {label(ti)} ({ti['state']}) has no "
                                   "duration")
        tasks.append({"task": label(ti), "state": ti["state"], "hostname": ti["hostname"],
                      "worker": worker_name(ti["hostname"]),
                      "duration_s": round(float(ti["duration"]), 2),
                      "start": ti["start_date"], "end": ti["end_date"]})
    embeds = sorted((ti for ti in tis if ti["task_id"] == "embed"), key=lambda t: t["map_index"])
    reports = outputs["embed"]
    shards = []
    for ti in embeds:
        report = reports[ti["map_index"]]
        shards.append({"shard": ti["map_index"], "worker": worker_name(ti["hostname"]),
                       "items": int(report["embedded"]),
                       "duration_s": round(float(ti["duration"]), 2),
                       "encode_s": round(float(report["seconds"]), 2)})
    ingest = outputs["ingest"]
    embedded = sum(s["items"] for s in shards)
    if embedded != ingest["rows_accepted"]:
        raise MeasurementError(
            f"bench scaled: not a full build: the shards embedded {embedded} items, the "
            f"ingest accepted {ingest['rows_accepted']}")
    embed_sum_s = sum(s["duration_s"] for s in shards)
    embed_span_s = seconds_between(min(t["start_date"] for t in embeds),
                                   max(t["end_date"] for t in embeds), "the embed tasks")
    # The tasks form one chain (ingest, plan_shards, the shards side by side, index, evaluate,
    # publish, register, announce): what of the wall time no task was running is Airflow's
    # hand-over between tasks (scheduling, queueing, a worker starting a task process).
    busy_s = embed_span_s + sum(t["duration_s"] for t in tasks
                                if not t["task"].startswith("embed["))
    publish, register = outputs["publish"], outputs["register"]
    return {
        "run_id": run["dag_run_id"], "state": run["state"],
        "wall_s": round(wall_s, 2),
        "queued_s": round(seconds_between(run.get("queued_at"), run.get("start_date"),
                                          "the run's queueing"), 2),
        "items": ingest["rows_accepted"], "rows_read": ingest["rows_read"],
        "rows_rejected": ingest["rows_rejected"],
        "encoder_version": reports[0]["encoder_version"],
        "embed": shards,
        "embed_items": embedded,
        "embed_sum_s": round(embed_sum_s, 2),
        "embed_span_s": round(embed_span_s, 2),
        "embed_sum_over_wall": round(embed_sum_s / wall_s, 3),
        "between_tasks_s": round(wall_s - busy_s, 2),
        "workers_used": sorted({t["worker"] for t in tasks}),
        "tasks": tasks,
        "release": {"release_id": publish["release_id"], "gate_passed": publish["gate_passed"],
                    "live": publish["live"], "generation": publish["generation"],
                    "registered_version": register.get("version")},
    }


def measure_one(root: Path, workers: int, shards: int, catalogue: Path | None,
                timeout_s: float, embed_threads: int = 0) -> dict[str, Any]:
    """Start the set-up under ``root`` with ``workers`` Celery workers, run catalogue_refresh
    once with ``shards`` shards on ``catalogue`` (None: the demo), stop everything; the
    figures of :func:`summarise` plus start-up, parse and stop times. ``embed_threads``: the
    embed tasks' torch threads (``INSTANTREC_EMBED_THREADS``; 0: every core)."""
    from pipelines.airflow_services import LoopbackAirflow
    from serving.release import read_pointer

    af = LoopbackAirflow(root, workers,
                         extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                                    "INSTANTREC_EMBED_THREADS": str(embed_threads)})
    if af.instantrec_home.exists() and any(af.instantrec_home.iterdir()):
        raise MeasurementError(f"bench scaled: {af.instantrec_home} is not empty")
    load_before = os.getloadavg()
    out: dict[str, Any] = {"workers": workers, "shards": shards, "embed_threads": embed_threads,
                           "directory": str(root)}
    failure: Exception | None = None
    try:
        log.info("bench scaled: %d worker(s), %d shard(s): starting loopback.sh in %s",
                 workers, shards, root)
        af.start()
        began = time.monotonic()
        af.wait_for(f"the dag-processor to parse {DAG}",
                    lambda: DAG in {d["dag_id"] for d in af.api("GET", "/dags")["dags"]},
                    timeout=PARSE_TIMEOUT_S, every=1)
        out["dag_parsed_s"] = round(time.monotonic() - began, 2)
        af.api("PATCH", f"/dags/{DAG}", {"is_paused": False})
        conf = {"shards": shards, "catalogue": str(catalogue) if catalogue else None}
        triggered = time.monotonic()
        run_id = af.api("POST", f"/dags/{DAG}/dagRuns",
                        {"logical_date": None, "conf": conf})["dag_run_id"]
        log.info("bench scaled: triggered %s with %s", run_id, conf)
        path = f"/dags/{DAG}/dagRuns/{af.quote(run_id)}"
        deadline = triggered + timeout_s
        while True:
            run = af.api("GET", path)
            if run["state"] in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(2)
        out["observed_s"] = round(time.monotonic() - triggered, 2)
        tis = af.api("GET", f"{path}/taskInstances?limit=100")["task_instances"]
        states = ", ".join(f"{label(t)} {t['state']}" for t in tis)
        if run["state"] != "success":
            why = (f"did not end within {timeout_s:.0f} s (state {run['state']})"
                   if run["state"] not in TERMINAL else f"ended {run['state']}")
            raise MeasurementError(f"bench scaled: {workers} worker(s), {shards} shard(s): "
                                   f"run {run_id} {why}; tasks: {states}")
        outputs = {name: xcom(af, run_id, name) for name in ("ingest", "publish", "register")}
        outputs["embed"] = {i: xcom(af, run_id, "embed", i) for i in range(shards)}
        out.update(summarise(run, tis, outputs))
        pointer = read_pointer(af.instantrec_home / "releases")
        out["release"]["went_live"] = (pointer is not None and out["release"]["live"]
                                       and pointer.release_id == out["release"]["release_id"])
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    except Exception as exc:
        failure = exc
    finally:
        out["start_s"] = round(af.start_seconds, 2) if af.start_seconds is not None else None
        left = af.stop()
        out["stop_s"] = round(af.stop_seconds or 0.0, 2)
        out["stop_by_component_s"] = stop_times(af.stop_output)
    out["loadavg_before"] = [round(x, 2) for x in load_before]
    if failure is not None:
        raise MeasurementError(f"{failure}\n(directory kept: {root})") from failure
    if left:
        raise MeasurementError(f"bench scaled: processes still alive after stop: {left} "
                               f"(directory kept: {root})")
    return out


def bench_scaled(catalogue: str, workers: list[int], shards: list[int], timeout_s: float,
                 keep: bool = False, work_dir: Path | None = None,
                 embed_threads: int = 0) -> dict[str, Any]:
    """catalogue_refresh's figures for every (workers, shards) combination, in that order;
    directories under ``work_dir`` (default: a new one under the temporary directory)."""
    source = catalogue_file(catalogue)
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="instantrec-bench-scaled-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    # Run as root, loopback.sh runs Postgres as the postgres user, which must reach
    # <dir>/loopback/run/postgres: mkdtemp's 0700 would stop it.
    work_dir.chmod(0o755)
    runs = []
    for w in workers:
        for s in shards:
            root = work_dir / f"workers-{w}-shards-{s}"
            root.mkdir(mode=0o755)
            root.chmod(0o755)  # whatever the umask
            runs.append(measure_one(root, w, s, source, timeout_s, embed_threads))
            if not keep:
                shutil.rmtree(root)
    if not keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "catalogue": str(source) if source else "demo",
        "items": runs[0]["items"],
        "full_build": "empty INSTANTREC_HOME per run: every item embedded (checked), no "
                      "vectors reused",
        "cpu_count": os.cpu_count(),
        "celery_slots_per_worker": 1,
        "embed_threads": embed_threads or "torch's default (every core)",
        "wall_s": {f"workers={r['workers']} shards={r['shards']}": r["wall_s"] for r in runs},
        "runs": runs,
        "directories": str(work_dir) if keep else None,
    }


def table(result: dict[str, Any]) -> str:
    """A compact, human-readable summary of :func:`bench_scaled`'s result."""
    lines = [f"catalogue_refresh on {result['catalogue']} ({result['items']} items), "
             f"{result['cpu_count']} cores, embed threads: {result['embed_threads']}",
             f"{'workers':>7} {'shards':>6} {'start_s':>8} {'wall_s':>8} {'embed_sum_s':>11} "
             f"{'sum/wall':>8} {'span_s':>7} {'between_s':>9} {'stop_s':>7} {'live':>5}"]
    for r in result["runs"]:
        lines.append(f"{r['workers']:>7} {r['shards']:>6} {r['start_s']:>8.1f} {r['wall_s']:>8.1f}"
                     f" {r['embed_sum_s']:>11.1f} {r['embed_sum_over_wall']:>8.2f}"
                     f" {r['embed_span_s']:>7.1f} {r['between_tasks_s']:>9.1f} {r['stop_s']:>7.1f}"
                     f" {'yes' if r['release']['went_live'] else 'NO':>5}")
    for r in result["runs"]:
        shards = "; ".join(f"[{s['shard']}] {s['worker']} {s['items']} items {s['duration_s']:.1f} s"
                           for s in r["embed"])
        lines.append(f"  {r['workers']}w/{r['shards']}s embed: {shards}")
        others = [t for t in r["tasks"] if not t["task"].startswith("embed[")]
        lines.append("    " + ", ".join(f"{t['task']} {t['worker']} {t['duration_s']:.1f} s"
                                        for t in others))
    return "\n".join(lines)


def add_arguments(p: Any) -> None:
    p.add_argument("--catalogue", default="homedepot",
                   help="homedepot (54,667 items, ../shared/data), crowdflower, demo, or a "
                        "CSV/Parquet file")
    p.add_argument("--workers", default="1,2", help="Celery workers, comma-separated")
    p.add_argument("--shards", default="2,4", help="embedding shards, comma-separated")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one run may take from its trigger to its end")
    p.add_argument("--embed-threads", type=int, default=0,
                   help="torch threads of each embed task (INSTANTREC_EMBED_THREADS; default 0: "
                        "every core)")
    p.add_argument("--keep", action="store_true",
                   help="keep each combination's directory (logs, home, Postgres data)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the directories go (default: a new temporary directory); "
                        "run as root, every directory above it must be searchable by others")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    # The set-up takes its settings from loopback.sh, not from ``settings``: each run has its
    # own empty home.
    del settings
    result = bench_scaled(args.catalogue, int_list(args.workers, "workers"),
                          int_list(args.shards, "shards"), args.timeout, args.keep,
                          args.work_dir, args.embed_threads)
    # stdout carries the JSON; the table is for the person watching
    print(table(result), file=sys.stderr)
    return result
