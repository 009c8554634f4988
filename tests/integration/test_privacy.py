"""Personal data: 1,000 canary user ids sent through every way in leave no trace in any file
the system writes or in its logs (user ids are stored only as keyed hashes), and
`forget(user)` removes a user's events and session state, from the file itself. 1,000 queries
holding e-mail addresses, phone and card numbers, IBANs, social security numbers and street
addresses leave none either: queries are scrubbed before they are stored."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable

import ahocorasick
import pytest
from fastapi.testclient import TestClient

from pipelines.cli import main
from pipelines.learning.nearline import NearlineUpdater
from serving.api import create_app
from serving.checkpoint import load_latest
from serving.eventlog import iter_all
from serving.events import pseudonymise
from serving.privacy import scrub
from serving.ranker import query_key
from serving.text import normalise_query
from tests.conftest import make_settings
from tests.unit.test_privacy_scrub import personal_queries

pytestmark = pytest.mark.integration

CANARY = "canary-7f3a"


def secrets_in(secrets: set[str]) -> Callable[[bytes], list[str]]:
    """A search of bytes for every secret at once, as typed or case-folded (UTF-8): one pass
    of an Aho-Corasick automaton over the data instead of a pass per secret."""
    automaton = ahocorasick.Automaton()
    for secret in secrets:
        for variant in {secret, secret.casefold()}:
            automaton.add_word(variant.encode().decode("latin-1"), secret)
    automaton.make_automaton()
    return lambda data: sorted({secret for _, secret in automaton.iter(data.decode("latin-1"))})


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


def _written_since(root, before: dict[str, bytes]) -> dict[str, bytes]:
    """Every file under ``root`` that is new or changed since ``before`` (path -> bytes)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if before.get(str(p)) != data:
                out[str(p)] = data
    return out


def test_personal_data_in_queries_leaves_no_trace(demo_home, tmp_path, caplog, capsys,
                                                  encoder):
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    before = {str(p): p.read_bytes() for p in home.rglob("*") if p.is_file()}
    settings = make_settings(home, http_rate_events=1e6, http_rate_recommend=1e6)
    caplog.set_level(logging.DEBUG)
    queries = personal_queries()  # 1,000, each with the substrings that must not be stored
    with TestClient(create_app(settings)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.1)
        rec = client.app.state.service.recommender
        events: list[dict] = []
        for i, (query, _) in enumerate(queries):
            # searched over HTTP (the search runs on the shopper's own words)...
            resp = client.post("/recommend", json={"query": query, "k": 3,
                                                   "session_id": f"pii-{i}"})
            assert resp.status_code == 200, resp.text
            top = resp.json()["results"][0]["item_id"]
            shown = [{"type": "impression", "session_id": f"pii-{i}", "item_id": top,
                      "query": query, "position": 1, "event_id": f"pii-{i}-i"},
                     {"type": "click", "session_id": f"pii-{i}", "item_id": top,
                      "query": query, "position": 1, "event_id": f"pii-{i}-c"}]
            # ...and reported, half over HTTP (100 events a request), half through record()
            if i % 2:
                for event in shown:
                    rec.record(event)
            else:
                events += shown
            if len(events) == 100:
                assert client.post("/events", json={"events": events}).json()["recorded"] == 100
                events = []
        assert rec.counters["events_recorded"] == 2000
        metrics = client.get("/metrics").text
        NearlineUpdater(settings, encoder).run_once()

    secrets = {s for _, found in queries for s in found}
    assert len(secrets) >= len(queries)  # 1,958: as typed, case-folded, digits alone
    written = _written_since(home, before)
    assert any("events" in path for path in written) and any("rankers" in path for path in written)
    found = secrets_in(secrets)
    leaks = {path: found(data) for path, data in written.items()}
    assert {path: hits for path, hits in leaks.items() if hits} == {}
    text = caplog.text + capsys.readouterr().err + metrics
    assert found(text.encode()) == []
    # what was stored is the scrubbed query, and the ranker learned under its key, never under
    # the key of the query as typed
    stored = {e.event.query for e in iter_all(rec.event_log)}
    assert stored == {scrub(normalise_query(q)) for q, _ in queries}
    ref_ranker = load_latest(home)
    assert ref_ranker is not None
    learned = {key for key, _ in ref_ranker[1].query_item}
    assert learned & {query_key(q) for q in stored}
    assert not learned & {query_key(normalise_query(q)) for q, _ in queries}


