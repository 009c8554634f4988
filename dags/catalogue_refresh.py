"""Catalogue refresh: ingest -> embed (mapped shards) -> index -> evaluate -> publish -> register
-> announce.

Runs hourly; an unchanged catalogue re-embeds nothing and republishes nothing (release ids are
deterministic), and an embedding shard with nothing pending never loads the encoder.
``announce`` emits the ``instantrec_release`` asset, with the release id and the registered
model version in the event's extra, only when a release went live that was not announced
before; that event is what starts ``ranker_retrain``, so an unchanged catalogue does not
retrain the ranker every hour. A release that fails its evaluation gate fails the run (it is
registered, but not live). The run changes its own copy of the warehouse (``ingest`` makes it,
``embed`` and ``index`` work on it); ``publish`` replaces the warehouse with it only when the
release passed its gate, and otherwise discards it, keeping the run's rejected rows and its
``ingest_runs`` row: a run that fails its gate leaves the warehouse as it was. A run that fails
before ``publish`` leaves its copy behind, unused; the next run's ``ingest`` discards it the
same way. Settings come from INSTANTREC_* in the worker's environment; run
params can point at another catalogue or gate file. Every task calls one function of
``pipelines.steps``, imported inside the task so parsing this file stays light.

Scheduling: a new DAG is paused. Unpausing it starts one run for the most recent complete
hourly interval at once (``catchup=False``: no backfill of the intervals since
``start_date``), then one per hour. A run triggered (UI, REST API, ``airflow dags trigger``)
while the DAG is paused is created but stays queued until the DAG is unpaused.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

from pipelines.dag_common import default_args, task_settings
from serving.layout import RELEASE_ASSET  # names only: nothing heavy at parse time

RELEASE = Asset(name=RELEASE_ASSET[0], uri=RELEASE_ASSET[1])
STAGING = "catalogue_refresh"  # this DAG's copy of the warehouse: <warehouse>.catalogue_refresh


@dag(
    dag_id="catalogue_refresh",
    description="Hourly: ingest the catalogue, embed what changed, index, gate, publish, "
                "register; announce a new live release",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=2, retry_delay=timedelta(seconds=30)),
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
    @task(execution_timeout=timedelta(minutes=20))
    def ingest() -> dict:
        """Validate the catalogue snapshot and upsert new and changed items into this run's
        copy of the warehouse; rejects are counted (and kept), and too many fail the run."""
        from pipelines.steps import run_ingest

        return run_ingest(task_settings(), get_current_context()["params"]["catalogue"],
                          staging=STAGING)

    @task(execution_timeout=timedelta(minutes=1))
    def plan_shards(ingested: dict) -> list[dict]:
        """One mapped ``embed`` task per shard (param ``shards``)."""
        shards = int(get_current_context()["params"]["shards"])
        return [{"shard": i, "shards": shards, "warehouse": ingested["warehouse"]}
                for i in range(shards)]

    # Shards run as wide as the executor allows (AIRFLOW__CORE__PARALLELISM / worker slots).
    # A mapped task does not take its docstring as doc_md: it is given explicitly.
    @task(execution_timeout=timedelta(hours=2),
          doc_md="Embed this shard's new and changed items into a shard file (progress in the "
                 "log); with nothing pending it returns at once without loading the encoder.")
    def embed(shard: int, shards: int, warehouse: str) -> dict:
        from pipelines.steps import run_embed, yield_cpu

        settings = task_settings()
        yield_cpu(settings)  # this task's process is a batch job: requests beside it go first
        return run_embed(settings, shard, shards, warehouse=warehouse)

    @task(execution_timeout=timedelta(hours=1))
    def index(embedded: list[dict], ingested: dict) -> dict:
        """Fold the shard files into the run's warehouse copy and stage a release bundle
        (Annoy + BM25)."""
        from pipelines.steps import run_index

        return run_index(task_settings(), warehouse=ingested["warehouse"])

    @task(execution_timeout=timedelta(minutes=30))
    def evaluate(built: dict) -> dict:
        """Evaluate the staged bundle (index recall, golden and judged queries) and decide the
        gate."""
        from pipelines.steps import run_evaluate

        params = get_current_context()["params"]
        return run_evaluate(task_settings(), built["bundle_dir"], params["golden"],
                            params["judgments"], demo=params["catalogue"] is None)

    @task(execution_timeout=timedelta(minutes=10))
    def publish(evaluated: dict, ingested: dict) -> dict:
        """Move the bundle into releases/ and, if the gate passed, the live pointer forward
        and the run's warehouse copy into place; if not, discard the copy."""
        from pipelines.steps import run_publish

        return run_publish(task_settings(), evaluated["bundle_dir"], warehouse=ingested["warehouse"])

    @task(execution_timeout=timedelta(minutes=15))
    def register(published: dict) -> dict:
        """Register the release in MLflow; the ``champion`` alias follows a live release."""
        from pipelines.steps import run_register

        return run_register(task_settings(), published["path"])

    @task(inlets=[RELEASE], outlets=[RELEASE], execution_timeout=timedelta(minutes=5))
    def announce(published: dict, registered: dict) -> dict:
        """Emit ``instantrec_release`` (extra: release id, model version) when the live release
        is not the last one announced; skip, emitting nothing, when it is; fail the run when
        the release failed its gate."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        if not published["gate_passed"]:
            raise AirflowFailException(
                f"release {published['release_id']} failed its evaluation gate; it is "
                f"registered as version {registered['version']} but not live"
            )
        context = get_current_context()
        # The last event, not this run's publish result: a run that published but failed
        # before announcing is announced by the next run.
        last = list(context["inlet_events"][RELEASE].ascending(False).limit(1))
        if last and last[0].extra.get("release_id") == published["release_id"]:
            raise AirflowSkipException(
                f"release {published['release_id']} (version {registered['version']}) is "
                f"already live and announced; no asset event")
        extra = {"release_id": published["release_id"], "model_version": registered["version"]}
        context["outlet_events"][RELEASE].extra = extra
        return extra

    ingested = ingest()
    embedded = embed.expand_kwargs(plan_shards(ingested))
    published = publish(evaluate(index(embedded, ingested)), ingested)
    announce(published, register(published))


catalogue_refresh()
