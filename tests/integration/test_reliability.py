"""The fault-injection campaign, small: every probe of `instantrec bench reliability` on a copy
of the demo home, through the CLI (a fresh process: the probes fork, which is only safe in a
process that has not run torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FORKING = ("appends", "publish_crashes", "io_errors", "concurrent_publishes", "updater")


@pytest.fixture(scope="module")
def campaign(demo_home, tmp_path_factory):
    import shutil

    home = tmp_path_factory.mktemp("reliability") / "home"
    shutil.copytree(demo_home, home)
    only = ",".join((*FORKING, "hot_reload", "swap_memory", "flood", "bad_input"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "bench", "reliability", "--json",
         "--only", only, "--updater-kills", "6", "--append-kills", "8", "--publish-rounds",
         "1", "--publishes", "40", "--readers", "4", "--reload-s", "6", "--steady-s", "2", "--swaps", "20",
         "--threads", "4", "--flood-s", "6"],
        env={**os.environ, "INSTANTREC_HOME": str(home)}, capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, "\n".join(
        line for line in proc.stderr.splitlines() if "resumed at" not in line)[-6000:]
    return json.loads(proc.stdout)["probes"]


@pytest.mark.parametrize("probe", FORKING)
def test_nothing_is_lost_duplicated_or_crashed(campaign, probe):
    figures = campaign[probe]
    assert figures["tried"] > 0
    assert (figures["lost"], figures["duplicated"], figures["crashed"]) == (0, 0, 0), figures
    assert figures["survived"] == figures["tried"], figures


def test_a_killed_updater_ends_where_an_uninterrupted_one_does(campaign):
    figures = campaign["updater"]
    assert figures["ledger_equal"] and figures["counters_equal"], figures
    assert figures["parameters_differing"] == 0
    assert figures["applied"] > 0 and figures["killed_at_chosen_point"] > 0
    assert figures["second_updater_locked_out"] == "1 of 1"


def test_killed_appends_leave_no_torn_event(campaign):
    figures = campaign["appends"]
    assert figures["torn"] == 0 and figures["integrity_failures"] == 0
    assert figures["acknowledged"] > 0 and figures["stored"] >= figures["acknowledged"]
    assert figures["killed_mid_transaction"] > 0


def test_publishes_are_atomic_for_readers_and_failures_are_typed(campaign):
    assert campaign["publish_crashes"]["point_not_reached"] == 0
    assert campaign["io_errors"]["reported_success_on_failure"] == 0
    concurrent = campaign["concurrent_publishes"]
    assert concurrent["partial_reads"] == 0 and concurrent["release_reads"] > 0


def test_hot_reload_under_load_fails_no_request_and_refuses_a_corrupt_release(campaign):
    figures = campaign["hot_reload"]
    assert figures["failed_requests"] == 0 and figures["versions_backwards"] == 0, figures
    assert figures["releases_swapped_in"] > 0 and figures["checkpoints_swapped_in"] > 0
    assert figures["corrupt_refused"] and figures["kept_serving_during_corrupt"]
    assert figures["corrupt_release"] not in figures["kept_serving_during_corrupt"]


def test_every_kind_of_bad_input_is_refused_with_a_reason(campaign):
    figures = campaign["bad_input"]
    assert figures["kinds_refused"] >= 30
    assert figures["accepted"] == [] and figures["crashes"] == []


def test_many_release_swaps_all_load(campaign):
    figures = campaign["swap_memory"]
    assert figures["survived"] == figures["tried"] == 20 and figures["crashed"] == 0
    assert list(figures["rss_mb_every"]) == ["10", "20"]  # JSON keys


def test_a_flood_is_held_to_its_limits_and_starves_no_shopper(campaign):
    figures = campaign["flood"]
    assert figures["crashed"] == 0 and figures["errors"] == [], figures
    for kind in ("flood_recommend", "flood_events"):
        flood = figures[kind]
        assert flood["sent"] > flood["ceiling"], flood   # a flood, past what the limit lets by
        assert flood["held"] and flood["refused_429"] == flood["sent"] - flood["served"], flood
    assert figures["tried"] > 0 and figures["survived"] == figures["tried"], figures
    assert figures["shopper_refused_429"] == 0
