from __future__ import annotations

import re

import pytest

from serving.errors import InvalidInputError
from serving.events import (
    Event,
    EventError,
    IdError,
    check_id,
    client_ts,
    parse_event,
    pseudonymise,
    same_payload,
)

KEY = b"test-key"
BASE = {"session_id": "s1", "item_id": "SKU-1", "type": "click"}


def test_valid_event_is_normalised_and_pseudonymous():
    ev = parse_event({**BASE, "user_id": "alice@example.com", "query": " Cordless  DRILL",
                      "position": 3, "ts": 1_700_000_000, "event_id": "e1"}, KEY)
    assert ev.query == "cordless drill" and ev.position == 3 and ev.ts == 1_700_000_000.0
    assert ev.user == pseudonymise("alice@example.com", KEY)
    assert "alice" not in repr(ev)
    assert ev.user != pseudonymise("alice@example.com", b"other-key")


def test_defaults_give_a_fresh_id_and_now():
    a, b = parse_event(BASE, KEY, now=1000.0), parse_event(BASE, KEY, now=1000.0)
    assert a.event_id != b.event_id and a.ts == 1000.0 and a.user is None


@pytest.mark.parametrize("patch, message", [
    ({"type": "like"}, "event type 'like' is not one of"),
    ({"session_id": None}, "'session_id' is missing"),
    ({"item_id": ""}, "'item_id' is missing"),
    ({"item_id": 3.5}, "'item_id' must be a string"),
    ({"position": 0}, "position must be an integer from 1"),
    ({"position": True}, "position must be an integer"),
    ({"ts": -1}, "timestamp must be positive"),
    ({"ts": 10_000.0}, "is in the future"),
    ({"query": "a\x00b"}, "event query: query contains control character"),
    ({"colour": "red"}, "unknown event field(s) ['colour']"),
    ({"session_id": "x" * 200}, "session_id must be a printable string of 1 to 128 characters"),
    # what JSON can decode to but no float or text can hold: typed errors, not crashes
    ({"ts": 10**400}, "is in the future"),
    ({"ts": float("nan")}, "timestamp must be positive"),
    ({"ts": float("inf")}, "timestamp must be positive"),
    ({"position": 10**5000}, "got an integer of 16610 bits"),
    ({"query": "drill\ud800"}, "lone surrogate U+D800"),
])
def test_invalid_events_name_the_problem(patch, message):
    with pytest.raises(EventError, match=re.escape(message)):
        parse_event({**BASE, **patch}, KEY, now=1000.0)


@pytest.mark.parametrize("patch, field", [
    ({"type": "like"}, "type"), ({"session_id": None}, "session_id"), ({"ts": -1}, "ts"),
    ({"position": 0}, "position"), ({"query": "\x00"}, "query"), ({"colour": 1}, "colour"),
])
def test_invalid_events_carry_the_field(patch, field):
    with pytest.raises(EventError) as caught:
        parse_event({**BASE, **patch}, KEY, now=1000.0)
    assert caught.value.field == field


def test_non_mapping_is_rejected():
    with pytest.raises(EventError, match="must be a mapping"):
        parse_event(["click"], KEY)


def test_live_events_carry_the_server_time_and_may_not_be_days_old():
    ev = parse_event({**BASE, "ts": 990.0}, KEY, now=1000.0, live=True)
    assert (ev.ts, ev.received) == (990.0, 1000.0)
    with pytest.raises(EventError, match="h before the server's clock") as caught:
        parse_event({**BASE, "ts": 1.0}, KEY, now=1_000_000.0, live=True)
    assert caught.value.field == "ts"
    # imported history keeps its own time and has no server time
    old = parse_event({**BASE, "ts": 1.0}, KEY, now=1_000_000.0)
    assert (old.ts, old.received) == (1.0, None)


@pytest.mark.parametrize("bad", ["x" * 129, "x" * 10_000_000, "s\n1", "s\x00", "tab\there",
                                 "\u202eevil", "s\ud800", 42.0, ["s"], {"id": "s"}])
def test_requests_and_events_refuse_the_same_ids_naming_the_field(bad):
    # one check (check_id) for a session id given to recommend() and one in an event
    with pytest.raises(IdError) as request:
        check_id(bad, "session_id")
    with pytest.raises(EventError) as event:
        parse_event({**BASE, "session_id": bad}, KEY, now=1000.0)
    assert request.value.field == event.value.field == "session_id"
    assert isinstance(request.value, InvalidInputError)
    for good in ("x" * 128, "s-42", "\u00e9t\u00e9-\U0001F600"):
        assert check_id(good, "session_id") == good
        assert parse_event({**BASE, "session_id": good}, KEY, now=1000.0).session_id == good


def test_an_event_query_is_stored_without_the_personal_data_typed_into_it():
    ev = parse_event({**BASE, "query": "Drill for Jane.Doe@example.com 555-867-5309"}, KEY,
                     now=1000.0)
    assert ev.query == "drill for [email] [phone]"
    assert parse_event({**BASE, "query": "DCD771C2 20V 2x4"}, KEY, now=1000.0).query == (
        "dcd771c2 20v 2x4")


def _live(**patch) -> Event:
    return parse_event({**BASE, "event_id": "e1", "query": "drill", "position": 2,
                        "user_id": "alice", **patch}, KEY, now=1000.0, live=True)


def test_a_retry_is_the_same_payload_and_another_payload_is_not():
    first = _live(ts=990.0)
    retry = parse_event({**BASE, "event_id": "e1", "query": "drill", "position": 2,
                         "user_id": "alice", "ts": 990.0}, KEY, now=1005.0, live=True)
    assert retry.received != first.received and same_payload(first, retry)  # server time differs
    for patch in ({"item_id": "SKU-2"}, {"type": "purchase"}, {"session_id": "s2"},
                  {"query": "hammer"}, {"position": 3}, {"user_id": "bob"}, {"ts": 991.0}):
        assert not same_payload(first, _live(**{"ts": 990.0, **patch})), patch
    # a ts the server filled in (no client ts) is not the client's: not compared
    assert client_ts(_live()) is None and client_ts(first) == 990.0
    later = parse_event({**BASE, "event_id": "e1", "query": "drill", "position": 2,
                         "user_id": "alice"}, KEY, now=2000.0, live=True)
    assert same_payload(_live(), later) and same_payload(first, later)
    # imported history cannot tell whose its ts is
    old = parse_event({**BASE, "ts": 5.0}, KEY, now=1000.0)
    assert client_ts(old) is None
    assert same_payload(old, parse_event({**BASE, "ts": 6.0}, KEY, now=1000.0))


def test_an_event_built_by_hand_is_scrubbed_too():
    ev = parse_event({**BASE, "query": "drill"}, KEY, now=1000.0)
    assert parse_event(ev, KEY) is ev
    by_hand = Event(**{**ev.to_dict(), "query": "gift card 4111 1111 1111 1111"})
    assert parse_event(by_hand, KEY).query == "gift card [card]"
