"""Property tests: whatever text or JSON-shaped value a client sends as a query, an event or
filters, the answer is a normalised value or the typed error naming the problem, never
another exception (Hypothesis explores strings with surrogates, control and combining
characters, huge and non-finite numbers, nested structures)."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.errors import FilterError, QueryError
from serving.events import EventError, parse_event
from serving.retrieval import Filters
from serving.text import clean_text, normalise_query

KEY = b"property-key"
JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(10**500), max_value=10**500)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=300))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=12)
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.text(max_size=400) | JSON_SCALARS)
def test_a_query_is_normalised_or_refused_by_name(query):
    try:
        text = normalise_query(query, 256)
    except QueryError as exc:
        assert exc.field == "query" and str(exc)
        return
    assert text and text == text.strip() and text == text.casefold()
    assert "  " not in text
    text.encode("utf-8")  # storable: no lone surrogate survives
    assert normalise_query(text, 10_000) == text  # idempotent


@FAST
@given(st.text(max_size=400))
def test_catalogue_text_cleaning_never_fails_and_is_idempotent(value):
    cleaned = clean_text(value)
    assert clean_text(cleaned) == cleaned


EVENT_FIELDS = st.sampled_from(["event_id", "ts", "session_id", "user_id", "query", "item_id",
                                "type", "position", "timestamp", "event_type", "colour"])


@FAST
@given(st.dictionaries(EVENT_FIELDS, JSON_VALUES, max_size=9) | JSON_VALUES,
       st.booleans())
def test_an_event_is_parsed_or_refused_naming_the_field(raw, live):
    try:
        event = parse_event(raw, KEY, now=1_800_000_000.0, live=live)
    except EventError as exc:
        assert str(exc)
        return
    assert event.type in ("impression", "click", "add_to_cart", "purchase")
    assert math.isfinite(event.ts) and event.ts > 0
    assert event.user is None or event.user.startswith("u_")
    for text in (event.event_id, event.session_id, event.item_id, event.query or ""):
        text.encode("utf-8")


@FAST
@given(st.dictionaries(st.sampled_from(["category", "min_price", "max_price", "in_stock",
                                        "brand"]), JSON_VALUES, max_size=5) | JSON_VALUES)
def test_filters_are_parsed_or_refused_naming_the_field(raw):
    try:
        parsed = Filters.parse(raw)
    except FilterError as exc:
        assert exc.field and exc.field.startswith("filters") and str(exc)
        return
    if parsed is None:
        assert raw is None
        return
    for price in (parsed.min_price, parsed.max_price):
        assert price is None or (isinstance(price, float) and 0 <= price <= 1e12)


def test_rate_limiter_buckets_refill_and_stay_apart():
    from serving.api import RateLimiter

    limiter = RateLimiter(rate=2.0, burst=4.0)
    assert [limiter.allow("a", now=0.0) for _ in range(4)] == [0.0] * 4
    assert limiter.allow("a", now=0.0) == 0.5          # empty: one token in half a second
    assert limiter.allow("b", now=0.0) == 0.0          # another key has its own bucket
    assert limiter.allow("a", now=0.5) == 0.0          # refilled
    assert limiter.allow("a", now=0.5) > 0
    small = RateLimiter(rate=1.0, burst=1.0, max_keys=2)
    for key in ("x", "y", "z"):
        small.allow(key, now=0.0)
    assert len(small._buckets) == 2                     # bounded
