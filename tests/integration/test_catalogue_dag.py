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
dag = DagBag(dag_folder=sys.argv[1]).dags["catalogue_refresh"]
run = dag.test(run_conf={"shards": 2})
tis = {ti.task_id + ("" if ti.map_index < 0 else f"[{ti.map_index}]"): str(ti.state)
       for ti in run.get_task_instances()}
print("RESULT " + json.dumps({"state": str(run.state), "tasks": tis}))
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


def run_dag(env) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN_DAG, str(REPO / "dags")], env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


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

    # A second scheduled run over the unchanged catalogue changes nothing.
    again = run_dag(env)
    assert again["state"] == "success"
    assert read_pointer(home / "releases") == pointer
    assert len(client.search_model_versions("name = 'instantrec'")) == 1
