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
task calls one function of ``pipelines.finetune``, imported inside the task.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

ENCODER = Asset(name="instantrec_encoder", uri="instantrec://encoders/champion")


def _settings():
    from serving.settings import load_settings

    return load_settings()


@dag(
    dag_id="encoder_finetune",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
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
    @task
    def collect_pairs() -> dict:
        from pipelines.finetune import collect_pairs as collect

        p = get_current_context()["params"]
        return collect(_settings(), p["products"], p["judgments"], float(p["holdout"]))

    @task
    def finetune(pairs: dict) -> dict:
        from airflow.exceptions import AirflowSkipException

        from pipelines.finetune import TrainConfig, train_encoder

        if pairs["train_pairs"] < 2:
            raise AirflowSkipException(f"not enough training pairs: {pairs['train_pairs']}")
        p = get_current_context()["params"]
        settings = _settings()
        cfg = TrainConfig(max_steps=int(p["max_steps"]), epochs=int(p["epochs"]),
                          item_max_tokens=settings.item_max_tokens)
        return train_encoder(settings, pairs["pairs_path"], cfg)

    @task
    def evaluate(pairs: dict, trained: dict) -> dict:
        from pipelines.finetune import evaluate_encoders

        return evaluate_encoders(_settings(), pairs["pairs_path"], trained["encoder_dir"],
                                 pairs["products"], pairs["judgments"])

    @task
    def register(pairs: dict, trained: dict, evaluation: dict) -> dict:
        from pipelines.finetune import register_encoder

        promote = bool(get_current_context()["params"]["promote"])
        return register_encoder(_settings(), trained, evaluation, pairs, promote)

    @task(outlets=[ENCODER])
    def announce(registered: dict) -> dict:
        """Emit the encoder asset only when a new champion was promoted."""
        if not registered["promoted"]:
            from airflow.exceptions import AirflowSkipException

            raise AirflowSkipException(
                f"{registered['model_name']} v{registered['version']} registered, not promoted: "
                f"{registered['gate']}")
        return {"encoder_id": registered["encoder_id"], "version": registered["version"]}

    pairs = collect_pairs()
    trained = finetune(pairs)
    evaluation = evaluate(pairs, trained)
    announce(register(pairs, trained, evaluation))


encoder_finetune()
