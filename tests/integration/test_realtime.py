"""The real-time loop on a real demo release: events -> session intent -> nearline -> serving."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.learning.nearline import NearlineUpdater
from serving import Recommender
from serving.eventlog import SqliteEventLog
from serving.events import EventError, parse_event
from serving.ranker import Ranker
from tests.conftest import click_stream, make_settings

REPO = Path(__file__).resolve().parents[2]


def load(home, encoder, **extra):
    return Recommender.load(home, settings=make_settings(home, **extra), encoder=encoder,
                            watch=False)


def rank_of(results, item_id):
    ids = [r.item_id for r in results]
    return ids.index(item_id) + 1 if item_id in ids else None


def test_a_click_moves_the_item_up_in_that_session_only(demo_copy, encoder):
    rec = load(demo_copy, encoder)
    before = rec.recommend("headphones", k=10)
    target = before[5]
    rec.record({"session_id": "s1", "user_id": "alice", "query": "headphones",
                "item_id": target.item_id, "type": "click", "position": 6})
    mine = rec.recommend("headphones", k=10, session_id="s1")
    other = rec.recommend("headphones", k=10, session_id="s2")
    assert rank_of(mine, target.item_id) < 6
    assert mine[rank_of(mine, target.item_id) - 1].signals["session_affinity"] > 0.9
    assert [r.item_id for r in other] == [r.item_id for r in before]
    assert [r.item_id for r in rec.recommend("headphones", k=10)] == [r.item_id for r in before]
    # "keep browsing": no query, the session's interest alone
    browse = rec.recommend(None, k=5, session_id="s1")
    assert browse[0].item_id == target.item_id


def test_a_new_far_away_query_drops_the_old_intent(demo_copy, encoder):
    rec = load(demo_copy, encoder)
    skillet = rec.recommend("cast iron skillet", k=1)[0]
    for i in range(3):
        rec.record({"session_id": "s", "query": "cast iron skillet", "item_id": skillet.item_id,
                    "type": "click", "position": 1, "event_id": f"e{i}"})
    fresh = [r.item_id for r in rec.recommend("kids building blocks", k=10)]
    shifted = [r.item_id for r in rec.recommend("kids building blocks", k=10, session_id="s")]
    assert rec.counters["intent_shifts"] == 1
    assert skillet.item_id not in shifted
    assert len(set(fresh) & set(shifted)) >= 8


def test_record_rejects_bad_events_and_ignores_resends(demo_copy, encoder):
    rec = load(demo_copy, encoder)
    event = {"event_id": "same", "session_id": "s", "item_id": "SKU-10001", "type": "click"}
    rec.record(event)
    rec.record(event)
    assert rec.counters["events_recorded"] == 1 and rec.counters["events_duplicate"] == 1
    assert len(rec._sessions.get("s").interactions) == 1  # the re-send did not count twice
    with pytest.raises(ValueError, match="event type 'view'"):
        rec.record({**event, "type": "view", "event_id": "other"})
    assert rec.counters["rejected_events"] == 1
    log = SqliteEventLog(demo_copy / "events" / "events.db")
    assert log.count() == 1


def test_user_ids_are_never_stored_in_the_clear(demo_copy, encoder):
    rec = load(demo_copy, encoder)
    rec.record({"session_id": "s", "item_id": "SKU-10001", "type": "click",
                "user_id": "jane.doe@example.com"})
    raw = (demo_copy / "events" / "events.db").read_bytes()
    for wal in (demo_copy / "events").glob("events.db-wal"):
        raw += wal.read_bytes()
    assert b"jane.doe" not in raw
    assert SqliteEventLog(demo_copy / "events" / "events.db").read(0)[0].event.user.startswith("u_")


def test_events_from_many_threads_are_all_recorded(demo_copy, encoder):
    rec = load(demo_copy, encoder)

    def worker(t):
        for i in range(50):
            rec.record({"event_id": f"t{t}-{i}", "session_id": f"s{t}", "item_id": "SKU-10001",
                        "type": "impression", "query": "drill", "position": 1 + i % 10})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert SqliteEventLog(demo_copy / "events" / "events.db").count() == 400


def test_a_stream_of_clicks_improves_the_query_for_everyone(demo_copy, encoder):
    settings = make_settings(demo_copy)
    rec = load(demo_copy, encoder)
    query = "coffee maker"
    before = rec.recommend(query, k=10)
    target = before[6].item_id
    rec.record_many(click_stream(rec, query, target, 30))
    summary = NearlineUpdater(settings, encoder).run_once()
    assert summary["counters"]["positives"] == 30
    assert summary["counters"]["negatives"] == 30 * 6  # the six skipped items above it
    assert rec.reload() is True and rec.ranker_seq == 1
    after = rec.recommend(query, k=10)  # no session: the shared ranker changed
    assert rank_of(after, target) < 7
    # what this query's shoppers chose is remembered for the query, for every later shopper
    assert after[rank_of(after, target) - 1].signals["query_item_bias"] > 0
    # the skipped items were taught as negatives
    assert all(r.signals["query_item_bias"] < 0 for r in after if r.item_id in
               {b.item_id for b in before[:6]})
    # items' global biases do not learn online (they cost queries without feedback)
    assert all(r.signals["item_bias"] == 0.0 for r in after)


def test_client_timestamps_cannot_spread_a_bot_burst_past_the_abuse_filter(demo_copy, encoder):
    """50 clicks sent at once by one user, with timestamps spread over ten minutes: the rate
    limit counts by the server's clock, so all but the first 10 in the window are dropped;
    the same history imported (`record --file`, no server time) keeps its own clock."""
    settings = make_settings(demo_copy)
    rec = load(demo_copy, encoder)
    item = rec.recommend("coffee maker", k=1)[0].item_id
    now = time.time()
    rec.record_many([{"event_id": f"bot-{i}", "session_id": f"bot-s{i}", "user_id": "bot",
                      "item_id": item, "type": "click", "query": "coffee maker",
                      "position": 1, "ts": now - 600 + 12 * i} for i in range(50)])
    summary = NearlineUpdater(settings, encoder).run_once()
    assert summary["counters"]["abuse_dropped"] == 40
    with pytest.raises(EventError, match="h before the server's clock"):
        rec.record({"session_id": "s", "item_id": item, "type": "click", "ts": 1.0})


def test_serving_never_applies_a_checkpoint_trained_for_another_release(demo_copy, encoder):
    rec = load(demo_copy, encoder)
    from serving.checkpoint import publish_checkpoint

    foreign = Ranker.initial("some-other-release", 384, len(rec.bundle.items))
    foreign.item_bias[:] = 5.0
    publish_checkpoint(demo_copy, foreign, offset=10)
    assert rec.reload() is False and rec.ranker_seq == 0
    assert all(r.signals["item_bias"] == 0.0 for r in rec.recommend("yoga mat", k=5))


def synthetic_events(rec, n_rounds):
    queries = ["coffee maker", "yoga mat", "headphones", "cordless drill", "office chair"]
    rng = random.Random(11)
    events, t0 = [], 1_700_000_000.0
    for r in range(n_rounds):
        q = queries[r % len(queries)]
        shown = [x.item_id for x in rec.recommend(q, k=8)]
        click = rng.randrange(1, 9)
        for p, item in enumerate(shown, start=1):
            events.append({"event_id": f"i{r}-{p}", "session_id": f"s{r % 37}", "query": q,
                           "item_id": item, "type": "impression", "position": p,
                           "ts": t0 + r, "user_id": f"user{r % 11}"})
        events.append({"event_id": f"c{r}", "session_id": f"s{r % 37}", "query": q,
                       "item_id": shown[click - 1], "type": "click", "position": click,
                       "ts": t0 + r + 0.5, "user_id": f"user{r % 11}"})
        if r % 5 == 0:
            events.append({"event_id": f"p{r}", "session_id": f"s{r % 37}",
                           "item_id": shown[click - 1], "type": "purchase", "ts": t0 + r + 0.7})
    return [parse_event(e, b"k", now=t0 + 10 * n_rounds) for e in events]


def test_replay_examples_are_what_the_updater_learns_from(demo_copy, encoder):
    from pipelines.learning.replay import replay_examples

    rec = load(demo_copy, encoder)
    log = SqliteEventLog(demo_copy / "events" / "events.db")
    log.append(synthetic_events(rec, 40))
    settings = make_settings(demo_copy)
    updater = NearlineUpdater(settings, encoder, restore=False, collect=True)
    updater.replay_all()
    updater.close()
    examples, offset, counters, tally = replay_examples(log, updater.bundle, encoder, settings)
    assert offset == updater.offset == log.last_offset()
    assert counters == updater.stats.counters and counters["negatives"] > 0
    assert len(examples) == len(updater.sink) == counters["positives"] + counters["negatives"]
    for a, b in zip(examples, updater.sink, strict=True):
        assert (a.offset, a.row, a.label, a.weight, a.qkey, a.query) == (
            b.offset, b.row, b.label, b.weight, b.qkey, b.query)
        assert a.lex == pytest.approx(b.lex)
        for name in ("q", "x"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12)
    assert tally.value == updater.tally.value and tally.exposure == updater.tally.exposure


def test_a_fresh_process_restores_a_session_from_the_log(demo_copy, encoder):
    first = load(demo_copy, encoder)
    item = first.recommend("yoga mat", k=1)[0].item_id
    first.record({"session_id": "s9", "item_id": item, "type": "add_to_cart"})
    fresh = load(demo_copy, encoder)  # another process: no session memory
    with pytest.raises(ValueError, match="no recent interactions"):
        fresh.recommend(None, k=3, session_id="s9")
    assert fresh.restore_session("s9") is True
    assert fresh.recommend(None, k=3, session_id="s9")[0].item_id == item
    assert fresh.restore_session("nobody") is False


def test_a_new_event_log_opened_by_many_threads_at_once_loses_nothing(tmp_path):
    """Turning WAL on needs an exclusive lock that SQLite refuses at once, not after its busy
    timeout: writers opening a new log together (a fresh server's first requests, several
    processes) wait for it instead of failing. Twenty new logs, sixteen writers each."""
    failures: list[BaseException] = []

    def writer(path, start, t: int) -> None:
        try:
            start.wait()
            SqliteEventLog(path).append([parse_event(
                {"event_id": f"w{t}", "session_id": f"s{t}", "item_id": "SKU-10001",
                 "type": "impression", "query": "drill", "position": 1}, b"k")])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    for n in range(20):
        path = tmp_path / f"log{n}" / "events.db"
        start = threading.Barrier(16)
        threads = [threading.Thread(target=writer, args=(path, start, t)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, (n, failures[:3])
        assert SqliteEventLog(path).count() == 16
