"""catalogue_refresh on the scaled-out set-up, on one machine (infra/scaled/loopback.sh): a
private Postgres cluster (Airflow's metadata DB and MLflow's backend store), Redis as the Celery
broker, the MLflow tracking server with an artefact directory, and Airflow with the
CeleryExecutor: api-server, scheduler, dag-processor and two Celery workers (one task slot
each), every socket on 127.0.0.1, all real.

The run is triggered through the REST API with two embedding shards; the two shards run on the
two workers (the task instances' ``hostname``), the release goes live under INSTANTREC_HOME,
and the ``register`` task registers it through the MLflow server, whose ``champion`` alias
then names it; the publish step also pushes it to a release store (a directory here). Two
``instantrec serve`` replicas with empty homes of their own then serve it, one resolving
``champion`` through the MLflow server, the other following the store. The scheduler creates
no hourly run (``use_job_schedule`` off), so the run measured is the triggered one alone; its
wall time is printed (run with ``-s`` to see it).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.airflow_services import ScaledAirflowServices, scaled_airflow_services

# its own CI job (`make test-scaled`), after the suite: it starts eight servers
pytestmark = [pytest.mark.integration, pytest.mark.scaled]

DAG = "catalogue_refresh"
TERMINAL = {"success", "failed"}
STORE = "release-store"   # under the test's root: where the publish step pushes releases
QUERY = "running shoes"


@pytest.fixture(scope="module")
def scaled():
    # Not pytest's tmp_path: its directories are 0700, and when the suite runs as root the
    # script runs Postgres as the postgres user, which must reach the cluster's directory.
    root = Path(tempfile.mkdtemp(prefix="instantrec-scaled-"))
    root.chmod(0o755)
    try:
        with scaled_airflow_services(
                root, workers=2,
                extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                           "INSTANTREC_RELEASE_STORE": str(root / STORE)}) as running:
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


def task_instances(af: ScaledAirflowServices, run_id: str) -> list[dict]:
    return af.api("GET", f"/dags/{DAG}/dagRuns/{af.quote(run_id)}/taskInstances")[
        "task_instances"]


def label(ti: dict) -> str:
    return ti["task_id"] + ("" if ti["map_index"] < 0 else f"[{ti['map_index']}]")


def test_catalogue_refresh_on_two_celery_workers(scaled):
    import mlflow

    from serving.release import read_pointer

    af = scaled
    sockets = af.listening()
    af.wait_for("the dag-processor to parse catalogue_refresh",
                lambda: DAG in {d["dag_id"] for d in af.api("GET", "/dags")["dags"]},
                timeout=120)
    af.api("PATCH", f"/dags/{DAG}", {"is_paused": False})

    triggered = time.monotonic()
    run_id = af.api("POST", f"/dags/{DAG}/dagRuns",
                    {"logical_date": None, "conf": {"shards": 2}})["dag_run_id"]

    def finished():
        sockets.update(af.listening())
        run = af.api("GET", f"/dags/{DAG}/dagRuns/{af.quote(run_id)}")
        return run if run["state"] in TERMINAL else None

    run = af.wait_for("the triggered catalogue_refresh run", finished, timeout=240, every=1)
    observed_s = time.monotonic() - triggered
    tis = task_instances(af, run_id)
    states = {label(ti): (ti["state"], ti["hostname"]) for ti in tis}
    assert run["state"] == "success", f"{states}\n{af.output_tail()}"
    assert {r["dag_run_id"] for r in af.api("GET", f"/dags/{DAG}/dagRuns")["dag_runs"]} == {
        run_id}

    # the two shards ran on the two workers; every task ran on one of them
    shards = {ti["map_index"]: ti["hostname"] for ti in tis if ti["task_id"] == "embed"}
    workers = af.worker_hostnames()
    assert sorted(shards) == [0, 1], states
    assert set(shards.values()) == workers, states
    assert {ti["hostname"] for ti in tis} <= workers, states

    wall_s = (datetime.fromisoformat(run["end_date"])
              - datetime.fromisoformat(run["start_date"])).total_seconds()
    print(f"\ncatalogue_refresh, 2 shards, 2 Celery workers (cold: empty home, fresh workers): "
          f"{wall_s:.1f} s from the run's start to its end, {observed_s:.1f} s from the trigger"
          f" to seeing it succeed (loopback.sh start took {af.start_seconds:.1f} s)")
    for ti in sorted(tis, key=lambda t: (t["start_date"] or "", t["map_index"])):
        print(f"  {label(ti):12} {ti['hostname']:30} {ti['duration'] or 0:6.1f} s")

    # the release went live under INSTANTREC_HOME
    pointer = read_pointer(af.instantrec_home / "releases")
    assert pointer is not None and pointer.generation == 1
    assert (af.instantrec_home / "releases" / pointer.release_id / "manifest.json").is_file()

    # ... and was registered through the MLflow server: champion, artefacts in its store
    client = mlflow.MlflowClient(tracking_uri=af.mlflow_url, registry_uri=af.mlflow_url)
    champion = client.get_model_version_by_alias("instantrec", "champion")
    assert champion.version == "1"
    assert champion.tags["release_id"] == pointer.release_id
    stored = [p for p in af.mlflow_artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in stored), stored
    assert not (af.instantrec_home / "mlflow" / "mlflow.db").exists()  # not the embedded store

    # serving replicas with empty homes of their own, configured by the environment alone
    sockets.update(replicas_serve_the_release(af, pointer.release_id))

    # every socket the started processes listen on is on loopback
    sockets.update(af.listening())
    assert {s[1] for s in sockets} >= {af.port, af.postgres_port, af.redis_port,
                                       af.mlflow_port}, sockets
    assert {s[0] for s in sockets} == {"127.0.0.1"}, sockets


def replicas_serve_the_release(af: ScaledAirflowServices, release_id: str) -> set:
    """Start two ``instantrec serve`` replicas, each with an empty home: one resolves
    ``champion`` through the MLflow server (``INSTANTREC_RELEASE_SOURCE=mlflow``), one follows
    the release store the publish step pushed to (``store``). Both must serve ``release_id``,
    and the same results; returns their listening sockets. Stopped by PID."""
    import psutil

    from pipelines.benchmarks.replicas import Client
    from pipelines.service import ServiceProcess

    sources = {"mlflow": {"INSTANTREC_MLFLOW_TRACKING_URI": af.mlflow_url},
               "store": {"INSTANTREC_RELEASE_STORE": str(af.root / STORE)}}
    replicas = {name: ServiceProcess(af.root / f"replica-{name}", af.root / f"replica-{name}.log",
                                     env={"INSTANTREC_RELEASE_SOURCE": name, **env})
                for name, env in sources.items()}
    began = time.monotonic()
    try:
        for replica in replicas.values():
            replica.spawn()
        for replica in replicas.values():
            replica.wait()
        ready_s = time.monotonic() - began
        pages = {}
        for name, replica in replicas.items():
            status, ready = replica.get("/readyz")
            assert status == 200 and ready["release_id"] == release_id, (name, ready,
                                                                         replica.output())
            home = af.root / f"replica-{name}"
            assert (home / "releases" / release_id / "manifest.json").is_file(), name
            pages[name] = [r["item_id"] for r in Client(replica.port).recommend(QUERY)["results"]]
        assert pages["mlflow"] and pages["mlflow"] == pages["store"], pages
        print(f"  two replicas with empty homes (champion through the MLflow server; the release "
              f"store) ready in {ready_s:.1f} s, serving {release_id}")
        return {(c.laddr.ip, c.laddr.port, name) for name, r in replicas.items()
                for c in psutil.Process(r.pid).net_connections("inet")
                if c.status == psutil.CONN_LISTEN}
    finally:
        for replica in replicas.values():
            replica.stop()
