"""The real catalogue_refresh DAG, run with dag.test() on the demo catalogue, end to end:
Airflow (SQLite metadata DB) -> DuckDB -> Annoy -> release -> MLflow registry -> serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

RUN_DAG = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.models.asset import AssetEvent, AssetModel
from airflow.utils.session import create_session
from sqlalchemy import select
dag = DagBag(dag_folder=sys.argv[1]).dags["catalogue_refresh"]
run = dag.test(run_conf=json.loads(sys.argv[2]))
tis = {ti.task_id + ("" if ti.map_index < 0 else f"[{ti.map_index}]"): str(ti.state)
       for ti in run.get_task_instances()}
with create_session() as session:
    events = [{"run_id": e.source_run_id, "extra": e.extra} for e in session.scalars(
        select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
        .where(AssetModel.name == "instantrec_release").order_by(AssetEvent.id))]
print("RESULT " + json.dumps({"state": str(run.state), "run_id": run.run_id, "tasks": tis,
                              "release_events": events}))
"""


@pytest.fixture(scope="module")
def dag_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dag")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "INSTANTREC_HOME": str(root / "home"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    return root, env


def run_dag(env, conf: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN_DAG, str(REPO / "dags"),
                          json.dumps(conf or {"shards": 2})], env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["output"] = out.stdout + out.stderr
    return result


def test_dag_run_publishes_registers_and_serves(dag_env):
    import mlflow
    import pandas as pd

    from serving import Recommender
    from serving.release import read_pointer
    from serving.settings import Settings

    root, env = dag_env
    result = run_dag(env)
    assert result["state"] == "success"
    assert {k: v for k, v in result["tasks"].items()} == {
        "ingest": "success", "plan_shards": "success", "embed[0]": "success",
        "embed[1]": "success", "index": "success", "evaluate": "success",
        "publish": "success", "register": "success", "announce": "success"}

    home = root / "home"
    pointer = read_pointer(home / "releases")
    assert pointer is not None and pointer.generation == 1

    settings = Settings(home=home)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("instantrec", "champion")
    assert champion.tags["release_id"] == pointer.release_id
    run = client.get_run(champion.run_id)
    assert run.data.metrics["golden_recall_at_10"] >= 0.9
    assert run.data.metrics["index_recall_at_10"] >= 0.95

    model = mlflow.pyfunc.load_model("models:/instantrec@champion")
    table = model.predict(pd.DataFrame({"query": ["espresso machine", "yoga mat"], "k": [3, 2]}))
    assert list(table["request"]) == [0, 0, 0, 1, 1]

    with Recommender.load(home, settings=settings, watch=False) as rec:
        assert rec.release_id == pointer.release_id
        served = [r.item_id for r in rec.recommend("espresso machine", k=3)]
    assert list(table["item_id"][:3]) == served

    # The new live release is announced once, with its id and model version.
    assert result["release_events"] == [{
        "run_id": result["run_id"],
        "extra": {"release_id": pointer.release_id, "model_version": int(champion.version)}}]
    # A second run over the unchanged catalogue (nothing embedded, no encoder loaded, no
    # asset event, no new version) runs under the scheduler: test_airflow_scheduler.py.


def test_gate_failure_fails_the_run_announces_nothing_and_keeps_the_warehouse(dag_env, tmp_path):
    from serving.release import read_pointer
    from tests.integration.test_build_hardening import (
        changed_catalogue,
        failing_golden,
        last_run_status,
        no_copies_left,
        warehouse_state,
    )

    root, env = dag_env
    home = root / "home"
    if not (home / "warehouse.duckdb").exists():  # run alone, not after the test above
        assert run_dag(env)["state"] == "success"
    before = read_pointer(home / "releases")
    assert no_copies_left(home)
    warehouse = warehouse_state(home / "warehouse.duckdb")

    failed = run_dag(env, {"shards": 2, "catalogue": str(changed_catalogue(tmp_path)),
                           "golden": str(failing_golden(tmp_path))})
    assert failed["state"] == "failed", (failed["tasks"], failed["output"][-4000:])
    assert failed["tasks"]["publish"] == "success" and failed["tasks"]["announce"] == "failed", (
        failed["tasks"], failed["output"][-6000:])
    assert read_pointer(home / "releases") == before
    # the run worked on a copy of the warehouse, rolled back when the gate failed
    assert warehouse_state(home / "warehouse.duckdb") == warehouse
    assert last_run_status(home / "warehouse.duckdb").startswith("rolled back: release ")
    assert no_copies_left(home)
    assert all(e["run_id"] != failed["run_id"] for e in failed["release_events"])
    # the failure callback's one line: what failed, where, which try, and why
    line = next(ln for ln in failed["output"].splitlines() if "TASK FAILED" in ln)
    assert "dag=catalogue_refresh task=announce map_index=-1" in line
    assert f"run_id={failed['run_id']} try=1" in line and "failed its evaluation gate" in line
