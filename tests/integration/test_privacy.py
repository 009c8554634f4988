"""Personal data: 1,000 canary user ids sent through every way in leave no trace in any file
the system writes or in its logs (user ids are stored only as keyed hashes), and
`forget(user)` removes a user's events and session state, from the file itself."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from pipelines.cli import main
from pipelines.learning.nearline import NearlineUpdater
from serving.api import create_app
from serving.eventlog import iter_all
from serving.events import pseudonymise
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

CANARY = "canary-7f3a"


def _files_containing(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_canary_user_ids_leave_no_trace_and_forget_removes_a_user(demo_home, tmp_path, caplog,
                                                                   capsys, encoder):
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    settings = make_settings(home, http_rate_events=1e6)
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.1)
        items = [r["item_id"] for r in client.post("/recommend", json={
            "query": "headphones", "k": 10}).json()["results"]]
        for batch in range(10):  # 1,000 users through the HTTP API, 100 a request
            events = [{"type": "click", "session_id": f"priv-s{batch}-{i}",
                       "user_id": f"{CANARY}-{batch * 100 + i}@example.com",
                       "item_id": items[i % 10], "query": "headphones", "position": i % 10 + 1}
                      for i in range(100)]
            assert client.post("/events", json={"events": events}).json()["recorded"] == 100
        # a bad event with a canary user id: refused, and the refusal does not echo it
        bad = client.post("/events", json={"type": "click", "session_id": "x",
                                           "item_id": "y", "user_id": f"{CANARY}-bad",
                                           "position": 0})
        assert bad.status_code == 422 and CANARY not in bad.text
        # a user with two sessions, to forget below
        for sid in ("priv-forget-a", "priv-forget-b"):
            client.post("/events", json={"type": "click", "session_id": sid,
                                         "user_id": f"{CANARY}-forget-me", "item_id": items[0],
                                         "query": "headphones", "position": 1})
        assert client.get("/sessions/priv-forget-a").json()["interactions"]
        rec = client.app.state.service.recommender

        # the command line and the nearline updater see them too
        path = tmp_path / "events.jsonl"
        path.write_text(json.dumps({"type": "click", "session_id": "priv-cli", "item_id": items[1],
                                    "user_id": f"{CANARY}-cli"}) + "\n")
        assert main(["--home", str(home), "record", "--file", str(path)]) == 0
        NearlineUpdater(settings, encoder).run_once()

        needle = CANARY.encode()
        assert _files_containing(home, needle) == []
        assert CANARY not in caplog.text and CANARY not in capsys.readouterr().err

        # forget: the user's events and sessions go, from the file itself; others stay
        pseudonym = pseudonymise(f"{CANARY}-forget-me", settings.user_key())
        assert _files_containing(home / "events", pseudonym.encode())
        before = rec.event_log.count()
        assert rec.forget(f"{CANARY}-forget-me") == {"events_deleted": 2, "sessions": 2,
                                                     "sessions_cleared": 2}
        assert rec.event_log.count() == before - 2
        assert all(e.event.user != pseudonym for e in iter_all(rec.event_log))
        assert client.get("/sessions/priv-forget-a").json()["interactions"] == []
        assert _files_containing(home / "events", pseudonym.encode()) == []
        assert rec.forget(f"{CANARY}-forget-me")["events_deleted"] == 0  # idempotent
