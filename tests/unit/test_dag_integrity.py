"""Every DAG file parses, has the expected shape, and imports nothing heavy at parse time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# serving.layout (names and paths) and pipelines.dag_common (the DAGs' shared defaults) are
# the parts of the project a DAG file may import at parse time.
HEAVY = ["torch", "transformers", "duckdb", "annoy", "mlflow", "polars", "numpy",
         "pipelines.steps", "pipelines.registry", "pipelines.catalogue", "pipelines.learning",
         "pipelines.encoder", "pipelines.offline",
         "serving.recommender", "serving.settings", "serving.release", "serving.errors"]

PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dags = {}
for dag_id, dag in bag.dags.items():
    tasks = {}
    for t in dag.tasks:
        callbacks = t.on_failure_callback or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        tasks[t.task_id] = {
            "owner": t.owner, "doc_md": t.doc_md,
            "timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None,
            "on_failure": [f"{c.__module__}.{c.__qualname__}" for c in callbacks],
            "outlets": [a.name for a in t.outlets], "inlets": [a.name for a in t.inlets]}
    dags[dag_id] = {"fileloc": dag.fileloc, "tasks": sorted(dag.task_ids),
                    "description": dag.description, "doc_md": dag.doc_md,
                    "catchup": dag.catchup, "task_info": tasks}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": dags,
                  "heavy": sorted(m for m in sys.argv[2].split(",") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """The DAG folder parsed once by Airflow's DagBag in a fresh process."""
    tmp_path = tmp_path_factory.mktemp("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags"), ",".join(HEAVY)],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dags_parse_without_heavy_imports(parsed):
    result = parsed
    assert result["errors"] == {}
    assert result["heavy"] == []
    refresh = result["dags"]["catalogue_refresh"]
    assert refresh["tasks"] == ["announce", "embed", "evaluate", "index", "ingest",
                                "plan_shards", "publish", "register"]
    assert result["dags"]["encoder_finetune"]["tasks"] == ["announce", "collect_pairs",
                                                           "evaluate", "finetune", "register"]
    # one DAG per file, file name == dag_id
    for dag_id, info in result["dags"].items():
        assert Path(info["fileloc"]).stem == dag_id


def test_dags_document_owners_timeouts_and_failures(parsed):
    result = parsed
    dags = result["dags"]
    assert sorted(dags) == ["catalogue_refresh", "encoder_finetune", "ranker_retrain"]
    for dag_id, info in dags.items():
        assert info["description"] and len(info["description"]) > 20, dag_id
        # what unpausing starts, and what happens to a run triggered while paused
        assert info["catchup"] is False
        doc = " ".join(info["doc_md"].split())
        assert "unpausing it starts" in doc.lower(), dag_id
        assert "while the DAG is paused is created but stays queued" in doc, dag_id
        for task_id, task in info["task_info"].items():
            where = f"{dag_id}.{task_id}"
            assert task["owner"] == "instantrec", where
            assert task["doc_md"] and len(task["doc_md"].strip()) > 20, where
            assert task["timeout_s"] is not None and 0 < task["timeout_s"] <= 6 * 3600, where
            assert len(task["on_failure"]) == 1, where
            assert task["on_failure"] == ["pipelines.dag_common.log_failure"], where

    refresh = dags["catalogue_refresh"]["task_info"]
    longest = sorted(refresh, key=lambda t: -refresh[t]["timeout_s"])[:2]
    assert longest == ["embed", "index"]
    # the release asset: read (the last announcement) and emitted by announce only
    assert {t for t, info in refresh.items() if info["outlets"]} == {"announce"}
    assert refresh["announce"]["outlets"] == refresh["announce"]["inlets"] == [
        "instantrec_release"]
