"""Ranker retrain: retrain the learned ranker on all feedback -> report.

Runs daily, and whenever the catalogue refresh publishes a release (the ranker of a new
release starts from scratch, so it is worth retraining at once). It fits the relevance model
(on INSTANTREC_JUDGMENTS or on position-debiased feedback, behind a cross-fitted nDCG@10
gate), then the online terms on top. The candidate is published and becomes the registered
``champion`` only if its relevance model passed that gate or it beats the live ranker on the
most recent feedback; losing is a normal outcome, not a failure. The running nearline updater continues
from a published checkpoint by itself. Settings come from INSTANTREC_* in the worker's
environment. Every task calls one function, imported inside the task so parsing stays light.

Scheduling: daily at 03:30 UTC, or as soon as ``catalogue_refresh`` announces a new live
release (an ``instantrec_release`` asset event; its extra names the release id and model
version; an unchanged catalogue emits none). A new DAG is paused: unpausing it starts no
catch-up of past days (``catchup=False``), and asset events recorded while it was paused do
not queue runs for it. A run triggered while the DAG is paused is created but stays queued
until the DAG is unpaused.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)

from pipelines.dag_common import default_args, task_settings
from serving.layout import RELEASE_ASSET  # names only: nothing heavy at parse time

# The asset catalogue_refresh emits when a release goes live.
RELEASE = Asset(name=RELEASE_ASSET[0], uri=RELEASE_ASSET[1])


@dag(
    dag_id="ranker_retrain",
    description="Daily and on each new live release: retrain the ranker on all feedback; "
                "promote it only if it wins",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 3 * * *", timezone="UTC"), assets=[RELEASE]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=2, retry_delay=timedelta(seconds=30)),
    params={
        "epochs": Param(5, type="integer", minimum=1, maximum=100,
                        description="passes over all examples"),
        "holdout": Param(0.2, type="number", exclusiveMinimum=0, exclusiveMaximum=1,
                         description="share of the most recent events held out for the gate"),
    },
    tags=["instantrec", "batch"],
    doc_md=__doc__,
)
def ranker_retrain():
    @task(execution_timeout=timedelta(hours=2))
    def retrain() -> dict:
        """Fit the relevance model and the online terms on all feedback against the live
        release; publish and register the candidate, promoted only if it passes its gate."""
        from pipelines.steps import run_retrain

        params = get_current_context()["params"]
        return run_retrain(task_settings(), holdout=float(params["holdout"]),
                           epochs=int(params["epochs"]))

    @task(execution_timeout=timedelta(minutes=5))
    def report(result: dict) -> dict:
        """Log the outcome; fail (without retries) only if a promotion did not take effect."""
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.steps import report_retrain
        from serving.errors import ReleaseError

        try:
            return report_retrain(task_settings(), result)
        except ReleaseError as exc:
            raise AirflowFailException(str(exc)) from exc

    report(retrain())


ranker_retrain()
