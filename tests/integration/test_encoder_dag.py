"""The real encoder_finetune DAG, run with dag.test() on a small CrowdFlower slice: judged
pairs -> fine-tune -> held-out evaluation -> MLflow registry -> announce (only if promoted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.test_finetune import small_crowdflower

REPO = Path(__file__).resolve().parents[2]

RUN_DAG = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).dags["encoder_finetune"]
run = dag.test(run_conf={"products": sys.argv[2], "judgments": sys.argv[3], "max_steps": 2})
tis = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
print("RESULT " + json.dumps({"state": str(run.state), "tasks": tis}))
"""


def test_encoder_dag_run_trains_evaluates_and_registers(tmp_path, shared_data):
    import mlflow

    from pipelines.encoder.register import encoder_model_name
    from pipelines.encoder.train import champion_encoder_path
    from serving.settings import Settings

    products, judgments = small_crowdflower(shared_data, tmp_path / "data")
    home = tmp_path / "home"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "INSTANTREC_HOME": str(home),
        "INSTANTREC_ITEM_MAX_TOKENS": "64",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", RUN_DAG, str(REPO / "dags"), str(products),
                          str(judgments)], env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    tasks = result["tasks"]
    assert all(tasks[t] == "success" for t in ("collect_pairs", "finetune", "evaluate",
                                              "register")), (tasks, out.stdout[-4000:])

    settings = Settings(home=home)
    # explicit URIs: earlier tests in this process may have pointed mlflow's globals elsewhere
    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri,
                                 registry_uri=settings.tracking_uri)
    versions = client.search_model_versions(f"name='{encoder_model_name(settings)}'")
    assert len(versions) == 1
    promoted = versions[0].tags.get("gate_passed") == "true"
    # announce emits the encoder asset exactly when the new encoder became the champion
    assert tasks["announce"] == ("success" if promoted else "skipped")
    assert (champion_encoder_path(home) is not None) == promoted
    assert result["state"] == "success"
