"""catalogue_refresh under a real scheduler, as operators run it (infra/local/airflow.sh):
api-server + scheduler (LocalExecutor, SQLite metadata, --skip-serve-logs) + dag-processor on
127.0.0.1, driven through the REST API.

A run triggered while the DAG is paused waits; unpausing starts it and the latest hourly
interval's run. The first run to finish publishes the demo release and emits one
``instantrec_release`` event (extra: release id, model version), which queues
``ranker_retrain``; the other run, on the unchanged catalogue, skips ``announce`` and emits
nothing. Task logs are read back through the REST API with no log server running, and every
socket the components listen on is on loopback.
"""

from __future__ import annotations

import time

import pytest

from tests.airflow_services import AirflowServices, airflow_services

# CI's second job (`make test-scaled`) with the other tests that run a whole set of services
pytestmark = [pytest.mark.integration, pytest.mark.scaled]

DAG = "catalogue_refresh"
TERMINAL = {"success", "failed"}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with airflow_services(tmp_path_factory.mktemp("scheduler")) as running:
        yield running


def runs(af: AirflowServices, dag_id: str) -> list[dict]:
    return af.api("GET", f"/dags/{dag_id}/dagRuns?limit=50")["dag_runs"]


def task_states(af: AirflowServices, run_id: str) -> dict[str, str]:
    tis = af.api("GET", f"/dags/{DAG}/dagRuns/{af.quote(run_id)}/taskInstances")
    return {ti["task_id"] + ("" if ti["map_index"] < 0 else f"[{ti['map_index']}]"): ti["state"]
            for ti in tis["task_instances"]}


def task_log(af: AirflowServices, run_id: str, task_id: str, map_index: int = -1) -> str:
    log = af.api("GET", f"/dags/{DAG}/dagRuns/{af.quote(run_id)}/taskInstances/{task_id}"
                        f"/logs/1?map_index={map_index}")
    lines = []
    for part in log["content"]:  # structured entries: the message and its fields
        if isinstance(part, dict):
            fields = " ".join(f"{k}={v}" for k, v in part.items()
                              if k not in ("event", "timestamp", "level", "logger"))
            lines.append(f"{part.get('event', '')} {fields}".rstrip())
        else:
            lines.append(str(part))
    return "\n".join(lines)


def release_events(af: AirflowServices) -> list[dict]:
    return af.api("GET", "/assets/events?name_pattern=instantrec_release")["asset_events"]


def test_catalogue_refresh_under_the_scheduler(services):
    import mlflow

    from serving.release import read_pointer
    from serving.settings import Settings

    af = services
    sockets = af.listening()

    def parsed():
        found = {d["dag_id"]: d for d in af.api("GET", "/dags")["dags"]}
        return found if len(found) == 3 else None

    dags = af.wait_for("the dag-processor to parse dags/", parsed, timeout=180)
    assert sorted(dags) == ["catalogue_refresh", "encoder_finetune", "ranker_retrain"]
    assert all(d["is_paused"] for d in dags.values())

    # ranker_retrain listens for the release asset only while it is unpaused
    af.api("PATCH", "/dags/ranker_retrain", {"is_paused": False})

    triggered = af.api("POST", f"/dags/{DAG}/dagRuns",
                       {"logical_date": None, "conf": {"shards": 2}})["dag_run_id"]
    time.sleep(10)  # several scheduler loops
    assert {r["dag_run_id"]: r["state"] for r in runs(af, DAG)} == {triggered: "queued"}

    af.api("PATCH", f"/dags/{DAG}", {"is_paused": False})

    def all_done():
        sockets.update(af.listening())
        current = runs(af, DAG)
        done = len(current) >= 2 and all(r["state"] in TERMINAL for r in current)
        return current if done else None

    finished = af.wait_for("both catalogue_refresh runs", all_done, timeout=420, every=3)
    assert {r["run_type"] for r in finished} >= {"manual", "scheduled"}
    states = {r["dag_run_id"]: task_states(af, r["dag_run_id"]) for r in finished}
    assert all(r["state"] == "success" for r in finished), states
    announced = [run for run, tis in states.items() if tis["announce"] == "success"]
    skipped = [run for run, tis in states.items() if tis["announce"] == "skipped"]
    assert len(announced) == 1 and len(skipped) == len(finished) - 1, states

    pointer = read_pointer(af.instantrec_home / "releases")
    assert pointer is not None and pointer.generation == 1
    # the run over the unchanged catalogue registered nothing new either
    uri = Settings(home=af.instantrec_home).tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [v.tags["release_id"] for v in client.search_model_versions("name = 'instantrec'")
            ] == [pointer.release_id]
    events = release_events(af)
    assert len(events) == 1, events
    event = events[0]
    assert event["extra"] == {"release_id": pointer.release_id, "model_version": 1}
    assert (event["source_dag_id"], event["source_task_id"], event["source_run_id"]) == (
        DAG, "announce", announced[0])

    # the event queued ranker_retrain (the asset half of its schedule)
    retrain = af.wait_for("an asset-triggered ranker_retrain run", lambda: [
        r for r in runs(af, "ranker_retrain") if r["run_type"] == "asset_triggered"], timeout=60)
    assert len(retrain) == 1
    created = af.wait_for("the event to name the run it created",
                          lambda: release_events(af)[0]["created_dagruns"], timeout=30)
    assert [r["dag_id"] for r in created] == ["ranker_retrain"]
    assert created[0]["run_id"] == retrain[0]["dag_run_id"]
    af.api("PATCH", "/dags/ranker_retrain", {"is_paused": True})

    # task logs come from the files under AIRFLOW_HOME/logs: no log server is running
    first = task_log(af, announced[0], "embed", map_index=0)
    assert "embed shard 0/2: " in first and "items/s, ETA" in first, first[-3000:]
    assert "loading encoder" in first
    again = task_log(af, skipped[0], "embed", map_index=0)
    assert "embed shard 0/2: nothing to do" in again and "loading encoder" not in again, again
    assert "already live and announced; no asset event" in task_log(af, skipped[0], "announce")

    sockets.update(af.listening())
    assert sockets, "no listening socket found: the api-server should have one"
    assert {s[:2] for s in sockets} == {("127.0.0.1", af.port)}, sockets
