"""Every DAG file parses, has the expected shape, and imports nothing heavy at parse time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "transformers", "duckdb", "annoy", "mlflow", "polars", "pipelines", "serving"]

PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dags = {}
for dag_id, dag in bag.dags.items():
    dags[dag_id] = {"fileloc": dag.fileloc, "tasks": sorted(dag.task_ids)}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": dags,
                  "heavy": sorted(m for m in sys.argv[2].split(",") if m in sys.modules)}))
"""


def parse_dags(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags"), ",".join(HEAVY)],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dags_parse_without_heavy_imports(tmp_path):
    result = parse_dags(tmp_path)
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
