"""`instantrec record --file`: good lines are kept, each bad one is reported by its number."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from serving.eventlog import SqliteEventLog, iter_all

pytestmark = pytest.mark.integration


def _event(i: int, **extra) -> str:
    return json.dumps({"event_id": f"f-{i}", "session_id": "s-file", "item_id": "SKU-10001",
                       "type": "impression", "position": 1, **extra})


def test_bad_lines_are_reported_by_number_and_the_good_ones_kept(demo_copy, tmp_path, capsys):
    lines = [_event(1), "", _event(2, position=0), "{not json", _event(3),
             _event(4, query="drill\ud800"), "[1, 2]", _event(5, ts=10**400)]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["--home", str(demo_copy), "record", "--file", str(path)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["recorded"] == 2 and out["rejected"] == 5
    assert [(r["line"], r["field"]) for r in out["rejected_lines"]] == [
        (3, "position"), (4, None), (6, "query"), (7, None), (8, "ts")]
    log = SqliteEventLog(demo_copy / "events" / "events.db")
    try:
        assert [e.event.event_id for e in iter_all(log)] == ["f-1", "f-3"]
    finally:
        log.close()
    # sent again: nothing new, nothing lost
    assert main(["--home", str(demo_copy), "record", "--file", str(path)]) == 1
    assert json.loads(capsys.readouterr().out)["duplicates"] == 2


def test_a_missing_file_is_a_clear_error(demo_copy, tmp_path, capsys):
    assert main(["--home", str(demo_copy), "record", "--file", str(tmp_path / "none")]) == 2
    assert "does not exist or is not a file" in capsys.readouterr().err
    assert main(["--home", str(demo_copy), "record", "--file", str(tmp_path)]) == 2


def test_forget_removes_a_users_events_from_the_command_line(demo_copy, tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([_event(1, user_id="bob"), _event(2, user_id="bob"),
                               _event(3, user_id="carol")]) + "\n")
    assert main(["--home", str(demo_copy), "record", "--file", str(path)]) == 0
    capsys.readouterr()
    assert main(["--home", str(demo_copy), "forget", "--user", "bob"]) == 0
    assert json.loads(capsys.readouterr().out) == {"events_deleted": 2, "sessions": 1,
                                                   "sessions_cleared": 0}
    log = SqliteEventLog(demo_copy / "events" / "events.db")
    try:
        assert [e.event.event_id for e in iter_all(log)] == ["f-3"]
    finally:
        log.close()
