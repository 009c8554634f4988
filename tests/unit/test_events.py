from __future__ import annotations

import re

import pytest

from serving.events import EventError, parse_event, pseudonymise

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
    ({"session_id": "x" * 200}, "at most 128 chars"),
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
