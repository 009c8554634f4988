"""Feedback events: schema, validation and pseudonymisation.

A user id never leaves this module in the clear: :func:`pseudonymise` turns it into a keyed
hash (HMAC-SHA256 with a deployment secret) before an event is built, stored or logged; nor
does personal data typed into a query: :func:`serving.privacy.scrub` replaces it first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from serving.errors import InvalidInputError, short_repr
from serving.privacy import scrub
from serving.schema import ITEM_ID
from serving.text import normalise_query

EventType = Literal["impression", "click", "add_to_cart", "purchase"]
EVENT_TYPES: tuple[str, ...] = ("impression", "click", "add_to_cart", "purchase")
POSITIVE_TYPES = frozenset({"click", "add_to_cart", "purchase"})
MAX_ID_CHARS = 128
MAX_POSITION = 10_000
# Events from further than this in the future are refused (clock skew allowance, seconds).
MAX_FUTURE_S = 300.0
# Live events (see parse_event's ``live``) older than this are refused: an app may buffer
# events for a while, but not for days (history goes in through `record --file`).
MAX_PAST_S = 86_400.0


class EventError(InvalidInputError):
    """An event is malformed; the message names the field."""


class EventConflictError(EventError):
    """An event id was already recorded with a different payload (see :func:`same_payload`);
    ``field`` names the ``event_id``."""


class IdError(InvalidInputError):
    """A session or user id is not a printable string of 1 to :data:`MAX_ID_CHARS`
    characters; ``field`` names it."""


@dataclass(frozen=True)
class Event:
    """One feedback event, as stored in the durable log.

    ``user`` is already pseudonymous (see :func:`pseudonymise`); ``query`` is normalised,
    with personal data replaced by placeholders (:func:`serving.privacy.scrub`); ``position``
    is the 1-based rank the item was shown at (None if not from a result list).
    """

    event_id: str
    ts: float                   # unix seconds
    session_id: str
    user: str | None            # keyed hash of the user id, never the raw id
    query: str | None
    item_id: str
    type: str
    position: int | None
    # When the server took it (unix seconds), for live traffic; None for imported history.
    # What rate limits count by: a client's own timestamps cannot spread a burst out.
    received: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pseudonymise(user_id: str, key: bytes) -> str:
    """Keyed hash of a raw user id: stable per deployment key, not reversible without it."""
    return "u_" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]


def client_ts(event: Event) -> float | None:
    """The timestamp the client itself gave, where that is known: a live event's ``ts``
    unless the server filled it in (then ``ts == received``). Imported history cannot tell
    (its ``ts`` may be the import's clock): None."""
    return event.ts if event.received is not None and event.ts != event.received else None


def same_payload(a: Event, b: Event) -> bool:
    """Whether ``b`` is a retry of ``a`` (same event id assumed): the same session, user,
    query, item, type and position, and the same timestamp where both came from the client
    (:func:`client_ts`). ``received`` is the server's clock and differs on every retry, so it
    is never compared; nor is a ``ts`` the server filled in."""
    if (a.session_id, a.user, a.query, a.item_id, a.type, a.position) != (
            b.session_id, b.user, b.query, b.item_id, b.type, b.position):
        return False
    ts_a, ts_b = client_ts(a), client_ts(b)
    return ts_a is None or ts_b is None or ts_a == ts_b


def check_id(value: object, name: str, error: type[InvalidInputError] = IdError) -> str:
    """``value`` as an id (a session, a user, an event, an item): a printable string of 1 to
    :data:`MAX_ID_CHARS` characters; else ``error`` naming ``name``. The one check for ids,
    in requests and in events alike."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or (
            not value.isprintable()):
        raise error(f"{name} must be a printable string of 1 to {MAX_ID_CHARS} characters",
                    name)
    return value


def _text_id(raw: Mapping[str, Any], name: str, required: bool = True) -> str | None:
    value = raw.get(name)
    if value is None or value == "":
        if required:
            raise EventError(f"event field '{name}' is missing", name)
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise EventError(f"event field '{name}' must be a string, got {type(value).__name__}",
                         name)
    return check_id(value, name, EventError)


FIELDS = frozenset({"event_id", "ts", "timestamp", "session_id", "user_id", "query", ITEM_ID,
                    "type", "event_type", "position"})


def parse_event(raw: Mapping[str, Any] | Event, user_key: bytes, max_query_chars: int = 256,
                now: float | None = None, live: bool = False) -> Event:
    """Validate a raw event mapping and return an :class:`Event`.

    Accepts ``user_id`` (raw, pseudonymised here), ``type`` or ``event_type``, ``ts`` or
    ``timestamp`` (unix seconds; default now), and ``event_id`` (default a new UUID: give your
    own so that re-sending is a no-op). Raises :class:`EventError` naming the field.

    ``live``: the event arrives from a shop now (the serving API), not from imported history:
    it is stamped with the server's time (``received``), and a ``ts`` more than
    :data:`MAX_PAST_S` before it is refused.
    """
    if isinstance(raw, Event):
        # already parsed; its query scrubbed again all the same (idempotent), so that an Event
        # built by hand cannot carry personal data into the log
        query = scrub(raw.query) if raw.query is not None else None
        return raw if query == raw.query else dataclasses.replace(raw, query=query)
    if not isinstance(raw, Mapping):
        raise EventError(f"event must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise EventError(f"unknown event field(s) {[str(u)[:40] for u in unknown[:5]]}",
                         str(unknown[0])[:MAX_ID_CHARS])
    etype = raw.get("type", raw.get("event_type"))
    if etype not in EVENT_TYPES:
        raise EventError(f"event type {short_repr(etype)} is not one of {list(EVENT_TYPES)}",
                         "type")
    now = time.time() if now is None else now
    ts = raw.get("ts", raw.get("timestamp", now))
    # compared, never converted: NaN fails both bounds, and an integer too large for a float
    # (10**400) compares without OverflowError
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 < ts < math.inf:
        raise EventError(f"event timestamp must be positive unix seconds, got {short_repr(ts)}",
                         "ts")
    if ts > now + MAX_FUTURE_S:
        raise EventError(f"event timestamp {short_repr(ts)} is in the future", "ts")
    if live and ts < now - MAX_PAST_S:
        raise EventError(f"event timestamp {short_repr(ts)} is {(now - ts) / 3600:.0f} h before "
                         f"the server's clock; live events may be at most "
                         f"{MAX_PAST_S / 3600:.0f} h old (import history with `record --file`)",
                         "ts")
    position = raw.get("position")
    if position is not None and (isinstance(position, bool) or not isinstance(position, int)
                                 or not 1 <= position <= MAX_POSITION):
        raise EventError(f"event position must be an integer from 1 to {MAX_POSITION}, "
                         f"got {short_repr(position)}", "position")
    query = raw.get("query")
    if query is not None:
        try:
            query = normalise_query(query, max_query_chars)
        except InvalidInputError as exc:
            raise EventError(f"event query: {exc}", "query") from exc
        query = scrub(query)  # before it is stored: e-mail addresses, phone numbers, cards...
    user_id = _text_id(raw, "user_id", required=False)
    return Event(
        event_id=_text_id(raw, "event_id", required=False) or uuid.uuid4().hex,
        ts=float(ts),
        session_id=_text_id(raw, "session_id"),
        user=pseudonymise(user_id, user_key) if user_id else None,
        query=query,
        item_id=_text_id(raw, ITEM_ID),
        type=etype,
        position=position,
        received=now if live else None,
    )
