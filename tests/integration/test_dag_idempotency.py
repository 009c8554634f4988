"""DAG idempotency, small: the catalogue_refresh tasks that write the release and the registry
killed in the middle (a staged bundle's evaluation half-written, the pointer moved before the
warehouse copy is committed, a model version created but not tagged) and retried, then the rest
of the DAG run, as Airflow would; and two runs' publish + register overlapping. Each run must
end with the uninterrupted twin's release (every file's bytes), one pointer move, one new
model version, ``champion`` on the live release. The whole campaign (every task of both DAGs
at three points or more) is ``run_dag_kills`` with its defaults, in the benchmark."""

from __future__ import annotations

import pytest

from pipelines.reliability.dags import OVERLAPS, run_dag_kills

POINTS = {"evaluate": ("atomic.written:1",), "publish": ("publish.pointer:1",),
          "register": ("registry.registered:1",)}


@pytest.fixture(scope="module")
def campaign(demo_home, tmp_path_factory):
    work = tmp_path_factory.mktemp("dag-kills") / "work"
    return run_dag_kills(demo_home, work, tasks=tuple(POINTS), points=POINTS, workers=2)


def test_killed_and_retried_tasks_end_as_an_uninterrupted_run(campaign):
    assert campaign["tried"] == len(POINTS) + len(OVERLAPS)
    assert (campaign["lost"], campaign["duplicated"], campaign["crashed"]) == (0, 0, 0), campaign
    assert campaign["survived"] == campaign["tried"], campaign["failed_at"]
    assert campaign["per_task"] == {t: {p: "ok" for p in ps} for t, ps in POINTS.items()}
    assert campaign["point_not_reached"] == 0
    # no stray file (a killed writer's temporary) and no other byte in the release differs
    assert campaign["byte_identical"] == f"{len(POINTS) + 1} of {len(POINTS) + 1}"
    assert campaign["running_runs_left"] == 0  # the killed register's run was closed


def test_one_model_version_per_release_even_when_killed_or_overlapping(campaign):
    # the kill scenarios and the overlapping runs of one release: exactly one new version each
    assert campaign["model_versions_registered"] == {"instantrec": {"1": len(POINTS) + 1}}


def test_overlapping_runs_move_the_pointer_once_and_champion_follows_it(campaign):
    assert campaign["overlap"] == {case: "ok" for case in OVERLAPS}
