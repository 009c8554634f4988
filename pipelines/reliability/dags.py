"""DAG idempotency: every task of both DAGs killed at three points and retried.

``run_dag_kills`` works on copies of a built home (``make demo``). For ``catalogue_refresh``
it changes a few titles and prices of the demo catalogue, so that there is work to do; for
``ranker_retrain`` it records some feedback first, so that a retrain happens. A twin copy runs
both DAGs once, uninterrupted, and the home is snapshotted before each of its tasks. Then, for
every task and each of its kill points (:data:`POINTS`: at its start, in the middle, just
before it returns), a copy of the snapshot before the task runs it with a failpoint armed
(:mod:`serving.failpoints`), retries it with the same arguments and the same XCom values, as
Airflow's retry would (and again, up to the DAGs' ``retries``, if a retry fails), then runs
the rest of the DAG's tasks in order.

Each task runs in a process of its own (:class:`Runner`) and calls the same
:mod:`pipelines.steps` function with the same arguments as its DAG task does (not the
``instantrec`` CLI command, whose ``ingest`` and ``publish`` work on the home's warehouse
rather than on the DAG run's copy of it).

After each run: the release pointer names the twin's release at the twin's generation (one
move), every file of that release has the twin's bytes (sha256; the manifest is compared with
``created_at``, the build's wall-clock time, masked: :data:`MASKED`), no other release
appeared, the warehouse holds the twin's items and vectors and the run's copy of it is
committed; exactly as many new model versions per model as the twin registered (one), with
``champion`` on the twin's; the live ranker checkpoint holds the twin's parameters at the
twin's sequence number. ``lost``: something the twin has is missing; ``duplicated``: more
versions, pointer moves, releases or checkpoints than the twin's; ``crashed``: an attempt
after the kill failed with an untyped error, or a task failed for good.

:data:`OVERLAPS`: two runs' ``publish`` + ``register`` at once (one release: one pointer move,
one version), and two runs with different releases in the worst interleaving (``champion``
must follow the pointer).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.reliability import figures
from serving.manifest import sha256_file

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

# dags/catalogue_refresh.py's STAGING: the DAG run's copy of the warehouse (its name only;
# importing the DAG file would import Airflow)
STAGING = "catalogue_refresh"
RUN_TIMEOUT_S = 600.0
KILLED = -9
# Airflow's retries (``retries=2`` in both DAGs): a task that fails with an error (not a
# kill) is tried again; the kill's own retry is the first of them
RETRIES = 2


# -- the DAGs' tasks, as plain steps --------------------------------------------------------------

CATALOGUE_DAG = ("ingest", "embed0", "embed1", "index", "evaluate", "publish", "register")
RANKER_DAG = ("retrain", "report")
# Where each task is killed: at its start, in the middle, just before it returns (after its
# last write); the retrain also after its checkpoint went live, before the alias moved.
# ``NAME:N`` is a failpoint (serving.failpoints); ``random`` (for ``points=``) a SIGKILL after
# a random share, 0.2-0.9, of the task's uninterrupted duration.
POINTS: dict[str, tuple[str, ...]] = {
    "ingest": ("step.ingest.begin:1", "ingest.upserted:1", "step.ingest.end:1"),
    "embed0": ("step.embed.begin:1", "embed.written:1", "step.embed.end:1"),
    "embed1": ("step.embed.begin:1", "embed.written:1", "step.embed.end:1"),
    "index": ("step.index.begin:1", "index.stored:1", "step.index.end:1"),
    "evaluate": ("step.evaluate.begin:1", "atomic.written:1", "step.evaluate.end:1"),
    "publish": ("step.publish.begin:1", "publish.pointer:1", "step.publish.end:1"),
    "register": ("step.register.begin:1", "registry.registered:1", "step.register.end:1"),
    "retrain": ("step.retrain.begin:1", "registry.registered:1", "checkpoint.published:1",
                "step.retrain.end:1"),
    "report": ("step.report.begin:1", "report.checked:1", "step.report.end:1"),
}
SHARDS = 2
CHANGED_TITLES = 6   # demo items whose title changes (re-embedded)
CHANGED_PRICES = 6   # and whose price changes (a new release, nothing to embed)


def task_args(task: str, xcoms: dict[str, dict[str, Any]],
              params: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``task`` gets in the DAG: its params and the XCom values it pulls."""
    if task == "ingest":
        return {"catalogue": params["catalogue"]}
    if task.startswith("embed"):
        return {"shard": int(task[-1]), "shards": SHARDS,
                "warehouse": xcoms["ingest"]["warehouse"]}
    if task == "index":
        return {"warehouse": xcoms["ingest"]["warehouse"]}
    if task == "evaluate":
        return {"bundle_dir": xcoms["index"]["bundle_dir"], "golden": params["golden"],
                "judgments": params["judgments"], "catalogue": params["catalogue"]}
    if task == "publish":
        return {"bundle_dir": xcoms["evaluate"]["bundle_dir"],
                "warehouse": xcoms["ingest"]["warehouse"]}
    if task == "register":
        return {"path": xcoms["publish"]["path"]}
    if task == "retrain":
        return {"holdout": params["holdout"], "epochs": params["epochs"]}
    if task == "report":
        return {"result": xcoms["retrain"]}
    raise ValueError(f"unknown task {task!r}")


