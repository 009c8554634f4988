"""Catalogue refresh: ingest -> embed (mapped shards) -> index -> evaluate -> publish -> register.

Runs hourly; an unchanged catalogue re-embeds nothing and republishes nothing (release ids are
deterministic). Settings come from INSTANTREC_* in the worker's environment; run params can
point at another catalogue or gate file. Every task calls one function of
``pipelines.steps``, imported inside the task so parsing this file stays light.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

RELEASE = Asset(name="instantrec_release", uri="instantrec://releases/current")


def _settings():
    from serving.settings import load_settings

    return load_settings()


@dag(
    dag_id="catalogue_refresh",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "catalogue": Param(None, type=["null", "string"],
                           description="CSV/Parquet catalogue snapshot (default: demo)"),
        "shards": Param(2, type="integer", minimum=1, maximum=64,
                        description="embedding shards (mapped tasks)"),
        "golden": Param(None, type=["null", "string"], description="golden queries JSON"),
        "judgments": Param(None, type=["null", "string"], description="judged queries"),
    },
    tags=["instantrec", "batch"],
    doc_md=__doc__,
)
def catalogue_refresh():
    @task
    def ingest() -> dict:
        from pipelines.steps import run_ingest

        return run_ingest(_settings(), get_current_context()["params"]["catalogue"])

    @task
    def plan_shards(ingested: dict) -> list[dict]:
        shards = int(get_current_context()["params"]["shards"])
        return [{"shard": i, "shards": shards} for i in range(shards)]

    # Shards run as wide as the executor allows (AIRFLOW__CORE__PARALLELISM / worker slots).
    @task
    def embed(shard: int, shards: int) -> dict:
        from pipelines.steps import run_embed

        return run_embed(_settings(), shard, shards)

    @task
    def index(embedded: list[dict]) -> dict:
        from pipelines.steps import run_index

        return run_index(_settings())

    @task
    def evaluate(built: dict) -> dict:
        from pipelines.evaluate import DEMO_GOLDEN
        from pipelines.steps import run_evaluate

        params = get_current_context()["params"]
        golden = params["golden"]
        if golden is None and params["catalogue"] is None:
            golden = str(DEMO_GOLDEN)
        return run_evaluate(_settings(), built["bundle_dir"], golden, params["judgments"])

    @task
    def publish(evaluated: dict) -> dict:
        from pipelines.steps import run_publish

        return run_publish(_settings(), evaluated["bundle_dir"])

    @task
    def register(published: dict) -> dict:
        from pipelines.steps import run_register

        return run_register(_settings(), published["path"])

    @task(outlets=[RELEASE])
    def announce(published: dict, registered: dict) -> dict:
        """Emit the release asset when the release is live; fail the run when its gate failed."""
        if not published["gate_passed"]:
            from airflow.exceptions import AirflowFailException

            raise AirflowFailException(
                f"release {published['release_id']} failed its evaluation gate; it is "
                f"registered as version {registered['version']} but not live"
            )
        return {"release_id": published["release_id"], "version": registered["version"]}

    embedded = embed.expand_kwargs(plan_shards(ingest()))
    published = publish(evaluate(index(embedded)))
    announce(published, register(published))


catalogue_refresh()
