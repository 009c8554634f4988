"""Build and release hardening (issue 15), for real: a build whose release fails its gate, or
that fails after ingest, leaves the warehouse as it was (in one process and in the DAG's
steps; a real failed DAG run is in `test_catalogue_dag.py`); published release files are
read-only, and serving reports one changed under it; a pointer naming something outside the
home is refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import duckdb
import pytest

from pipelines.catalogue.warehouse import staged_path
from pipelines.steps import run_build, run_embed, run_evaluate, run_index, run_ingest, run_publish
from serving import Recommender
from serving.errors import ReleaseError
from serving.release import POINTER_NAME, read_pointer
from tests.conftest import make_settings, read_demo_rows, write_rows

DAG_STAGING = "catalogue_refresh"  # the DAG's copy of the warehouse (dags/catalogue_refresh.py)


def warehouse_state(path: Path) -> dict[str, list[tuple]]:
    """Every row of the tables a refresh changes (not the run records, which it adds to)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {table: con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
                for table in ("items", "item_vectors", "lexical_analysis")}
    finally:
        con.close()


def last_run_status(path: Path) -> str:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT status FROM ingest_runs ORDER BY finished_at DESC "
                           "LIMIT 1").fetchone()[0]
    finally:
        con.close()


def changed_catalogue(tmp_path: Path, edition: int = 2026) -> Path:
    rows = read_demo_rows()
    rows[0] = {**rows[0], "title": rows[0]["title"] + f" ({edition} edition)"}
    rows.append({**rows[1], "id": "SKU-NEW-1", "title": "Solar Powered Garden Gnome"})
    return write_rows(tmp_path / f"catalogue-{edition}.csv", rows)


def failing_golden(tmp_path: Path) -> Path:
    golden = tmp_path / "golden.json"
    # an item of the catalogue that no espresso machine query finds: over-ear ANC headphones
    golden.write_text(json.dumps([{"query": "espresso machine", "expected": ["SKU-10165"]}]))
    return golden


def no_copies_left(home: Path) -> bool:
    return not [p.name for p in home.iterdir() if p.name.startswith("warehouse.duckdb.")
                and p.name != "warehouse.duckdb.lock"]


def test_a_build_that_fails_its_gate_leaves_the_warehouse_as_it_was(demo_copy, encoder,
                                                                     tmp_path):
    settings = make_settings(demo_copy)
    before = warehouse_state(settings.warehouse_path)
    pointer = read_pointer(settings.releases_dir)
    catalogue = changed_catalogue(tmp_path)

    out = run_build(settings, catalogue, failing_golden(tmp_path), register=False,
                    encoder=encoder)
    assert out["ingest"]["items_changed"] == 1 and out["ingest"]["items_new"] == 1
    assert out["embed"]["embedded"] == 2 and out["index"]["vectors_stored"] == 2
    failed = out["publish"]
    assert (failed["gate_passed"], failed["live"], failed["warehouse"]) == (
        False, False, "rolled back")
    assert warehouse_state(settings.warehouse_path) == before
    assert last_run_status(settings.warehouse_path) == (
        f"rolled back: release {failed['release_id']} failed its gate")
    assert read_pointer(settings.releases_dir) == pointer
    assert no_copies_left(demo_copy)

    # a corrected catalogue (the failed release's verdict is final), with a gate it passes:
    # the new item is embedded again (the failed run's vectors went with its copy), and now
    # the warehouse has it
    out = run_build(settings, changed_catalogue(tmp_path, 2027), register=False,
                    encoder=encoder)
    assert out["embed"]["embedded"] == 2
    assert (out["publish"]["gate_passed"], out["publish"]["warehouse"]) == (True, "committed")
    after = warehouse_state(settings.warehouse_path)
    assert len(after["items"]) == len(before["items"]) + 1
    assert last_run_status(settings.warehouse_path) == "ok"
    assert no_copies_left(demo_copy)


def test_a_build_that_fails_after_ingest_leaves_the_warehouse_as_it_was(demo_copy, encoder,
                                                                        tmp_path, monkeypatch):
    import pipelines.steps

    settings = make_settings(demo_copy)
    before = warehouse_state(settings.warehouse_path)

    def crash(*args, **kwargs):
        raise RuntimeError("the evaluation crashed")

    monkeypatch.setattr(pipelines.steps, "run_evaluate", crash)
    with pytest.raises(RuntimeError, match="the evaluation crashed"):
        run_build(settings, changed_catalogue(tmp_path), register=False, encoder=encoder)
    assert warehouse_state(settings.warehouse_path) == before
    assert last_run_status(settings.warehouse_path) == "rolled back: RuntimeError"
    assert no_copies_left(demo_copy)


