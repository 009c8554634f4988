"""Feedback events -> labelled examples, as the ranker learns from them.

:class:`FeedbackReplay` reads logged events in order and derives the labelled examples the
online ranker steps on, with no model of its own: duplicate event ids, unknown items, abusive
traffic (more positive events per window than a person makes, per session and per user) and
bot traffic (:mod:`pipelines.learning.abuse`: clicks on items never shown, purchases without a
click, made-up pages, replays, clockwork) are dropped and counted by reason; a click, cart or
purchase is a positive (weighted 1, 2, 3) with the query and the session's interest as they
were; items shown *above* a click that the shopper skipped are negatives; items below it were
perhaps never examined and teach nothing. Clicks alone would teach position bias.

Everything it keeps (session interest, recent impressions, abuse windows, the bot filter's
tables, recent event ids) is a function of the events of the last few minutes, keyed by event
time, so replaying that window rebuilds it exactly. The nearline updater steps on its examples
as they come; the batch retrain collects them all (:func:`replay_examples`).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace

import numpy as np

from pipelines.learning.abuse import HOLD, BotFilter, BotRules, lookback_s
from serving.encoder import Encoder
from serving.eventlog import EventLog, LoggedEvent
from serving.events import POSITIVE_TYPES, Event
from serving.forgotten import Forgotten
from serving.ranker import query_key
from serving.release import Bundle
from serving.retrieval import LexicalCache
from serving.session import (
    EVENT_WEIGHTS,
    SessionConfig,
    SessionState,
    blend_query,
    interest_vector,
    session_signal,
)
from serving.settings import Settings

log = logging.getLogger(__name__)

IMPRESSION_TTL_S = 1800.0
MAX_IMPRESSIONS_PER_LIST = 200
MAX_KEYS = 200_000
SLACK_S = 300.0


@dataclass
class _Shown:
    position: int
    item_id: str
    ts: float
    used: bool = False      # already taught as a skipped negative, or clicked


@dataclass(frozen=True)
class Example:
    """One labelled example: the event-log offset it came from and the ranker's inputs."""

    offset: int
    q: np.ndarray
    x: np.ndarray
    s: np.ndarray | None
    row: int
    label: float
    weight: float
    lex: float = 0.0      # relative BM25 score of the item for the query
    qkey: int | None = None  # key of the normalised query, for the (query, item) memory
    query: str | None = None  # the normalised query, for the relevance model's score


@dataclass(frozen=True)
class _Held:
    """A positive event the bot filter holds, with the examples it will teach if released."""

    type: str
    query: str | None
    item_id: str
    examples: list[Example]


def _at(rel: np.ndarray | None, row: int) -> float:
    return float(rel[row]) if rel is not None else 0.0


#: Position-based examination model for debiasing clicks: P(examined at rank p) = p ** -ETA.
PROPENSITY_ETA = 1.0


@dataclass
class FeedbackTally:
    """Per normalised query, what the updater saw: the result pages shown (session ids), each
    item's exposure (the summed examination propensities of the ranks it was shown at) and its
    weighted positives (click 1, cart 2, purchase 3). The batch retrain's position-debiased
    relevance estimates come from it (:func:`pipelines.learning.retrain.feedback_relevance`)."""

    pages: dict[str, set[str]] = field(default_factory=dict)
    exposure: dict[str, dict[str, float]] = field(default_factory=dict)
    value: dict[str, dict[str, float]] = field(default_factory=dict)

    def impression(self, query: str, session: str, item: str, position: int) -> None:
        self.pages.setdefault(query, set()).add(session)
        per = self.exposure.setdefault(query, {})
        per[item] = per.get(item, 0.0) + position ** -PROPENSITY_ETA

    def positive(self, query: str, item: str, weight: float) -> None:
        per = self.value.setdefault(query, {})
        per[item] = per.get(item, 0.0) + weight


