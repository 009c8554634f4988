"""Encoder fine-tune: collect_pairs -> finetune -> evaluate -> register -> announce.

Runs weekly. Positive (query, item) pairs from the feedback log (and judged data, when the
run params name it) are split by a stable hash of the query; the packaged encoder is
fine-tuned with in-batch negatives on the training queries, compared with the current
champion on the held-out queries (full-catalogue dense retrieval), and registered in MLflow
as ``<model_name>-encoder``. It becomes the champion (alias + ``<home>/encoders/CHAMPION``)
only if held-out nDCG@10 improves; losing is a normal outcome, and then ``announce`` is
skipped. When it wins, ``announce`` emits the ``instantrec_encoder`` asset; the next
``catalogue_refresh`` run (hourly) embeds the whole catalogue with the champion, since its
encoder version changed. Settings come from INSTANTREC_* in the worker's environment; every
task calls one function of ``pipelines.steps``, imported inside the task.

Scheduling: a new DAG is paused. Unpausing it starts one run for the most recent complete
week at once (``catchup=False``: no backfill), then one a week. A run triggered while the DAG
is paused is created but stays queued until the DAG is unpaused.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

from pipelines.dag_common import default_args, task_settings
from serving.layout import ENCODER_ASSET  # names only: nothing heavy at parse time

ENCODER = Asset(name=ENCODER_ASSET[0], uri=ENCODER_ASSET[1])


@dag(
    dag_id="encoder_finetune",
    description="Weekly: fine-tune the encoder on feedback pairs; promote it only if held-out "
                "nDCG@10 improves",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1, retry_delay=timedelta(minutes=1)),
    params={
        "products": Param(None, type=["null", "string"], description="judged data: products"),
        "judgments": Param(None, type=["null", "string"], description="judged data: judgments"),
        "holdout": Param(0.2, type="number", exclusiveMinimum=0, exclusiveMaximum=1,
                         description="share of queries held out (by a hash of the query)"),
        "max_steps": Param(200, type="integer", minimum=1, description="optimiser steps at most"),
        "epochs": Param(1, type="integer", minimum=1, maximum=20,
                        description="passes over the training pairs"),
        "promote": Param(True, type="boolean", description="promote the encoder if it wins"),
    },
    tags=["instantrec", "batch"],
    doc_md=__doc__,
)
def encoder_finetune():
    @task(execution_timeout=timedelta(minutes=30))
    def collect_pairs() -> dict:
        """Positive (query, item) pairs from feedback (and judged data), split by query hash."""
        from pipelines.steps import run_collect_pairs

        p = get_current_context()["params"]
        return run_collect_pairs(task_settings(), p["products"], p["judgments"], float(p["holdout"]))

    @task(execution_timeout=timedelta(hours=4))
    def finetune(pairs: dict) -> dict:
        """Fine-tune the encoder with in-batch negatives on the training queries' pairs; skip
        with fewer than two pairs."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipelines.steps import run_train_encoder

        if pairs["train_pairs"] < 2:
            raise AirflowSkipException(f"not enough training pairs: {pairs['train_pairs']}")
        p = get_current_context()["params"]
        return run_train_encoder(task_settings(), pairs["pairs_path"], int(p["max_steps"]),
                                 int(p["epochs"]))

    @task(execution_timeout=timedelta(hours=2))
    def evaluate(pairs: dict, trained: dict) -> dict:
        """Held-out nDCG@10 of the candidate and the champion (full-catalogue dense retrieval)."""
        from pipelines.steps import run_evaluate_encoders

        return run_evaluate_encoders(task_settings(), pairs, trained)

    @task(execution_timeout=timedelta(minutes=30))
    def register(pairs: dict, trained: dict, evaluation: dict) -> dict:
        """Register the candidate in MLflow; promote it (alias + CHAMPION) only if it won."""
        from pipelines.steps import run_register_encoder

        promote = bool(get_current_context()["params"]["promote"])
        return run_register_encoder(task_settings(), pairs, trained, evaluation, promote)

    @task(outlets=[ENCODER], execution_timeout=timedelta(minutes=5))
    def announce(registered: dict) -> dict:
        """Emit the encoder asset only when a new champion was promoted."""
        if not registered["promoted"]:
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(
                f"{registered['model_name']} v{registered['version']} registered, not promoted: "
                f"{registered['gate']}")
        return {"encoder_id": registered["encoder_id"], "version": registered["version"]}

    pairs = collect_pairs()
    trained = finetune(pairs)
    evaluation = evaluate(pairs, trained)
    announce(register(pairs, trained, evaluation))


encoder_finetune()