def test_the_dag_steps_roll_back_alike_and_clear_a_dead_runs_copy(demo_copy, encoder,
                                                                  tmp_path):
    """The steps called as the DAG's tasks call them (one function per task, the warehouse
    copy's path passed between them)."""
    settings = make_settings(demo_copy)
    before = warehouse_state(settings.warehouse_path)
    catalogue = changed_catalogue(tmp_path)

    ingested = run_ingest(settings, catalogue, staging=DAG_STAGING)
    copy = Path(ingested["warehouse"])
    assert copy == staged_path(settings.warehouse_path, DAG_STAGING)
    run_embed(settings, 0, 1, encoder=encoder, warehouse=copy)
    built = run_index(settings, encoder, warehouse=copy)
    evaluated = run_evaluate(settings, built["bundle_dir"], failing_golden(tmp_path),
                             encoder=encoder)
    assert evaluated["gate"]["passed"] is False
    published = run_publish(settings, evaluated["bundle_dir"], warehouse=ingested["warehouse"])
    assert published["warehouse"] == "rolled back"
    assert warehouse_state(settings.warehouse_path) == before
    assert not copy.exists()

    # a run whose index task fails for good leaves its copy; the next run's ingest clears it
    dead = run_ingest(settings, catalogue, staging=DAG_STAGING)
    run_embed(settings, 0, 1, encoder=encoder, warehouse=dead["warehouse"])
    assert copy.exists()
    again = run_ingest(settings, catalogue, staging=DAG_STAGING)
    assert again["items_changed"] == 1  # staged afresh from the unchanged warehouse
    assert warehouse_state(settings.warehouse_path) == before
    con = duckdb.connect(str(settings.warehouse_path), read_only=True)
    try:
        assert con.execute("SELECT status FROM ingest_runs WHERE run_id = ?",
                           [dead["run_id"]]).fetchall() == [
            ("rolled back: the run did not finish",)]
    finally:
        con.close()


# -- release files --------------------------------------------------------------------------

def test_published_release_files_are_read_only(demo_home):
    release = demo_home / "releases" / read_pointer(demo_home / "releases").release_id
    files = [p for p in release.rglob("*") if p.is_file()]
    assert {"index.ann", "vectors.npy", "items.parquet", "manifest.json"} <= {
        p.name for p in files}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path


def test_a_release_file_changed_in_place_is_reported_and_never_reloaded(demo_copy, encoder,
                                                                        caplog):
    from fastapi.testclient import TestClient

    from serving.api import create_app

    settings = make_settings(demo_copy)
    releases = demo_copy / "releases"
    live = read_pointer(releases).release_id
    spare = releases / "spare00000000000"
    shutil.copytree(releases / live, spare)  # the same release, untouched, under another id
    manifest = json.loads((spare / "manifest.json").read_text())
    (spare / "manifest.json").unlink()  # read-only: replaced, not edited
    (spare / "manifest.json").write_text(json.dumps({**manifest, "release_id": spare.name}))
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    try:
        expected = [r.item_id for r in rec.recommend("yoga mat", k=5)]
        assert rec.reload() is False and rec.changed_files == []
        # an operator "fixes" the live release in place (root: the mode bits do not stop it);
        # items.parquet is read whole at load, and touching vectors.npy leaves its bytes alone
        with (releases / live / "items.parquet").open("ab") as fh:
            fh.write(b"\n")
        with caplog.at_level(logging.ERROR, logger="serving.recommender"):
            assert rec.reload() is False
        assert rec.changed_files == ["items.parquet"]
        assert rec.counters["release_files_changed"] == 1
        assert str(releases / live / "items.parquet") in caplog.text
        assert rec.reload() is False  # reported once per file
        assert rec.counters["release_files_changed"] == 1
        os.utime(releases / live / "vectors.npy")
        rec.reload()
        assert rec.changed_files == ["items.parquet", "vectors.npy"]
        assert rec.counters["release_files_changed"] == 2
        assert rec.release_id == live  # still serving what it loaded, the same answers
        assert [r.item_id for r in rec.recommend("yoga mat", k=5)] == expected

        with TestClient(create_app(settings, recommender=rec)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            assert ready.json()["release_files_changed"] == ["items.parquet", "vectors.npy"]
            assert ('instantrec_recommender_total{name="release_files_changed"} 2.0'
                    in client.get("/metrics").text)

        # a restart refuses the changed release; an intact one is followed, and reported clean
        with pytest.raises(ReleaseError, match="checksum mismatch on items.parquet"):
            Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
        (releases / POINTER_NAME).write_text(json.dumps({"release_id": spare.name,
                                                         "generation": 99}))
        assert rec.reload() is True and rec.release_id == spare.name
        assert rec.changed_files == []
        assert rec.reload() is False
        assert rec.changed_files == [] and rec.counters["release_files_changed"] == 2
    finally:
        rec.close()


def test_a_pointer_outside_the_home_never_replaces_the_live_release(demo_copy, encoder):
    settings = make_settings(demo_copy)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    try:
        live = rec.release_id
        pointer = demo_copy / "releases" / POINTER_NAME
        pointer.write_text(json.dumps({"release_id": "../..", "generation": 99}))
        assert rec.reload() is False
        assert rec.counters["reload_failures"] == 1 and rec.release_id == live
        with pytest.raises(ReleaseError, match=f"pointer {pointer} names release id '../..'"):
            Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    finally:
        rec.close()
