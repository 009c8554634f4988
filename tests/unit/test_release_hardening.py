"""Build and release hardening (issue 15), the fast parts: pointers that name something outside
their folder, the build lock, a run's copy of the warehouse, read-only release files, and a
directory given where a file is expected."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipelines.catalogue.ingest import ingest_catalogue
from pipelines.catalogue.publish import make_read_only
from pipelines.catalogue.warehouse import (
    build_lock,
    commit_warehouse,
    discard_warehouse,
    lock_path,
    stage_warehouse,
    staged_path,
)
from pipelines.cli import main
from serving.checkpoint import LATEST, read_latest
from serving.errors import CatalogueError, ReleaseError, WarehouseBusyError
from serving.layout import rankers_dir
from serving.release import POINTER_NAME, read_pointer
from tests.conftest import REPO, write_rows
from tests.unit.test_catalogue import GOOD, rows_of

BAD_NAMES = ["../..", "..", ".", "", "/etc", "/", "a/b", "a\\b", "..\\..", "x\x00y", "x\ny",
             ".staging"]


# -- pointers -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_release_pointer_outside_its_folder_is_refused_naming_the_file(tmp_path, name):
    (tmp_path / POINTER_NAME).write_text(json.dumps({"release_id": name, "generation": 3}))
    with pytest.raises(ReleaseError, match="not a plain name") as err:
        read_pointer(tmp_path)
    assert str(tmp_path / POINTER_NAME) in str(err.value)


def test_a_plain_release_id_is_followed(tmp_path):
    (tmp_path / POINTER_NAME).write_text(json.dumps({"release_id": "58bdb850c0693d52",
                                                     "generation": 3}))
    pointer = read_pointer(tmp_path)
    assert (pointer.release_id, pointer.generation) == ("58bdb850c0693d52", 3)


@pytest.mark.parametrize("release_id, file", [
    *[(name, f"{name}/ckpt-000000000001.npz") for name in BAD_NAMES],
    ("r1", "../../etc/passwd"),
    ("r1", "/etc/passwd"),
    ("r1", "r2/ckpt-000000000001.npz"),      # another release's folder
    ("r1", "r1/../../ckpt.npz"),
    ("r1", "r1/sub/ckpt.npz"),
    ("r1", "r1/.."),
    ("r1", "r1/"),
    ("r1", "r1"),
])
def test_a_ranker_pointer_outside_its_folder_is_refused_naming_the_file(tmp_path, release_id,
                                                                        file):
    path = rankers_dir(tmp_path) / LATEST
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"release_id": release_id, "file": file, "offset": 5, "seq": 2}))
    with pytest.raises(ReleaseError, match="refused") as err:
        read_latest(tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_an_encoder_pointer_outside_its_folder_is_refused_naming_the_file(tmp_path, name):
    from pipelines.encoder.train import champion_encoder_path

    pointer = tmp_path / "encoders" / "CHAMPION"
    pointer.parent.mkdir()
    pointer.write_text(json.dumps({"encoder": name}))
    with pytest.raises(ReleaseError, match="CHAMPION"):
        champion_encoder_path(tmp_path)


def test_a_plain_ranker_pointer_is_followed(tmp_path):
    path = rankers_dir(tmp_path) / LATEST
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"release_id": "r1", "file": "r1/ckpt-000000000005.npz",
                                "offset": 5, "seq": 2}))
    ref = read_latest(tmp_path)
    assert (ref.release_id, ref.file, ref.offset, ref.seq) == (
        "r1", "r1/ckpt-000000000005.npz", 5, 2)


# -- one build at a time ------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from pipelines.catalogue.warehouse import build_lock
with build_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


class Holder:
    """Another process holding the build lock of ``warehouse``, as a running build does."""

    def __init__(self, warehouse: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(warehouse)], cwd=REPO,
                                     stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> subprocess.Popen:
        assert self.proc.stdout.readline().strip() == "held"
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def test_a_second_build_is_refused_naming_the_holder(tmp_path):
    warehouse = tmp_path / "warehouse.duckdb"
    with Holder(warehouse) as holder:
        with pytest.raises(WarehouseBusyError) as err:
            with build_lock(warehouse):
                pass
        message = str(err.value)
        assert message.startswith(f"another build holds the warehouse {warehouse} "
                                  f"(pid {holder.pid} on ")
        assert re.search(r"python[0-9.]* -c", message) and str(lock_path(warehouse)) in message
        assert "\n" not in message
    # the holder died (killed, as a crash would): the kernel dropped its lock
    with build_lock(warehouse):
        assert lock_path(warehouse).read_text().startswith(f"pid {os.getpid()} on ")
    assert lock_path(warehouse).read_text() == ""  # released: no stale holder named


def test_the_build_lock_is_reentrant_within_a_process(tmp_path):
    warehouse = tmp_path / "warehouse.duckdb"
    with build_lock(warehouse), build_lock(warehouse):
        pass
    with build_lock(warehouse):  # released by the outer exit, taken again
        pass


def test_the_cli_build_says_so_in_one_line_and_exits_non_zero(tmp_path, capsys):
    home = tmp_path / "home"
    with Holder(home / "warehouse.duckdb") as holder:
        start = time.monotonic()
        assert main(["--home", str(home), "build", "--no-register"]) == 2
        assert time.monotonic() - start < 5  # refused before loading the encoder
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"instantrec build: error: another build holds the warehouse "
                          f"{home / 'warehouse.duckdb'} (pid {holder.pid} on ")
    assert "\n" not in err and "Traceback" not in err


# -- a run's copy of the warehouse ----------------------------------------------------------

def test_a_discarded_copy_leaves_the_warehouse_as_it_was_but_keeps_the_rejects(tmp_path):
    live = tmp_path / "warehouse.duckdb"
    first = ingest_catalogue(write_rows(tmp_path / "c1.csv", GOOD), live)
    before = rows_of(live, "SELECT * FROM items ORDER BY item_id")
    staged = stage_warehouse(live, staged_path(live, "build"))
    assert staged == tmp_path / "warehouse.duckdb.build"
    changed = [{**GOOD[0], "title": "Hammer Drill 20V"}, GOOD[1], GOOD[2],
               {**GOOD[0], "id": "A4", "price": "cheap"}]  # one new item, rejected
    second = ingest_catalogue(write_rows(tmp_path / "c2.csv", changed), staged,
                              max_reject_share=0.5)
    assert (second.items_changed, second.rows_rejected) == (1, 1)
    assert rows_of(live, "SELECT * FROM items ORDER BY item_id") == before  # not yet, either

    assert discard_warehouse(live, staged, "rolled back: release r failed its gate") == 1
    assert not staged.exists() and not Path(f"{staged}.wal").exists()
    assert rows_of(live, "SELECT * FROM items ORDER BY item_id") == before
    assert rows_of(live, "SELECT run_id, status FROM ingest_runs ORDER BY finished_at") == [
        (first.run_id, "ok"), (second.run_id, "rolled back: release r failed its gate")]
    assert rows_of(live, "SELECT run_id, item_id, reason FROM rejects") == [
        (second.run_id, "A4", "price 'cheap' is not a number")]
    assert discard_warehouse(live, staged, "again") == 0  # idempotent


def test_a_committed_copy_replaces_the_warehouse(tmp_path):
    live = tmp_path / "warehouse.duckdb"
    ingest_catalogue(write_rows(tmp_path / "c1.csv", GOOD), live)
    staged = stage_warehouse(live, staged_path(live, "build"))
    ingest_catalogue(write_rows(tmp_path / "c2.csv", [{**GOOD[0], "title": "Hammer Drill"},
                                                      *GOOD[1:]]), staged)
    assert commit_warehouse(live, staged) is True
    assert not staged.exists()
    assert rows_of(live, "SELECT title FROM items WHERE item_id = 'A1'") == [("Hammer Drill",)]
    assert commit_warehouse(live, staged) is False  # a retried publish: nothing left to do


def test_a_first_run_without_a_warehouse_starts_from_an_empty_one(tmp_path):
    live = tmp_path / "warehouse.duckdb"
    staged = stage_warehouse(live, staged_path(live, "build"))
    ingest_catalogue(write_rows(tmp_path / "c1.csv", GOOD), staged)
    assert not live.exists()
    commit_warehouse(live, staged)
    assert rows_of(live, "SELECT count(*) FROM items") == [(3,)]


def test_a_copy_left_by_a_run_that_died_is_discarded_by_the_next(tmp_path):
    live = tmp_path / "warehouse.duckdb"
    ingest_catalogue(write_rows(tmp_path / "c1.csv", GOOD), live)
    before = rows_of(live, "SELECT * FROM items ORDER BY item_id")
    staged = stage_warehouse(live, staged_path(live, "catalogue_refresh"))
    dead = ingest_catalogue(write_rows(tmp_path / "c2.csv", GOOD[:2] + [
        {**GOOD[2], "title": "Yoga Mat XL"}]), staged)
    # the run dies here (its index task failed for good); the next run stages afresh
    stage_warehouse(live, staged)
    assert rows_of(live, "SELECT * FROM items ORDER BY item_id") == before
    assert rows_of(staged, "SELECT * FROM items ORDER BY item_id") == before
    assert rows_of(live, f"SELECT status FROM ingest_runs WHERE run_id = '{dead.run_id}'") == [
        ("rolled back: the run did not finish",)]


def test_a_refused_catalogue_in_a_copy_is_still_recorded(tmp_path):
    from pipelines.steps import run_ingest
    from serving.settings import Settings

    settings = Settings(home=tmp_path)
    run_ingest(settings, write_rows(tmp_path / "c1.csv", GOOD))
    before = rows_of(settings.warehouse_path, "SELECT * FROM items ORDER BY item_id")
    with pytest.raises(CatalogueError, match="would delist 2 of the 3"):
        run_ingest(settings, write_rows(tmp_path / "c2.csv", GOOD[:1]), staging="build")
    assert rows_of(settings.warehouse_path, "SELECT * FROM items ORDER BY item_id") == before
    assert rows_of(settings.warehouse_path, "SELECT status FROM ingest_runs ORDER BY "
                                            "finished_at DESC LIMIT 1") == [("failed",)]
    assert not staged_path(settings.warehouse_path, "build").exists()


@pytest.mark.parametrize("step", ["embed", "index"])
def test_a_step_given_a_copy_that_is_gone_says_to_start_again(tmp_path, step):
    from pipelines.steps import run_embed, run_index
    from serving.settings import Settings

    settings = Settings(home=tmp_path)
    gone = staged_path(settings.warehouse_path, "catalogue_refresh")
    with pytest.raises(CatalogueError, match=f"copy of the warehouse {gone} is gone .* run "
                                             "the refresh again from ingest"):
        if step == "embed":
            run_embed(settings, 0, 1, warehouse=gone)
        else:
            run_index(settings, warehouse=gone)


def test_staging_names_are_plain():
    with pytest.raises(ValueError, match="not a plain name"):
        staged_path(Path("w.duckdb"), "../x")


def test_a_warehouse_with_a_pending_log_is_copied_whole(tmp_path):
    """A writer that died before its checkpoint leaves a .wal beside the file: the copy must
    hold what the log holds."""
    live = tmp_path / "warehouse.duckdb"
    ingest_catalogue(write_rows(tmp_path / "c1.csv", GOOD), live)
    script = (f"import duckdb, os; con = duckdb.connect({str(live)!r}); "
              "con.execute('SET checkpoint_threshold = \\'1GB\\''); "
              "con.execute(\"UPDATE items SET title = 'From the log' WHERE item_id = 'A1'\"); "
              "os._exit(0)")  # no checkpoint on close: the update is in the .wal only
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    assert Path(f"{live}.wal").exists()
    staged = stage_warehouse(live, staged_path(live, "build"))
    con = duckdb.connect(str(staged), read_only=True)
    try:
        assert con.execute("SELECT title FROM items WHERE item_id = 'A1'").fetchall() == [
            ("From the log",)]
    finally:
        con.close()


# -- release files --------------------------------------------------------------------------

def test_published_files_are_made_read_only_and_folders_stay_deletable(tmp_path):
    bundle = tmp_path / "r1"
    (bundle / "lexical").mkdir(parents=True)
    for name in ("index.ann", "vectors.npy", "manifest.json", "lexical/params.index.json"):
        (bundle / name).write_bytes(b"x")
        os.chmod(bundle / name, 0o664)
    make_read_only(bundle)
    for name in ("index.ann", "vectors.npy", "manifest.json", "lexical/params.index.json"):
        assert stat.S_IMODE((bundle / name).stat().st_mode) == 0o444, name
    for folder in (bundle, bundle / "lexical"):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o200, folder


# -- a directory where a file is expected ---------------------------------------------------

def test_a_catalogue_that_is_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(CatalogueError, match=f"catalogue {tmp_path} is a directory, "
                                             "expected a file"):
        ingest_catalogue(tmp_path, tmp_path / "w.duckdb")
    with pytest.raises(CatalogueError, match="does not exist"):
        ingest_catalogue(tmp_path / "nope.csv", tmp_path / "w.duckdb")


@pytest.mark.parametrize("args, what", [
    (["build", "--no-register", "--catalogue", "{dir}"], "catalogue"),
    (["build", "--no-register", "--golden", "{dir}"], "golden queries file"),
    (["record", "--file", "{dir}"], "events file"),
    (["eval", "--products", "{dir}", "--judgments", "{file}"], "products file"),
    (["eval", "--products", "{file}", "--judgments", "{dir}"], "judgments file"),
])
def test_a_directory_argument_is_a_one_line_error_saying_so(tmp_path, capsys, args, what):
    folder = tmp_path / "data"
    folder.mkdir()
    file = tmp_path / "file.csv"
    file.write_text("x\n")
    argv = [a.format(dir=folder, file=file) for a in args]
    assert main(["--home", str(tmp_path / "home"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"instantrec {args[0]}: error: {what} {folder} is a directory, expected a file"
