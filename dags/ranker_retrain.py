"""Ranker retrain: retrain the learned ranker on all feedback -> report.

Runs daily, and whenever the catalogue refresh publishes a release (the ranker of a new
release starts from scratch, so it is worth retraining at once). It fits the relevance model
(on INSTANTREC_JUDGMENTS or on position-debiased feedback, behind a cross-fitted nDCG@10
gate), then the online terms on top. The candidate is published and becomes the registered
``champion`` only if its relevance model passed that gate or it beats the live ranker on the
most recent feedback; losing is a normal outcome, not a failure. The running nearline updater continues
from a published checkpoint by itself. Settings come from INSTANTREC_* in the worker's
environment. Every task calls one function, imported inside the task so parsing stays light.
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

# The asset catalogue_refresh emits when a release goes live (same name and uri).
RELEASE = Asset(name="instantrec_release", uri="instantrec://releases/current")


def _settings():
    from serving.settings import load_settings

    return load_settings()


@dag(
    dag_id="ranker_retrain",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 3 * * *", timezone="UTC"), assets=[RELEASE]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
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
    @task
    def retrain() -> dict:
        from pipelines.steps import run_retrain

        params = get_current_context()["params"]
        return run_retrain(_settings(), holdout=float(params["holdout"]),
                           epochs=int(params["epochs"]))

    @task
    def report(result: dict) -> dict:
        """Log the outcome; fail only if a promotion did not take effect."""
        import logging

        log = logging.getLogger("ranker_retrain")
        if not result["promoted"]:
            if "reason" in result:
                log.info("ranker not retrained: %s", result["reason"])
            else:
                log.info("kept the champion: held-out log-loss candidate %.4f vs champion "
                         "%.4f (version %s registered, not promoted)",
                         result["candidate"]["log_loss"], result["champion"]["log_loss"],
                         result["version"])
            return {"promoted": False, "version": result.get("version")}
        from serving.checkpoint import read_latest

        latest = read_latest(_settings().home)
        if latest is None or latest.seq < result["checkpoint_seq"]:
            from airflow.exceptions import AirflowFailException

            raise AirflowFailException(
                f"ranker version {result['version']} was promoted as checkpoint "
                f"{result['checkpoint_seq']}, but the live pointer is at "
                f"{latest.seq if latest else 'nothing'}: the ranker pointer went backwards")
        log.info("promoted ranker version %s: held-out log-loss %.4f (champion %.4f), "
                 "checkpoint %d at offset %d", result["version"],
                 result["candidate"]["log_loss"], result["champion"]["log_loss"],
                 result["checkpoint_seq"], result["offset"])
        return {"promoted": True, "version": result["version"], "offset": result["offset"]}

    report(retrain())


ranker_retrain()