def call_task(task: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``task`` of either DAG as its Airflow task does: the same :mod:`pipelines.steps`
    function, the settings from this process's ``INSTANTREC_*`` environment, ``args`` the
    task's arguments and the XCom values it pulls (:func:`task_args`). Also the probe's own
    helpers (``feedback``, ``state``, ``stage_copy``), run in a process of their own so that
    the probe's process imports nothing heavy."""
    from pipelines import steps
    from serving.settings import load_settings

    settings = load_settings()
    if task == "ingest":
        return steps.run_ingest(settings, args["catalogue"], staging=STAGING)
    if task.startswith("embed"):
        return steps.run_embed(settings, args["shard"], args["shards"],
                               warehouse=args["warehouse"])
    if task == "index":
        return dict(steps.run_index(settings, warehouse=args["warehouse"]))
    if task == "evaluate":
        return dict(steps.run_evaluate(settings, args["bundle_dir"], args["golden"],
                                       args["judgments"], demo=args["catalogue"] is None))
    if task == "publish":
        return steps.run_publish(settings, args["bundle_dir"], warehouse=args["warehouse"])
    if task == "register":
        return steps.run_register(settings, args["path"])
    if task == "retrain":
        return steps.run_retrain(settings, holdout=args["holdout"], epochs=args["epochs"])
    if task == "report":
        return dict(steps.report_retrain(settings, args["result"]))
    if task == "feedback":
        return record_feedback(settings, args["sessions"])
    if task == "state":
        return home_state(settings)
    if task == "stage_copy":
        return {"bundle_dir": str(stage_live_copy(settings, args["release_id"]))}
    raise ValueError(f"unknown task {task!r}")


FEEDBACK_QUERIES = ("coffee maker", "running shoes", "cordless drill", "wireless headphones")


def record_feedback(settings: Settings, sessions: int) -> dict[str, Any]:
    """``sessions`` shoppers per query of :data:`FEEDBACK_QUERIES` who skip the live release's
    top results and click the fifth: enough feedback for a retrain to train and promote."""
    from serving.recommender import Recommender

    rec = Recommender.load(settings=settings, watch=False)
    try:
        events: list[dict[str, Any]] = []
        for q, query in enumerate(FEEDBACK_QUERIES):
            shown = [r.item_id for r in rec.recommend(query, k=10)]
            for s in range(sessions):
                session = f"probe-q{q}-s{s}"
                for p, item in enumerate(shown[:5], start=1):
                    events.append({"event_id": f"{session}-i{p}", "session_id": session,
                                   "query": query, "item_id": item, "type": "impression",
                                   "position": p})
                events.append({"event_id": f"{session}-c", "session_id": session,
                               "query": query, "item_id": shown[4], "type": "click",
                               "position": 5})
        rec.record_many(events)
        return {"events": len(events), "release_id": rec.release_id}
    finally:
        rec.close()


def stage_live_copy(settings: Settings, release_id: str) -> Path:
    """A staged, evaluated (gate passed) copy of the live release under ``release_id``: what
    another run would have staged for another catalogue."""
    from pipelines.reliability import stage_copy
    from serving.release import read_pointer

    pointer = read_pointer(settings.releases_dir)
    if pointer is None:
        raise ValueError(f"no live release under {settings.releases_dir} to copy")
    return stage_copy(settings.releases_dir, pointer.release_id, release_id)


# -- what a run leaves behind ----------------------------------------------------------------------

MASKED = ("created_at",)  # the manifest's wall-clock build time: the one field a rebuild changes


def release_digests(release_dir: Path) -> dict[str, str]:
    """sha256 of every file of a release, by relative path; the manifest's with
    :data:`MASKED` fields removed (``manifest.json~masked``) besides its raw bytes'."""
    from serving.manifest import MANIFEST_NAME

    out: dict[str, str] = {}
    for path in sorted(release_dir.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(release_dir))
            out[rel] = sha256_file(path)
            if rel == MANIFEST_NAME:
                manifest = json.loads(path.read_text())
                for key in MASKED:
                    manifest.pop(key, None)
                out[f"{rel}~masked"] = hashlib.sha256(
                    json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return out


def warehouse_digest(path: Path) -> dict[str, Any]:
    """What the catalogue's state is, without wall-clock columns: a digest of the items and
    one of their vectors, and the ingest runs by status."""
    import duckdb

    if not path.exists():
        return {}
    con = duckdb.connect(str(path), read_only=True)
    try:
        out: dict[str, Any] = {}
        for name, sql in (
                ("items", "SELECT item_id, title, description, category, brand, price, "
                          "in_stock, content_hash, active FROM items ORDER BY item_id"),
                ("vectors", "SELECT item_id, encoder_version, content_hash, vector "
                            "FROM item_vectors ORDER BY item_id, encoder_version")):
            rows = con.execute(sql).fetchall()
            out[name] = hashlib.sha256(repr(rows).encode()).hexdigest()[:16]
            out[f"{name}_rows"] = len(rows)
        out["ingest_runs"] = dict(con.execute(
            "SELECT status, count(*) FROM ingest_runs GROUP BY status ORDER BY status"
        ).fetchall())
        return out
    finally:
        con.close()


def registry_state(settings: Settings) -> dict[str, Any]:
    """Every registered model: its versions (number, run, identifying tags) and where
    ``champion`` points; the runs left RUNNING (a killed attempt's)."""
    import mlflow

    from pipelines.registry import CHAMPION, use_store
    from serving.layout import mlflow_dir

    if settings.mlflow_tracking_uri is None and not mlflow_dir(settings.home).exists():
        return {"models": {}, "running_runs": 0}
    use_store(settings)
    client = mlflow.MlflowClient()
    models: dict[str, Any] = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        try:
            champion = int(client.get_model_version_by_alias(model.name, CHAMPION).version)
        except mlflow.exceptions.MlflowException:
            champion = None
        models[model.name] = {
            "versions": {int(v.version): {k: v.tags.get(k) for k in
                                          ("release_id", "offset", "encoder_id")
                                          if v.tags.get(k) is not None}
                         for v in versions},
            "champion": champion}
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = len(client.search_runs(experiments, "attributes.status = 'RUNNING'"))
    return {"models": models, "running_runs": running}


def checkpoint_state(home: Path) -> dict[str, Any] | None:
    """The live ranker checkpoint: its reference, a digest of its parameters and one of its
    metadata without ``published_at`` (wall-clock)."""
    import numpy as np

    from serving.checkpoint import read_latest
    from serving.layout import rankers_dir

    ref = read_latest(home)
    if ref is None:
        return None
    path = rankers_dir(home) / ref.file
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        h = hashlib.sha256()
        for key in sorted(k for k in data.files if k != "meta"):
            arr = data[key]
            h.update(f"{key}:{arr.dtype}:{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    meta.pop("published_at", None)
    return {"seq": ref.seq, "offset": ref.offset, "release_id": ref.release_id,
            "file": ref.file, "parameters": h.hexdigest()[:16],
            "meta": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16],
            "retrain_version": meta.get("retrain_version"),
            "files": len(list(path.parent.glob("ckpt-*.npz")))}


def home_state(settings: Settings) -> dict[str, Any]:
    """Everything the checks compare, of the home of ``settings``."""
    from serving.release import read_pointer

    releases = settings.releases_dir
    pointer = read_pointer(releases)
    staging = releases / ".staging"
    staged_warehouse = settings.warehouse_path.with_name(
        f"{settings.warehouse_path.name}.{STAGING}")
    return {
        "pointer": {"release_id": pointer.release_id, "generation": pointer.generation}
        if pointer else None,
        "releases": sorted(p.name for p in releases.iterdir()
                           if p.is_dir() and not p.name.startswith(".")),
        "staging": sorted(p.name for p in staging.iterdir()) if staging.is_dir() else [],
        "release_files": release_digests(releases / pointer.release_id) if pointer else {},
        "staged_warehouse": staged_warehouse.exists(),
        # a killed writer's temporary files, anywhere in the home
        "temp_files": sorted(str(p.relative_to(settings.home))
                             for p in settings.home.rglob(".*.tmp-*")),
        "warehouse": warehouse_digest(settings.warehouse_path),
        "registry": registry_state(settings),
        "checkpoint": checkpoint_state(settings.home),
    }


# -- homes: copies that stand on their own ---------------------------------------------------------


def copy_home(source: Path, dest: Path) -> Path:
    """Copy the home ``source`` to ``dest`` (not its caches and benchmark work), with the
    embedded MLflow store's absolute paths moved along: a plain copy would still log its
    artefacts into ``source``."""
    source, dest = source.resolve(), dest.resolve()
    shutil.rmtree(dest, ignore_errors=True)
    skip = {"cache", "bench"}
    shutil.copytree(source, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == source
                                             and n in skip])
    db = dest / "mlflow" / "mlflow.db"
    if db.exists():
        rebase_sqlite(db, f"{source}/", f"{dest}/")
    return dest


def rebase_sqlite(db: Path, old: str, new: str) -> int:
    """Replace the path prefix ``old`` by ``new`` in every text column of the SQLite ``db``;
    returns the values changed."""
    con = sqlite3.connect(db)
    changed = 0
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if any(t in kind.upper() for t in ("CHAR", "TEXT", "CLOB")) or not kind:
                    changed += con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE instr("{column}", ?) > 0', (old, new, old)).rowcount
        con.commit()
    finally:
        con.close()
    return changed


def rebase(value: Any, old: Path, new: Path) -> Any:
    """``value`` (XComs: JSON) with paths under ``old`` moved under ``new``."""
    return json.loads(json.dumps(value).replace(f"{old.resolve()}/", f"{new.resolve()}/"))


def changed_catalogue(base: Path, out: Path, golden: Path) -> Path:
    """``base`` (a catalogue CSV) with :data:`CHANGED_TITLES` titles and
    :data:`CHANGED_PRICES` prices changed, none of an item the golden queries expect."""
    with base.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    expected = {i for e in json.loads(golden.read_text()) for i in e["expected"]}
    free = [r for r in rows if r["id"] not in expected]
    step = max(1, len(free) // (CHANGED_TITLES + CHANGED_PRICES))
    picked = free[::step][:CHANGED_TITLES + CHANGED_PRICES]
    for r in picked[:CHANGED_TITLES]:
        r["title"] = f"{r['title']} (2026 edition)"
    for r in picked[CHANGED_TITLES:]:
        if r["price"]:
            r["price"] = f"{float(r['price']) * 0.9:.2f}"
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


# -- running tasks -----------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[2]


# Imported by the fork server before it forks the task processes: what every task would import
# anyway and that starts no thread (polars, and MLflow which imports it, do: a fork after them
# is unsafe). Saves each task process about 3 s of imports, and each that loads the encoder
# (embed, evaluate, and register, whose MLflow check of the input example loads the model)
# 3-4 s more: transformers imports its model classes lazily.
PRELOAD = ("torch", "transformers", "transformers.models.bert.modeling_bert",
           "pipelines.reliability.dags")
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_server_guard = threading.Lock()


def fork_server() -> Any:
    """The multiprocessing ``forkserver`` context, its server started with :data:`PRELOAD`
    imported (once per process; the environment defaults of :data:`ENV_DEFAULTS` are set
    first, as the preloaded modules read some at import)."""
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    with _server_guard:
        for key, value in ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        ctx.set_forkserver_preload(list(PRELOAD))
        forkserver.ensure_running()
    return ctx


def _task_process(task: str, args: dict[str, Any], env: dict[str, str], log_path: str,
                  result_path: str) -> None:
    """A task process forked by the fork server: the task's environment, its output to
    ``log_path``, its XCom to ``result_path``; exits 0, 3 (typed error) or 1 (crash)."""
    import traceback

    from serving import failpoints
    from serving.errors import InstantrecError

    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        failpoints.reset()
        # tqdm's default lock is a multiprocessing semaphore, registered with the resource
        # tracker this process shares with the probe's; exiting without cleanup (or killed)
        # the task would leave it to that tracker, which warns about each one at shutdown
        import tqdm

        tqdm.tqdm.set_lock(threading.RLock())
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            result = call_task(task, args)
            Path(result_path).write_text(json.dumps(result, default=str))
            code = 0
        except InstantrecError as exc:
            print(f"typed error: {exc}", file=sys.stderr)
            code = 3
    except BaseException:  # noqa: BLE001 - the exit code reports it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Runner:
    """Runs tasks in processes of their own against one home, with Airflow's retries, and
    keeps each attempt's log under ``logs``. ``preload``: the processes are forked by a fork
    server that has imported :data:`PRELOAD` (as Airflow's executors fork task processes
    from a supervisor), else each is a fresh interpreter (``python -m`` this module)."""

    def __init__(self, home: Path, logs: Path, retry_delay_s: float = 0.5,
                 preload: bool = True) -> None:
        self.home, self.logs, self.retry_delay_s = home, logs, retry_delay_s
        self.preload = preload
        self.attempts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        logs.mkdir(parents=True, exist_ok=True)

    def attempt(self, task: str, args: dict[str, Any], point: str | None = None,
                kill_after_s: float | None = None,
                timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, dict[str, Any] | None]:
        """One try of ``task``: its exit code (-9: killed) and XCom (None unless it
        succeeded). ``point``: a failpoint to arm; ``kill_after_s``: SIGKILL it then."""
        from serving import failpoints

        env = {k: v for k, v in os.environ.items()
               if k not in (failpoints.ENV, "INSTANTREC_MLFLOW_TRACKING_URI",
                            "MLFLOW_TRACKING_URI")}
        env.update(INSTANTREC_HOME=str(self.home), HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", MLFLOW_DISABLE_TELEMETRY="true",
                   MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true")
        if point:
            env[failpoints.ENV] = point
        with self._lock:
            n = len(self.attempts)
            self.attempts.append({})
        log_path = self.logs / f"{n:03d}-{task}.log"
        start = time.monotonic()
        if self.preload:
            code, xcom = self._forked(task, args, env, log_path, kill_after_s or timeout_s)
        else:
            code, xcom = self._spawned(task, args, env, log_path, kill_after_s or timeout_s)
        with self._lock:
            self.attempts[n] = {"task": task, "point": point, "code": code,
                                "seconds": round(time.monotonic() - start, 1),
                                "log": str(log_path)}
        return code, xcom

    def _forked(self, task: str, args: dict[str, Any], env: dict[str, str], log_path: Path,
                wait_s: float) -> tuple[int, dict[str, Any] | None]:
        result_path = log_path.with_suffix(".xcom.json")
        proc = fork_server().Process(target=_task_process, args=(
            task, args, env, str(log_path), str(result_path)))
        proc.start()
        proc.join(wait_s)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        code = proc.exitcode
        xcom = json.loads(result_path.read_text()) if code == 0 else None
        return code if code is not None else -1, xcom

    @staticmethod
    def _spawned(task: str, args: dict[str, Any], env: dict[str, str], log_path: Path,
                 wait_s: float) -> tuple[int, dict[str, Any] | None]:
        with log_path.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", __name__, task, json.dumps(args)],
                                    stdout=subprocess.PIPE, stderr=err, env=env, cwd=REPO,
                                    text=True)
            try:
                out, _ = proc.communicate(timeout=wait_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("XCOM ")]
        xcom = json.loads(lines[-1].removeprefix("XCOM ")) if proc.returncode == 0 and lines \
            else None
        return proc.returncode, xcom

    def run(self, task: str, args: dict[str, Any],
            first: dict[str, Any] | None = None) -> tuple[list[int], dict[str, Any] | None]:
        """``task`` as Airflow runs it: tried, and on failure retried up to :data:`RETRIES`
        times with the same arguments. ``first``: how the first try is run (a failpoint or
        a kill; see :meth:`attempt`). Returns every try's exit code and the XCom."""
        codes: list[int] = []
        xcom = None
        for i in range(1 + RETRIES):
            if i:
                time.sleep(self.retry_delay_s)
            code, xcom = self.attempt(task, args, **(first or {}) if i == 0 else {})
            codes.append(code)
            if code == 0:
                break
        return codes, xcom

    def state(self) -> dict[str, Any]:
        code, xcom = self.attempt("state", {})
        if code != 0 or xcom is None:
            raise RuntimeError(f"cannot read the state of {self.home}: see {self.logs}")
        return xcom


# -- the campaign ------------------------------------------------------------------------------------

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"


class Twin:
    """The uninterrupted run of both DAGs on a copy of the home: each task's XCom and
    duration, a snapshot of the home before each task, and the states the checks compare
    with (before, after ``catalogue_refresh``, after ``ranker_retrain``)."""

    def __init__(self, home: Path, work: Path, params: dict[str, Any],
                 feedback_sessions: int, preload: bool = True, ranker: bool = True) -> None:
        self.home, self.params, self.preload = home, params, preload
        self.snaps: dict[str, Path] = {}
        self.xcoms: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {}
        runner = Runner(home, work / "logs" / "twin", preload=preload)
        self.before = runner.state()
        self.ranker: dict[str, Any] = {}
        for dag in (CATALOGUE_DAG, RANKER_DAG) if ranker else (CATALOGUE_DAG,):
            if dag is RANKER_DAG:
                codes, _ = runner.run("feedback", {"sessions": feedback_sessions})
                self._require(codes, "feedback", runner)
            for task in dag:
                self.snaps[task] = copy_home(home, work / "snaps" / task)
                codes, xcom = runner.run(task, task_args(task, self.xcoms, params))
                self._require(codes, task, runner)
                self.xcoms[task] = xcom or {}
                self.seconds[task] = runner.attempts[-1]["seconds"]
            if dag is CATALOGUE_DAG:
                self.catalogue = runner.state()
            else:
                self.ranker = runner.state()

    @staticmethod
    def _require(codes: list[int], task: str, runner: Runner) -> None:
        if codes != [0]:
            from serving.errors import MeasurementError

            raise MeasurementError(f"the uninterrupted run's task {task} failed (exits {codes}); "
                                   f"see {runner.attempts[-1]['log']}")

    def xcoms_for(self, home: Path, upto: str) -> dict[str, dict[str, Any]]:
        """The XComs of the tasks before ``upto``, their paths moved into ``home``."""
        dag = CATALOGUE_DAG if upto in CATALOGUE_DAG else RANKER_DAG
        before = {t: self.xcoms[t] for t in dag[:dag.index(upto)]}
        return rebase(before, self.home, home)


def _versions(state: dict[str, Any], model: str) -> dict[str, Any]:
    return {int(k): v for k, v in
            state["registry"]["models"].get(model, {}).get("versions", {}).items()}


def compare(dag: tuple[str, ...], base: dict[str, Any], ref: dict[str, Any],
            state: dict[str, Any]) -> dict[str, Any]:
    """What differs between a run's end ``state`` and the uninterrupted run's ``ref``, both
    from ``base`` (the state before the DAG): ``lost`` and ``duplicated`` outcomes, other
    ``problems``, new model versions per model, and whether the release is byte-identical."""
    lost: list[str] = []
    dup: list[str] = []
    problems: list[str] = []
    if dag is CATALOGUE_DAG:
        want, got = ref["pointer"], state["pointer"]
        if got != want:
            if got and want and got["release_id"] == want["release_id"]:
                (dup if got["generation"] > want["generation"] else lost).append(
                    f"pointer generation {got['generation']}, expected {want['generation']}")
            else:
                lost.append(f"pointer names {got}, expected {want}")
        extra = sorted(set(state["releases"]) - set(ref["releases"]))
        missing = sorted(set(ref["releases"]) - set(state["releases"]))
        if extra:
            dup.append(f"extra releases {extra}")
        if missing:
            lost.append(f"releases missing {missing}")
        if state["staged_warehouse"]:
            lost.append("the run's warehouse copy was never committed")
        if set(state["staging"]) - set(ref["staging"]):
            problems.append(f"staged bundles left behind: {state['staging']}")
        for key in ("items", "vectors"):
            if state["warehouse"].get(key) != ref["warehouse"].get(key):
                lost.append(f"warehouse {key} differ ({state['warehouse'].get(key + '_rows')} "
                            f"rows, expected {ref['warehouse'].get(key + '_rows')})")
    if dag is RANKER_DAG:
        want_c, got_c = ref["checkpoint"], state["checkpoint"]
        if got_c is None or want_c is None:
            if got_c != want_c:
                lost.append(f"checkpoint {got_c}, expected {want_c}")
        else:
            if got_c["seq"] > want_c["seq"]:
                dup.append(f"checkpoint seq {got_c['seq']}, expected {want_c['seq']}")
            elif got_c["seq"] < want_c["seq"]:
                lost.append(f"checkpoint seq {got_c['seq']}, expected {want_c['seq']}")
            for key in ("offset", "release_id", "parameters", "meta", "retrain_version"):
                if got_c[key] != want_c[key]:
                    problems.append(f"checkpoint {key} {got_c[key]}, expected {want_c[key]}")
    if set(state["temp_files"]) - set(ref["temp_files"]):
        problems.append(f"temporary files left behind: {state['temp_files']}")
    new: dict[str, int] = {}  # of the models the DAG registers
    for model in ref["registry"]["models"]:
        before = set(_versions(base, model))
        want_new = len(set(_versions(ref, model)) - before)
        got_versions = _versions(state, model)
        got_new = len(set(got_versions) - before)
        if want_new:
            new[model] = got_new
        if got_new > want_new:
            dup.append(f"{model}: {got_new} new versions, expected {want_new}")
        elif got_new < want_new:
            lost.append(f"{model}: {got_new} new versions, expected {want_new}")
        want_ch = ref["registry"]["models"][model]["champion"]
        got_ch = state["registry"]["models"].get(model, {}).get("champion")
        want_tags = _versions(ref, model).get(want_ch) if want_ch else None
        got_tags = got_versions.get(got_ch) if got_ch else None
        if want_tags != got_tags:
            problems.append(f"{model}: champion is v{got_ch} {got_tags}, expected "
                            f"v{want_ch} {want_tags}")
    identical = None
    if dag is CATALOGUE_DAG and state["pointer"] and state["pointer"] == ref["pointer"]:
        masked = {k: v for k, v in state["release_files"].items() if k != "manifest.json"}
        want_f = {k: v for k, v in ref["release_files"].items() if k != "manifest.json"}
        identical = masked == want_f
        if not identical:
            problems.append("release files differ: " + ", ".join(sorted(
                k for k in set(masked) | set(want_f) if masked.get(k) != want_f.get(k))))
    return {"lost": lost, "duplicated": dup, "problems": problems, "new_versions": new,
            "byte_identical": identical}


def run_scenario(twin: Twin, task: str, point: str, work: Path,
                 rng: random.Random) -> dict[str, Any]:
    """Kill ``task`` at ``point`` on a copy of the home as it was before the task, retry it,
    run the rest of its DAG, and compare the end state with the twin's."""
    dag = CATALOGUE_DAG if task in CATALOGUE_DAG else RANKER_DAG
    name = f"{task}@{point.split(':')[0]}"
    home = copy_home(twin.snaps[task], work / "runs" / name)
    runner = Runner(home, work / "logs" / name, preload=twin.preload)
    xcoms = twin.xcoms_for(home, task)
    start = time.monotonic()
    if point == "random":
        first: dict[str, Any] = {"kill_after_s": twin.seconds[task] * rng.uniform(0.2, 0.9)}
    else:
        first = {"point": point}
    codes: dict[str, list[int]] = {}
    for t in dag[dag.index(task):]:
        codes[t], xcom = runner.run(t, task_args(t, xcoms, twin.params),
                                    first if t == task else None)
        if xcom is None:
            break  # the DAG run failed: its later tasks never run
        xcoms[t] = xcom
    state = runner.state()
    base, ref = ((twin.before, twin.catalogue) if dag is CATALOGUE_DAG
                 else (twin.catalogue, twin.ranker))
    result = compare(dag, base, ref, state)
    failed = [t for t, c in codes.items() if c[-1] != 0]
    if failed:
        result["problems"].append(f"task {failed[0]} failed after its retries")
    # the announce task's inputs and the ranker report's version must be the twin's
    keys = {"publish": ("release_id", "gate_passed", "live"), "register": ("version",
            "release_id", "champion"), "report": ("version",)}
    for t, fields in keys.items():
        if t in xcoms and t in codes:
            mine = {f: xcoms[t].get(f) for f in fields}
            theirs = {f: twin.xcoms[t].get(f) for f in fields}
            if mine != theirs:
                result["problems"].append(f"{t} returned {mine}, uninterrupted {theirs}")
    notes = []
    if "report" in xcoms and "report" in codes and \
            xcoms["report"].get("promoted") != twin.xcoms["report"].get("promoted"):
        # a retry reports what the run achieved, as the uninterrupted twin does (a retrain
        # retried after the killed try's checkpoint went live reports it already_live)
        notes.append(f"report says promoted={xcoms['report'].get('promoted')}, uninterrupted "
                     f"{twin.xcoms['report'].get('promoted')}")
    killed = codes[task][0] == KILLED
    retry_codes = [c for t, cs in codes.items() for c in (cs[1:] if t == task else cs)]
    result.update({
        "task": task, "point": point, "killed": killed, "notes": notes,
        "exits": {t: c for t, c in codes.items()},
        "crashed": any(c == 1 for c in retry_codes) or bool(failed),
        "extra_retries": sum(len(cs) - 1 for cs in codes.values()) - int(killed),
        "running_runs_left": state["registry"]["running_runs"],
        "seconds": round(time.monotonic() - start, 1)})
    result["ok"] = (result["killed"] and not result["lost"] and not result["duplicated"]
                    and not result["problems"] and not result["crashed"])
    log.info("dag kills: %s killed at %s, retried, rest of the DAG run: %s (%.0f s)", task,
             point, "as uninterrupted" if result["ok"] else "DIFFERS", result["seconds"])
    if result["ok"]:
        shutil.rmtree(home, ignore_errors=True)
    return result


def run_overlap_same(twin: Twin, work: Path) -> dict[str, Any]:
    """Two runs' ``publish`` then ``register`` of the release the twin published, started at
    the same instant (two processes at a time): one pointer move, one model version, the
    twin's end state, and both runs succeed (with Airflow's retries)."""
    start = time.monotonic()
    home = copy_home(twin.snaps["publish"], work / "runs" / "overlap-same")
    runner = Runner(home, work / "logs" / "overlap-same", preload=twin.preload)
    args = task_args("publish", twin.xcoms_for(home, "publish"), twin.params)
    barrier = threading.Barrier(2)
    runs: list[dict[str, Any]] = [{}, {}]

    def one(i: int) -> None:
        barrier.wait()
        runs[i]["publish"], pub = runner.run("publish", args)
        if pub is not None:
            runs[i]["register"], _ = runner.run("register", {"path": pub["path"]})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = compare(CATALOGUE_DAG, twin.before, twin.catalogue, runner.state())
    codes = [c for r in runs for k in ("publish", "register") for c in r.get(k, [])]
    failed = [i for i, r in enumerate(runs) if r.get("register", [1])[-1] != 0]
    if failed:
        result["problems"].append(f"run(s) {failed} did not finish: {runs}")
    result.update({"case": "same release", "home": home, "exits": runs, "crashed": 1 in codes,
                   "extra_retries": len(codes) - 4,
                   "seconds": round(time.monotonic() - start, 1)})
    return result


OTHER_RELEASE = "0000000000000b0b"  # the other run's release in run_overlap_interleaved


def run_overlap_interleaved(twin: Twin, work: Path) -> dict[str, Any]:
    """Two runs with different releases, their tasks in the worst order: this run publishes,
    the other run publishes a newer release (a copy of the live one, as another catalogue
    would stage), registers it, and only then does this run register. The pointer names the
    newer release, and so must ``champion``; each release is one new version."""
    start = time.monotonic()
    home = copy_home(twin.snaps["publish"], work / "runs" / "overlap-interleaved")
    runner = Runner(home, work / "logs" / "overlap-interleaved", preload=twin.preload)
    code, staged = runner.attempt("stage_copy", {"release_id": OTHER_RELEASE})
    if code != 0 or staged is None:
        raise RuntimeError(f"cannot stage the other run's release: see {runner.logs}")
    mine = task_args("publish", twin.xcoms_for(home, "publish"), twin.params)
    order: list[tuple[str, dict[str, Any]]] = [
        ("publish", mine),
        ("publish", {"bundle_dir": staged["bundle_dir"], "warehouse": None}),
        ("register", {"path": str(home / "releases" / OTHER_RELEASE)}),
        ("register", {"path": rebase(twin.xcoms["publish"], twin.home, home)["path"]})]
    codes: list[list[int]] = [runner.run(task, args)[0] for task, args in order]
    state = runner.state()
    problems: list[str] = []
    lost: list[str] = []
    dup: list[str] = []
    generation = twin.before["pointer"]["generation"] + 2
    if state["pointer"] != {"release_id": OTHER_RELEASE, "generation": generation}:
        problems.append(f"pointer {state['pointer']}, expected {OTHER_RELEASE} at generation "
                        f"{generation}")
    model = next(iter(twin.catalogue["registry"]["models"]))
    new = set(_versions(state, model)) - set(_versions(twin.before, model))
    if len(new) != 2:
        (dup if len(new) > 2 else lost).append(f"{model}: {len(new)} new versions, expected 2")
    champion = state["registry"]["models"][model]["champion"]
    tags = _versions(state, model).get(champion, {})
    if tags.get("release_id") != OTHER_RELEASE:
        problems.append(f"{model}: champion is v{champion} {tags}, not the live release "
                        f"{OTHER_RELEASE}")
    if any(c[-1] != 0 for c in codes):
        problems.append(f"a task failed after its retries: exits {codes}")
    flat = [c for cs in codes for c in cs]
    return {"case": "two releases, interleaved", "home": home, "lost": lost, "duplicated": dup,
            "problems": problems, "crashed": 1 in flat, "exits": codes,
            "extra_retries": len(flat) - len(codes), "new_versions": {model: len(new)},
            "byte_identical": None, "seconds": round(time.monotonic() - start, 1)}


OVERLAPS: dict[str, Callable[[Twin, Path], dict[str, Any]]] = {
    "same release": run_overlap_same, "two releases, interleaved": run_overlap_interleaved}


# ``embed1`` is the same function as ``embed0`` (one mapped task): killing shard 0 stands for it
KILLED_TASKS = ("ingest", "embed0", "index", "evaluate", "publish", "register", "retrain",
                "report")


def run_dag_kills(source_home: Path, work: Path, tasks: tuple[str, ...] = KILLED_TASKS,
                  points: dict[str, tuple[str, ...]] | None = None,
                  overlap: tuple[str, ...] = tuple(OVERLAPS), feedback_sessions: int = 12,
                  workers: int = 2, seed: int = 0, catalogue: Path | None = None,
                  preload: bool = True) -> dict[str, Any]:
    """Kill each of ``tasks`` (of both DAGs) at each of its points (:data:`POINTS`, or
    ``points[task]``), retry it, run the rest of its DAG and compare with the twin; and run
    the ``overlap`` cases (:data:`OVERLAPS`).

    ``source_home``: a built home (``make demo``), only read; ``work``: where the copies go
    (emptied first; the homes of the runs that passed are removed). ``catalogue``: the
    snapshot to change (default: the demo catalogue). ``feedback_sessions``: shoppers per
    feedback query before the retrain. ``workers``: runs side by side (each a sequence of
    processes). ``preload``: task processes forked from a fork server (see :class:`Runner`).
    ``seed``: the random kill instants.
    """
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    golden = DEMO_DIR / "golden_queries.json"
    params = {"catalogue": str(changed_catalogue(catalogue or DEMO_DIR / "catalogue.csv",
                                                 work / "catalogue.csv", golden)),
              "golden": str(golden), "judgments": None, "holdout": 0.2, "epochs": 5}
    twin = Twin(copy_home(source_home, work / "twin"), work, params, feedback_sessions, preload,
                ranker=any(t in RANKER_DAG for t in tasks))
    twin_seconds = time.monotonic() - started
    rng = random.Random(seed)
    jobs: list[tuple[float, Callable[[], dict[str, Any]]]] = []
    for task in tasks:
        dag = CATALOGUE_DAG if task in CATALOGUE_DAG else RANKER_DAG
        cost = sum(twin.seconds[t] for t in dag[dag.index(task):]) + twin.seconds[task]
        for point in (points or {}).get(task, POINTS[task]):
            jobs.append((cost, partial(run_scenario, twin, task, point, work,
                                       random.Random(rng.random()))))
    for case in overlap:
        jobs.append((2 * (twin.seconds["publish"] + twin.seconds["register"]),
                     partial(OVERLAPS[case], twin, work)))
    jobs.sort(key=lambda j: -j[0])  # the longest first: the workers finish together
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda j: j[1](), jobs))
    scenarios = [r for r in results if "task" in r]
    overlaps = [r for r in results if "case" in r]
    for r in overlaps:
        r["ok"] = not (r["lost"] or r["duplicated"] or r["problems"] or r["crashed"])
        if r["ok"]:
            shutil.rmtree(r.pop("home"), ignore_errors=True)
    # the homes of the runs that failed stay for inspection, with every attempt's log
    shutil.rmtree(work / "snaps", ignore_errors=True)
    shutil.rmtree(work / "twin", ignore_errors=True)
    per_task: dict[str, dict[str, Any]] = {}
    for r in sorted(scenarios, key=lambda r: (tasks.index(r["task"]),
                                              POINTS[r["task"]].index(r["point"])
                                              if r["point"] in POINTS[r["task"]] else 99)):
        what = r["lost"] + r["duplicated"] + r["problems"]
        if not r["killed"]:
            what.append(f"not killed at the point (exits {r['exits']})")
        if r["crashed"]:
            what.append(f"crashed (exits {r['exits']})")
        per_task.setdefault(r["task"], {})[r["point"]] = "ok" if r["ok"] else what
    # new versions per model in each run that registers one release (all but the
    # interleaved overlap, which registers two)
    versions: dict[str, dict[str, int]] = {}
    for r in scenarios + [r for r in overlaps if r["case"] == "same release"]:
        for model, n in r["new_versions"].items():
            seen = versions.setdefault(model, {})
            seen[str(n)] = seen.get(str(n), 0) + 1
    identical = [r["byte_identical"] for r in results if r.get("byte_identical") is not None]
    every = scenarios + overlaps
    return figures(
        tried=len(every), survived=sum(r["ok"] for r in every),
        lost=sum(bool(r["lost"]) for r in every),
        duplicated=sum(bool(r["duplicated"]) for r in every),
        crashed=sum(bool(r["crashed"]) for r in every),
        per_task=per_task,
        overlap={r["case"]: "ok" if r["ok"] else r["lost"] + r["duplicated"] + r["problems"]
                 for r in overlaps},
        model_versions_registered=versions,
        byte_identical=f"{sum(identical)} of {len(identical)}",
        masked_manifest_fields=list(MASKED),
        point_not_reached=sum(not r["killed"] for r in scenarios),
        extra_retries=sum(r["extra_retries"] for r in every),
        running_runs_left=max((r.get("running_runs_left", 0) for r in every), default=0),
        notes={f"{r['task']}@{r['point']}": r["notes"] for r in scenarios if r["notes"]},
        run_seconds={**{f"{r['task']}@{r['point']}": r["seconds"] for r in scenarios},
                     **{r["case"]: r["seconds"] for r in overlaps}},
        twin_task_seconds=twin.seconds, twin_seconds=round(twin_seconds, 1),
        seconds=round(time.monotonic() - started, 1),
        failed_at=[f"{r['task']}@{r['point']}" for r in scenarios if not r["ok"]]
        + [r["case"] for r in overlaps if not r["ok"]])


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.reliability.dags TASK ARGS_JSON``: print ``XCOM <result JSON>``."""
    from serving.errors import InstantrecError

    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = call_task(argv[0], json.loads(argv[1]))
    except InstantrecError as exc:
        print(f"typed error: {exc}", file=sys.stderr)
        return 3
    print("XCOM " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
