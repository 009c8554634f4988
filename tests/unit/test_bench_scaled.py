"""``instantrec bench scaled``: the figures it derives from what Airflow's REST API reports,
on a hand-made run whose answers can be worked out by hand. The real thing (loopback.sh, a
DAG run) is measured by the benchmark itself and exercised by
tests/integration/test_scaled_airflow.py."""

from __future__ import annotations

import pytest

from pipelines.benchmarks import scaled
from serving.errors import MeasurementError

HOST = "box"


def ti(task_id, start, end, duration, worker, map_index=-1, state="success"):
    return {"task_id": task_id, "map_index": map_index, "state": state,
            "hostname": f"{worker}@{HOST}", "duration": duration,
            "start_date": f"2026-12-06T10:{start}+00:00", "end_date": f"2026-12-06T10:{end}+00:00"}


def a_run():
    """Run 10:00:00 -> 10:02:00 (120 s); two shards side by side from 10:00:20 to 10:01:10."""
    run = {"dag_run_id": "manual__x", "state": "success",
           "queued_at": "2026-12-06T09:59:58+00:00",
           "start_date": "2026-12-06T10:00:00+00:00", "end_date": "2026-12-06T10:02:00+00:00"}
    tis = [
        ti("ingest", "00:01", "00:11", 10.0, "worker-1"),
        ti("plan_shards", "00:12", "00:13", 1.0, "worker-2"),
        ti("embed", "00:20", "01:00", 40.0, "worker-1", map_index=0),
        ti("embed", "00:30", "01:10", 40.0, "worker-2", map_index=1),
        ti("index", "01:12", "01:22", 10.0, "worker-1"),
        ti("evaluate", "01:23", "01:33", 10.0, "worker-2"),
        ti("publish", "01:34", "01:38", 4.0, "worker-1"),
        ti("register", "01:40", "01:55", 15.0, "worker-2"),
        ti("announce", "01:56", "01:57", 1.0, "worker-1"),
    ]
    outputs = {
        "ingest": {"rows_read": 1002, "rows_accepted": 1000, "rows_rejected": 2},
        "embed": {0: {"embedded": 480, "seconds": 38.5, "encoder_version": "enc@1"},
                  1: {"embedded": 520, "seconds": 39.0, "encoder_version": "enc@1"}},
        "publish": {"release_id": "r1", "gate_passed": True, "live": True, "generation": 1},
        "register": {"version": 1},
    }
    return run, tis, outputs


def test_summarise_works_out_the_figures_by_hand():
    out = scaled.summarise(*a_run())
    assert out["wall_s"] == 120.0
    assert out["queued_s"] == 2.0
    assert out["items"] == 1000 and out["rows_rejected"] == 2
    assert out["embed"] == [
        {"shard": 0, "worker": "worker-1", "items": 480, "duration_s": 40.0, "encode_s": 38.5},
        {"shard": 1, "worker": "worker-2", "items": 520, "duration_s": 40.0, "encode_s": 39.0}]
    assert out["embed_items"] == 1000
    assert out["embed_sum_s"] == 80.0
    assert out["embed_span_s"] == 50.0  # 10:00:20 -> 10:01:10
    assert out["embed_sum_over_wall"] == pytest.approx(80 / 120, abs=1e-3)
    # busy: 50 s of shards + 51 s of the other tasks; the rest of 120 s is between tasks
    assert out["between_tasks_s"] == 19.0
    assert out["workers_used"] == ["worker-1", "worker-2"]
    assert [t["task"] for t in out["tasks"]] == [
        "ingest", "plan_shards", "embed[0]", "embed[1]", "index", "evaluate", "publish",
        "register", "announce"]
    assert out["release"] == {"release_id": "r1", "gate_passed": True, "live": True,
                              "generation": 1, "registered_version": 1}


def test_a_build_that_did_not_embed_every_item_is_not_measured():
    run, tis, outputs = a_run()
    outputs["embed"][1]["embedded"] = 0  # vectors reused: not a full build
    with pytest.raises(MeasurementError, match="not a full build: the shards embedded 480"):
        scaled.summarise(run, tis, outputs)


def test_a_task_without_a_duration_is_not_measured():
    run, tis, outputs = a_run()
    tis[4]["duration"] = None
    with pytest.raises(MeasurementError, match=r"task index \(success\) has no duration"):
        scaled.summarise(run, tis, outputs)


def test_a_run_without_an_end_date_is_not_measured():
    run, tis, outputs = a_run()
    run["end_date"] = None
    with pytest.raises(MeasurementError, match="the run has no start or end date"):
        scaled.summarise(run, tis, outputs)


def test_stop_times_reads_the_scripts_report():
    output = ("worker-2 stopped (PID 11, 9 s)\nworker-1 stopped (PID 10, 12 s)\n"
              "redis stopped (PID 3, 0 s)\nsomething else\n")
    assert scaled.stop_times(output) == {"worker-2": 9, "worker-1": 12, "redis": 0}


@pytest.mark.parametrize(("text", "expected"), [("1,2", [1, 2]), ("4", [4]), ("2, 4,", [2, 4])])
def test_int_list(text, expected):
    assert scaled.int_list(text, "shards") == expected


@pytest.mark.parametrize("text", ["", "0,1", "1,1", "a", "-2"])
def test_int_list_refuses(text):
    with pytest.raises(MeasurementError, match="--shards"):
        scaled.int_list(text, "shards")


def test_catalogue_file(tmp_path):
    assert scaled.catalogue_file("demo") is None
    path = tmp_path / "c.parquet"
    path.write_bytes(b"x")
    assert scaled.catalogue_file(str(path)) == path.resolve()
    with pytest.raises(MeasurementError, match="no catalogue file"):
        scaled.catalogue_file(str(tmp_path / "missing.parquet"))


def test_table_has_one_row_per_combination():
    first = scaled.summarise(*a_run())
    runs = [{**first, "workers": w, "shards": 2, "start_s": 30.0, "stop_s": 25.0,
             "release": {**first["release"], "went_live": True}} for w in (1, 2)]
    text = scaled.table({"catalogue": "c.parquet", "items": 1000, "cpu_count": 2, "embed_threads": 1,
                         "runs": runs})
    lines = text.splitlines()
    assert lines[2].split() == ["1", "2", "30.0", "120.0", "80.0", "0.67", "50.0", "19.0",
                                "25.0", "yes"]
    assert lines[3].split()[0] == "2"
    assert "[0] worker-1 480 items 40.0 s; [1] worker-2 520 items 40.0 s" in text