def test_forget_clears_the_sessions_another_process_holds_at_its_next_poll(demo_copy, encoder):
    from serving.layout import forgotten_path
    from serving.recommender import Recommender

    settings = make_settings(demo_copy)
    here = Recommender.load(settings=settings, encoder=encoder, watch=False)
    there = Recommender.load(settings=settings, encoder=encoder)  # polls every 0.1 s
    try:
        item = here.recommend("yoga mat", k=1)[0].item_id
        for rec in (here, there):  # each replica saw the user's click in its own memory
            rec.record({"session_id": "leaving", "user_id": "u-leaving", "item_id": item,
                        "type": "click", "position": 1, "query": "yoga mat"})
            rec.record({"session_id": "staying", "user_id": "u-staying", "item_id": item,
                        "type": "click", "position": 1, "query": "yoga mat"})
        assert there.session_summary("leaving")["interactions"]
        assert here.forget("u-leaving")["sessions"] == 1
        deadline = time.monotonic() + 10
        while there.session_summary("leaving")["interactions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert there.session_summary("leaving")["interactions"] == []
        assert there.session_summary("staying")["interactions"]
        assert there.counters["forgotten_sessions_cleared"] == 1
        # the file holds keyed hashes, never the session id or the user id
        text = forgotten_path(demo_copy).read_text()
        assert "leaving" not in text and "u-leaving" not in text
        assert [line.split()[0] for line in text.splitlines()] == ["s", "u"]
    finally:
        here.close()
        there.close()


def test_forget_empties_the_updaters_replay_window_within_one_cycle(demo_copy, encoder):
    """The updater keeps a replay window in memory (sessions, shown pages, rate and bot-filter
    state): a forgotten user's part of it goes at the updater's next poll, the others' stays."""
    from serving.recommender import Recommender

    settings = make_settings(demo_copy)
    rec = Recommender.load(settings=settings, encoder=encoder, watch=False)
    updater = NearlineUpdater(settings, encoder)
    try:
        shown = rec.recommend("yoga mat", k=3)
        for sid, user in (("leaving", "u-leaving"), ("staying", "u-staying")):
            rec.record_many([{"session_id": sid, "user_id": user, "item_id": r.item_id,
                              "type": "impression", "position": p, "query": "yoga mat"}
                             for p, r in enumerate(shown, start=1)])
            rec.record({"session_id": sid, "user_id": user, "item_id": shown[1].item_id,
                        "type": "click", "position": 2, "query": "yoga mat"})
        updater.poll()
        pseudonym = pseudonymise("u-leaving", settings.user_key())

        def traces(who: str) -> list[str]:
            replay, bots = updater.replay, updater.replay.bots
            keys = [*replay.sessions, *replay.shown, *replay.rate, *bots.shown, *bots.sent,
                    *bots.chosen, *bots.qualified, *bots.flags, *bots.intervals, *bots.depths,
                    *(s for pages in bots.pages.values() for s in pages)]
            return [str(k) for k in keys if who in str(k)]

        assert traces("leaving") and traces(pseudonym) and traces("staying")
        assert rec.forget("u-leaving")["events_deleted"] == 4
        updater.poll()   # one cycle
        assert traces("leaving") == [] and traces(pseudonym) == []
        assert traces("staying")
        assert updater.stats.counters["forget_requests"] == 1
        assert updater.stats.counters["forgotten_state_dropped"] > 0
        # a restarted updater rebuilds the same window from the log, which no longer has them
        updater.publish()
        again = NearlineUpdater(settings, encoder)
        assert {str(k) for k in again.replay.sessions} == {"staying"}
        again.close()
    finally:
        updater.close()
        rec.close()