class FeedbackReplay:
    """Derives labelled examples from logged events, in log order (see the module docstring).

    ``bundle`` and ``encoder``: the release the examples are for and its encoder (item rows,
    vectors, query vectors); ``settings``: session and abuse-filter settings."""

    def __init__(self, bundle: Bundle, encoder: Encoder, settings: Settings) -> None:
        self.bundle, self.encoder, self.settings = bundle, encoder, settings
        self.session_cfg = SessionConfig(ttl_s=settings.session_ttl_s)
        rules = BotRules.from_settings(settings)
        # what is kept depends on which events were dropped, and a bot decision on the events
        # of its own look-back: the window replayed after a restart covers both
        self.window_s = (max(settings.session_ttl_s, IMPRESSION_TTL_S, settings.abuse_window_s)
                         + lookback_s(rules) + SLACK_S)
        self.row_of = {i: r for r, i in enumerate(bundle.items.item_ids.tolist())}
        self._lexical = LexicalCache()
        self.sessions: OrderedDict[str, SessionState] = OrderedDict()
        self.shown: OrderedDict[tuple[str, str], list[_Shown]] = OrderedDict()
        self.rate: dict[str, deque[float]] = {}
        self.bots = BotFilter(rules)
        self.last_drop: str | None = None   # why the last event processed was dropped
        self.held: OrderedDict[str, _Held] = OrderedDict()   # event id -> held event
        # the held events the last event processed settled: (event id, None or drop reason)
        self.last_settled: list[tuple[str, str | None]] = []
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.recent: deque[tuple[int, float]] = deque()   # (offset, ts) inside the window
        self.max_ts = 0.0

    def use_bundle(self, bundle: Bundle) -> None:
        """Derive examples for another release from now on (item rows and vectors), keeping
        the window's state (sessions and impressions name items by id); the examples of held
        events move to the new release's rows (those of items it no longer lists go)."""
        old_ids = self.bundle.items.item_ids
        self.bundle = bundle
        self.row_of = {i: r for r, i in enumerate(bundle.items.item_ids.tolist())}
        for event_id, held in self.held.items():
            moved = []
            for ex in held.examples:
                row = self.row_of.get(str(old_ids[ex.row]))
                if row is not None:
                    lex = self._lexical.relative(bundle, ex.query) if ex.query else None
                    moved.append(replace(ex, row=row, lex=_at(lex, row), x=np.asarray(
                        bundle.vectors[row], np.float64)))
            self.held[event_id] = replace(held, examples=moved)

    def warm_from(self, offset: int) -> int:
        """Where a replay must start to rebuild this state at ``offset``: just before the
        oldest event still inside the window."""
        return self.recent[0][0] - 1 if self.recent else offset

    def forget(self, gone: Forgotten) -> int:
        """Drop what the window holds of forgotten sessions and users (``forget`` deleted
        their events from the log, so a warm-up replay would not rebuild it either): their
        session state, shown pages, rate windows, bot-filter state and held clicks. Returns
        how many entries went."""
        before = self._size()
        for sid in [s for s in self.sessions if gone.session(s)]:
            del self.sessions[sid]
        for key in [k for k in self.shown if gone.session(k[0])]:
            del self.shown[key]
        for key in [k for k in self.rate if gone.key_of(k)]:
            del self.rate[key]
        for event_id in self.bots.forget(gone):
            self.held.pop(event_id, None)
        return before - self._size()

    def _size(self) -> int:
        bots = self.bots
        return (len(self.sessions) + len(self.shown) + len(self.rate) + len(self.held)
                + len(bots.shown) + len(bots.sent) + len(bots.chosen) + len(bots.qualified)
                + len(bots.flags) + len(bots.intervals) + len(bots.depths) + len(bots.holding)
                + sum(len(p) for p in bots.pages.values()))

    def _abusive(self, ev: Event) -> bool:
        """More positive events per window than a person makes, per session and per user."""
        limit, window = self.settings.abuse_max_clicks, self.settings.abuse_window_s
        # the server's clock where there is one: a client cannot spread a burst out by
        # sending timestamps of its own choosing (imported history has only its own)
        clock = ev.received if ev.received is not None else ev.ts
        flagged = False
        for key in (f"s:{ev.session_id}", f"u:{ev.user}" if ev.user else None):
            if key is None:
                continue
            times = self.rate.setdefault(key, deque())
            while times and times[0] < clock - window:
                times.popleft()
            if len(times) >= limit:
                flagged = True
            times.append(clock)
        if len(self.rate) > MAX_KEYS:
            for key in [k for k, v in self.rate.items() if not v or v[-1] < clock - window]:
                del self.rate[key]
        return flagged

    def _remember(self, logged: LoggedEvent) -> bool:
        """Track the replay window; False if this event id was already processed."""
        ev = logged.event
        self.max_ts = max(self.max_ts, ev.ts)
        self.recent.append((logged.offset, ev.ts))
        horizon = self.max_ts - self.window_s
        while self.recent and self.recent[0][1] < horizon:
            self.recent.popleft()
        while self.seen and next(iter(self.seen.values())) < horizon:
            self.seen.popitem(last=False)
        if ev.event_id in self.seen:
            return False
        self.seen[ev.event_id] = ev.ts
        return True

    def process(self, logged: LoggedEvent, counters: Counter[str] | None = None,
                tally: FeedbackTally | None = None,
                derive: bool = True) -> tuple[list[Example], bool]:
        """Take the next logged event: update the window and return its examples (none
        unless ``derive``), and whether it counts as applied (an impression, or a positive
        event that was not dropped). ``counters`` and ``tally``, if given, count what was
        seen; ``derive=False`` only rebuilds state (a warm-up replay).

        A positive event the bot filter holds (a click on an item no one else was shown yet,
        on what may be a new ranking) counts as applied (and as ``bot_held``) but teaches
        only once an event settles it: its examples then come with that event's, and it is
        counted then by its type, or by the reason it was dropped."""
        counters = counters if counters is not None else Counter()
        examples, applied = self._process(logged, counters, tally, derive)
        if not applied and self.last_drop is not None:
            counters[self.last_drop] += 1
        self.last_settled = self.bots.settle(logged.event)
        for event_id, reason in self.last_settled:
            held = self.held.pop(event_id)
            if reason is not None:
                counters[reason] += 1
                continue
            counters[held.type] += 1
            if tally is not None and held.query is not None:
                tally.positive(held.query, held.item_id, EVENT_WEIGHTS[held.type])
            if derive:
                examples.extend(held.examples)
                for example in held.examples:
                    counters["positives" if example.label else "negatives"] += 1
        return examples, applied

    def _process(self, logged: LoggedEvent, counters: Counter[str], tally: FeedbackTally | None,
                 derive: bool) -> tuple[list[Example], bool]:
        ev = logged.event
        examples: list[Example] = []
        self.last_drop = None
        if not self._remember(logged):
            self.last_drop = "duplicates_dropped"
            return examples, False
        row = self.row_of.get(ev.item_id)
        if row is None:
            self.last_drop = "unknown_item"
            return examples, False
        if ev.type == "impression":
            if (reason := self.bots.impression(ev)) is not None:
                self.last_drop = reason
                return examples, False
            counters["impressions"] += 1
            if ev.query is not None and ev.position is not None:
                key = (ev.session_id, ev.query)
                shown = self.shown.setdefault(key, [])
                shown.append(_Shown(ev.position, ev.item_id, ev.ts))
                if tally is not None and ev.position >= 1:
                    tally.impression(ev.query, ev.session_id, ev.item_id, ev.position)
                del shown[:-MAX_IMPRESSIONS_PER_LIST]
                self.shown.move_to_end(key)
                while len(self.shown) > MAX_KEYS:
                    self.shown.popitem(last=False)
            return examples, True
        if ev.type not in POSITIVE_TYPES:
            return examples, False
        if self._abusive(ev):
            self.last_drop = "abuse_dropped"
            return examples, False
        verdict = self.bots.positive(ev)
        if verdict is not None and verdict != HOLD:
            self.last_drop = verdict
            return examples, False
        held = verdict == HOLD
        # a held event's examples are derived now, as they would be, and kept until it settles
        derive = derive or held
        if held:
            counters["bot_held"] += 1
        else:
            counters[ev.type] += 1
            if tally is not None and ev.query is not None:
                tally.positive(ev.query, ev.item_id, EVENT_WEIGHTS[ev.type])
        session = self.sessions.get(ev.session_id)
        interest = interest_vector(session, self.bundle.vectors, self.row_of, ev.ts,
                                   self.session_cfg)
        qvec = self.encoder.encode_query(ev.query) if ev.query else None
        if qvec is not None or interest is not None:
            vec, shifted = blend_query(qvec, interest, self.session_cfg)
            if shifted and session is not None:
                session = session.shifted(ev.ts, self.session_cfg)
                interest = interest_vector(session, self.bundle.vectors, self.row_of, ev.ts,
                                           self.session_cfg)
                vec, _ = blend_query(qvec, interest, self.session_cfg)
            q = vec.astype(np.float64)
            s_unit = session_signal(interest)
            vectors = self.bundle.vectors
            lex = self._lexical.relative(self.bundle, ev.query) if ev.query else None
            qkey = query_key(ev.query) if ev.query else None
            if derive:
                examples.append(Example(logged.offset, q, np.asarray(vectors[row], np.float64),
                                        s_unit, row, 1.0, EVENT_WEIGHTS[ev.type],
                                        _at(lex, row), qkey, ev.query))
                counters["positives"] += not held
            if ev.type == "click" and ev.query is not None and ev.position is not None:
                for shown in self.shown.get((ev.session_id, ev.query), []):
                    if shown.item_id == ev.item_id:
                        shown.used = True
                    elif (not shown.used and shown.position < ev.position
                          and shown.ts >= ev.ts - IMPRESSION_TTL_S):
                        shown.used = True
                        neg = self.row_of.get(shown.item_id)
                        if derive and neg is not None:
                            examples.append(Example(
                                logged.offset, q, np.asarray(vectors[neg], np.float64), s_unit,
                                neg, 0.0, 1.0, _at(lex, neg), qkey, ev.query))
                            counters["negatives"] += not held
        else:
            counters["no_context"] += 1
        state = session or SessionState()
        self.sessions[ev.session_id] = state.add(ev.item_id, EVENT_WEIGHTS[ev.type], ev.ts,
                                                 self.session_cfg)
        self.sessions.move_to_end(ev.session_id)
        while len(self.sessions) > MAX_KEYS:
            self.sessions.popitem(last=False)
        if held:
            self.held[ev.event_id] = _Held(ev.type, ev.query, ev.item_id, examples)
            return [], True
        return examples, True


def replay_examples(log: EventLog, bundle: Bundle, encoder: Encoder, settings: Settings,
                    after: int = 0) -> tuple[list[Example], int, Counter[str], FeedbackTally]:
    """Every labelled example in ``log`` after offset ``after``, derived for ``bundle`` as the
    nearline updater derives them. Returns the examples in the order the updater steps on
    them (log order, but a held event's come with the event that settles it), the last offset
    read, the counters (impressions, positives, negatives, drops by reason) and the tally of
    what was shown and chosen."""
    replay = FeedbackReplay(bundle, encoder, settings)
    examples: list[Example] = []
    counters: Counter[str] = Counter()
    tally = FeedbackTally()
    offset = after
    while batch := log.read(offset, 2000):
        for logged in batch:
            examples.extend(replay.process(logged, counters, tally)[0])
            offset = logged.offset
    return examples, offset, counters, tally
