"""The real ranker_retrain DAG, run with dag.test() on the demo release after a click stream:
event log -> batch retrain -> champion gate -> checkpoint + MLflow registry -> nearline and
serving continue from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.learning.nearline import NearlineUpdater
from serving import Recommender
from serving.checkpoint import load_latest, read_latest
from serving.eventlog import SqliteEventLog
from serving.ranker import query_key
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]

RUN_DAG = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).dags["ranker_retrain"]
run = dag.test()
tis = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
print("RESULT " + json.dumps({"state": str(run.state), "tasks": tis}))
"""


def skip_then_click(shown: list[str], target: str, query: str, n_sessions: int,
                    prefix: str) -> list[dict]:
    """Sessions that see ``shown`` down to ``target``, skip everything above it and click it."""
    pos = shown.index(target) + 1
    events = []
    for s in range(n_sessions):
        for p, item in enumerate(shown[:pos], start=1):
            events.append({"event_id": f"{prefix}i{s}-{p}", "session_id": f"{prefix}{s}",
                           "query": query, "item_id": item, "type": "impression", "position": p})
        events.append({"event_id": f"{prefix}c{s}", "session_id": f"{prefix}{s}", "query": query,
                       "item_id": target, "type": "click", "position": pos})
    return events


def rank_of(results, item_id):
    ids = [r.item_id for r in results]
    return ids.index(item_id) + 1 if item_id in ids else None


def run_dag(home: Path, root: Path) -> dict:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "INSTANTREC_HOME": str(home),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", RUN_DAG, str(REPO / "dags")], env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_retrain_dag_promotes_a_better_ranker_that_nearline_and_serving_continue_from(
        demo_copy, encoder, tmp_path, capsys):
    import mlflow
    import pandas as pd

    from pipelines.cli import main
    from pipelines.steps import run_retrain

    settings = make_settings(demo_copy)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    empty = run_retrain(settings, encoder=encoder)
    assert empty.pop("relevance") == {
        "source": "feedback", "propensity_eta": 1.0, "queries": 0, "gate": "feedback",
        "gate_queries": 0, "promoted": False, "reason": "too few queries"}
    assert empty == {
        "promoted": False, "reason": "not enough feedback: 0 examples",
        "release_id": rec.release_id, "offset": 0, "n_examples": 0}

    # Thirty shoppers skip the top six results for "coffee maker" and click the seventh.
    query = "coffee maker"
    shown = [r.item_id for r in rec.recommend(query, k=10)]
    target = shown[6]
    rec.record_many(skip_then_click(shown, target, query, 30, "s"))
    last = SqliteEventLog(settings.events_path).last_offset()
    assert last == 30 * 8

    result = run_dag(demo_copy, tmp_path)
    assert result == {"state": "success", "tasks": {"retrain": "success", "report": "success"}}

    # Registered, gated and promoted.
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'instantrec-ranker'")
    assert len(versions) == 1
    champion = client.get_model_version_by_alias("instantrec-ranker", "champion")
    assert champion.version == versions[0].version
    assert champion.tags["promoted"] == "true" and champion.tags["offset"] == str(last)
    run = client.get_run(champion.run_id)
    metrics, params = run.data.metrics, run.data.params
    assert params["examples"] == str(30 * 7)          # 30 clicks, 30 * 6 skipped negatives
    assert params["train_examples"] == str(24 * 7) and params["holdout_examples"] == str(6 * 7)
    assert params["champion_seq"] == "0"              # no checkpoint yet: the zero-shot ranker
    assert metrics["candidate_log_loss"] < metrics["champion_log_loss"] - 1e-4
    assert metrics["champion_pairwise_accuracy"] == 0.0   # retrieval ranks the target 7th
    assert metrics["candidate_pairwise_accuracy"] == 1.0
    assert metrics["candidate_pairs"] == metrics["champion_pairs"] == 6 * 6
    assert "checkpoint" in {a.path for a in client.list_artifacts(champion.run_id)}

    # The checkpoint is live at the log's end, with the updater's bookkeeping.
    ref, ranker = load_latest(demo_copy)
    assert (ref.release_id, ref.offset, ref.seq) == (rec.release_id, last, 1)
    assert ranker.meta.retrain_version == int(champion.version)
    assert ranker.meta.applied == last
    assert ranker.meta.counters["positives"] == 30
    assert ranker.meta.counters["negatives"] == 180
    assert ranker.meta.warm_from == 0

    # The registered pyfunc scores exactly as the checkpoint does.
    model = mlflow.pyfunc.load_model("models:/instantrec-ranker@champion")
    q = encoder.encode_query(query).astype(np.float64)
    rows = np.array([rec.bundle.items.item_ids.tolist().index(i) for i in shown[:7]])
    X = np.asarray(rec.bundle.vectors[rows], dtype=np.float64)
    table = model.predict(pd.DataFrame({"query_vector": [q.tolist()] * len(rows),
                                        "item_vector": [x.tolist() for x in X],
                                        "row": rows.astype(np.int64),
                                        "query": [query] * len(rows)}))
    expected, _ = ranker.logits(q, X, None, rows, qkey=query_key(query))
    np.testing.assert_allclose(table["logit"].to_numpy(), expected, rtol=1e-9)
    assert table["logit"].iloc[6] == table["logit"].max()

    # Serving picks the checkpoint up, and the clicked item moved up for everyone.
    assert rec.reload() is True and rec.ranker_seq == 1
    assert rank_of(rec.recommend(query, k=10), target) < 7

    # Nothing new: a second retrain (here through the CLI) changes nothing.
    assert main(["--home", str(demo_copy), "retrain"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["promoted"] is True and again["already_live"] is True
    assert again["version"] == int(champion.version)
    assert again["reason"].startswith("no new feedback")
    assert len(client.search_model_versions("name = 'instantrec-ranker'")) == 1
    assert read_latest(demo_copy).seq == 1

    # The nearline updater continues from the retrained checkpoint: three new events, applied
    # exactly once each.
    updater = NearlineUpdater(settings, encoder)
    assert updater.offset == last
    assert updater.stats.applied == last
    more = skip_then_click(shown, shown[1], query, 1, "late")   # two impressions, a click
    assert len(more) == 3
    rec.record_many(more)
    summary = updater.run_once()
    assert summary["read"] == 3 and summary["offset"] == last + 3
    assert summary["applied_total"] == last + 3
    assert summary["counters"]["positives"] == 31 and summary["counters"]["negatives"] == 181
    assert rec.reload() is True and rec.ranker_seq == 2


def test_judged_pairs_become_training_examples(demo_copy, encoder, tmp_path):
    from pipelines.learning.retrain import judged_examples

    rec = Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                           watch=False)
    top = [r.item_id for r in rec.recommend("coffee maker", k=3)]
    judgments = tmp_path / "judgments.csv"
    judgments.write_text("query_id,query,product_id,relevance\n"
                         f"1,Coffee Maker,{top[0]},4\n1,Coffee Maker,{top[1]},1\n"
                         "1,Coffee Maker,NOT-IN-CATALOGUE,4\n")
    settings = make_settings(demo_copy, judgments=judgments)
    updater = NearlineUpdater(settings, encoder, restore=False)
    examples = judged_examples(settings, updater)
    assert [(e.row, e.label, e.offset) for e in examples] == [
        (updater.row_of[top[0]], 1.0, 0), (updater.row_of[top[1]], 0.0, 0)]
    np.testing.assert_allclose(examples[0].q, encoder.encode_query("coffee maker"), rtol=1e-6)
    assert judged_examples(make_settings(demo_copy), updater) == []
