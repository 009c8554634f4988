"""Bot and fake-click filtering: feedback no person sent is dropped before it teaches the ranker.

The events endpoint takes whatever a client posts, and one accepted click on a low-ranked item
moves it several places for everyone (it becomes a positive, and the items shown above it
skipped negatives). :class:`BotFilter` judges each event by what the log says happened in the
session, the user's other sessions and the query's other sessions; the rate limit per session
and user (:class:`pipelines.learning.replay.FeedbackReplay`, ``abuse_dropped``) runs first. A
positive event (click, add-to-cart, purchase) is dropped, and counted by reason, when:

* ``bot_no_impression``: it is a click or an add-to-cart on an item the session was not shown
  for that query (for any query, when the event names none) in the last ``bot_window_s``; an
  add-to-cart of an item the session clicked counts as shown;
* ``bot_no_click``: it is a purchase of an item that neither the session nor the user clicked
  or put in the cart, having been shown it, in the last ``bot_window_s``;
* ``bot_position``: it is a click at a position the item was never shown at, to that session
  for that query;
* ``bot_depth``: it is a click at a position that fewer than ``bot_depth_min_share`` of the
  last :data:`DEPTH_SAMPLE` sessions were shown and clicked above: deeper than the shop's pages
  go, on pages the client made up;
* ``bot_page``: it is on a page the session was shown before its first positive, and of the
  query's last :data:`PAGE_SAMPLE` other such pages, as deep, fewer than
  ``bot_page_min_passed`` showed it to a session that chose something else (too), and fewer
  than :data:`PAGE_UNANIMOUS` showed it at all. A new session's page is not personalised, so
  the shop served every new session the same page, and some of those shown an item it served
  choose something else (too); an item on nobody else's page, or only on the pages of sessions
  that all go for it alone, was put there by the client. But a page that also differs from the latest pages in
  another item may be the first of a new ranking (the ranker changes every second), whose
  first viewers click items no one else was shown yet: such a click is *held* (:data:`HOLD`),
  with the session's later events on the item, until another new session is shown the item
  and chooses something else (too), or :data:`PAGE_UNANIMOUS` of the pages show it (then it teaches,
  late), or for :data:`HOLD_S` (then it is dropped as ``bot_page``);
* ``bot_repeat``: the session already sent the same event (type, query, item) in the last
  ``bot_window_s``: a recorded session played back under its own id, or a double click; one
  vote a session, and no flag (people double-click);
* ``bot_regular``: the last ``bot_regular_events`` positives of a session, of a user, or the
  clicks on one (query, item) by anyone, come at intervals (each at least
  :data:`MIN_REGULAR_GAP_S`) whose coefficient of variation is below ``bot_regular_cv``:
  clockwork, not people;
* ``bot_flagged``: its session or user was caught by a rule above (but ``bot_repeat``) in the
  last ``bot_window_s`` (its impressions are dropped too).

The nearline updater rebuilds its state after a restart by replaying a window of the log, so
every rule reads only the events themselves (all of them, dropped or not), never an earlier
decision: a rule looks back ``bot_window_s``, a flag lasts ``bot_window_s``, a hold
:data:`HOLD_S`, and so a decision depends on the last :func:`lookback_s` seconds of events and
nothing older. Times are the server's receive times where there are any, as the rate limit's.

What the log cannot show is which page the server actually served. A script that posts, before
its clicks, made-up pages on which it clicks something else makes its item look served; a page
shown after the session clicked something real is personalised and exempt from ``bot_page``; a
query with fewer than :data:`PAGE_MIN_SESSIONS` new sessions in the window has no evidence; a
first shopper who clicks an item that has just entered a query's first page, on a page that
differs from the latest ones in that item only, is dropped; and a held click teaches minutes
late. Closing those needs a served-page token on every event (a signed request id), which is
the serving API's business.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from serving.events import Event
from serving.forgotten import Forgotten
from serving.settings import Settings

REASONS = ("bot_flagged", "bot_no_impression", "bot_no_click", "bot_position", "bot_depth",
           "bot_page", "bot_repeat", "bot_regular")
HOLD = "held"               # not yet: see ``bot_page``; :meth:`BotFilter.settle` says later
HOLD_S = 300.0              # how long a held click waits for another shopper
PAGE_SAMPLE = 50            # a query's recent new sessions whose pages are compared
PAGE_MIN_SESSIONS = 10      # fewer comparable sessions than this: no evidence either way
PAGE_UNANIMOUS = 0.98       # an item on this share of pages may be all its viewers chose
PAGE_RECENT = 5             # the latest pages that tell a new ranking from a planted item
DEPTH_SAMPLE = 200          # recent sessions (any query) whose depth is compared
DEPTH_MIN_SESSIONS = 50
MIN_REGULAR_GAP_S = 2.0     # faster is the rate limit's business (and batched uploads')
MAX_POSITIONS = 4           # positions remembered per item and session page
MAX_KEYS = 200_000          # bound on each table (least recently used go first)


@dataclass(frozen=True)
class BotRules:
    """The filter's parameters (see the module docstring); ``enabled=False`` passes all."""

    enabled: bool = True
    window_s: float = 900.0
    page_min_passed: int = 1
    depth_min_share: float = 0.01
    regular_events: int = 8
    regular_cv: float = 0.05

    @classmethod
    def from_settings(cls, settings: Settings) -> BotRules:
        return cls(settings.bot_filter, settings.bot_window_s, settings.bot_page_min_passed,
                   settings.bot_depth_min_share, settings.bot_regular_events,
                   settings.bot_regular_cv)


def lookback_s(rules: BotRules) -> float:
    """How far back in event time a decision of the filter depends on events: a flag set up
    to a window ago, by a rule looking a window further back, or a hold (0 when disabled)."""
    return 2.0 * rules.window_s + HOLD_S if rules.enabled else 0.0


@dataclass
class _Page:
    """What one session was shown (for one query, or for any in the depth sample)."""

    clock: float
    depth: int = 0
    clicked_depth: int = 0              # deepest position it clicked at
    items: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Held:
    """A held event: a click on an item for a query, or what its session did next with it."""

    event_id: str
    session_id: str
    clock: float
    position: int


def _clock(ev: Event) -> float:
    # the server's clock where there is one: a client cannot spread its events out by sending
    # timestamps of its own choosing (imported history has only its own)
    return ev.received if ev.received is not None else ev.ts


def _bounded(table: OrderedDict, key: object) -> None:
    table.move_to_end(key)
    while len(table) > MAX_KEYS:
        table.popitem(last=False)


class BotFilter:
    """Judges feedback events in log order; :meth:`impression` and :meth:`positive` return the
    reason to drop the event (one of :data:`REASONS`) or None to keep it."""

    def __init__(self, rules: BotRules) -> None:
        self.rules = rules
        # (session, query or None for any) -> item -> [(position, event time)] shown
        self.shown: OrderedDict[tuple[str, str | None], dict[str, list[tuple[int | None, float]]]]
        self.shown = OrderedDict()
        # "s:<session>" / "u:<user>" -> item -> clock of its last positive; ``qualified``: of
        # its last click or cart of an item it had been shown
        self.chosen: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.qualified: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.flags: OrderedDict[str, float] = OrderedDict()   # key -> clock last caught
        self.pages: dict[str, OrderedDict[str, _Page]] = {}   # query -> new session -> page
        self.depths: OrderedDict[str, _Page] = OrderedDict()  # session -> depths
        self.sent: OrderedDict[tuple, float] = OrderedDict()   # (session, type, query, item)
        self.intervals: OrderedDict[tuple, deque[float]] = OrderedDict()
        # (query, item) -> its held events, in log order; (session, item) -> (query, item)
        self.holds: OrderedDict[tuple[str, str], list[_Held]] = OrderedDict()
        self.holding: dict[tuple[str, str], tuple[str, str]] = {}

    # -- state ------------------------------------------------------------------------------

    def _keys(self, ev: Event) -> list[str]:
        return [f"s:{ev.session_id}"] + ([f"u:{ev.user}"] if ev.user else [])

    def _recent(self, table: OrderedDict[str, dict[str, float]], key: str, item: str | None,
                clock: float) -> bool:
        """Whether ``table`` holds, for ``key``, ``item`` (or anything) within the window."""
        seen = table.get(key)
        if not seen:
            return False
        since = clock - self.rules.window_s
        if item is None:
            return any(t >= since for t in seen.values())
        t = seen.get(item)
        return t is not None and t >= since

    def _flagged(self, ev: Event, clock: float) -> bool:
        return any((t := self.flags.get(k)) is not None and t >= clock - self.rules.window_s
                   for k in self._keys(ev))

    def _shown_at(self, ev: Event) -> list[tuple[int | None, float]]:
        """The (position, time) of the impressions of the event's item in its session for its
        query (any query if it names none), within the window."""
        shown = self.shown.get((ev.session_id, ev.query), {}).get(ev.item_id, [])
        return [(p, t) for p, t in shown if t >= ev.ts - self.rules.window_s]

    def forget(self, gone: Forgotten) -> set[str]:
        """Drop everything held of forgotten sessions and users; returns the ids of the held
        clicks that went with them (never to teach)."""
        for table in (self.shown, self.sent):
            for key in [k for k in table if gone.session(k[0])]:
                del table[key]
        for table in (self.chosen, self.qualified, self.flags, self.intervals):
            for key in [k for k in table if gone.key_of(k)]:
                del table[key]
        for pages in self.pages.values():
            for sid in [s for s in pages if gone.session(s)]:
                del pages[sid]
        for sid in [s for s in self.depths if gone.session(s)]:
            del self.depths[sid]
        dropped: set[str] = set()
        for key in list(self.holds):
            held = self.holds[key]
            dropped |= {h.event_id for h in held if gone.session(h.session_id)}
            held[:] = [h for h in held if not gone.session(h.session_id)]
            if not held:
                del self.holds[key]
        self.holding = {k: v for k, v in self.holding.items() if not gone.session(k[0])}
        return dropped

    # -- events -----------------------------------------------------------------------------

    def impression(self, ev: Event) -> str | None:
        """Take an impression: remembered as shown; dropped (``bot_flagged``) if its session or
        user was caught."""
        if not self.rules.enabled:
            return None
        clock = _clock(ev)
        self._observe_impression(ev, clock)
        return "bot_flagged" if self._flagged(ev, clock) else None

    def positive(self, ev: Event) -> str | None:
        """Take a click, add-to-cart or purchase: the reason to drop it, :data:`HOLD` to wait
        (:meth:`settle` decides later), or None."""
        if not self.rules.enabled:
            return None
        clock = _clock(ev)
        shown = self._shown_at(ev)
        key = self.holding.get((ev.session_id, ev.item_id))
        if key is not None:
            reason: str | None = HOLD      # what a held session does next with the item waits
        else:
            reason = self._judge(ev, clock, shown)
            if reason == HOLD:
                assert ev.query is not None
                key = (ev.query, ev.item_id)
                self.holding[(ev.session_id, ev.item_id)] = key
        self._observe_positive(ev, clock, shown)
        if reason == HOLD:
            assert key is not None
            position = ev.position or max((p for p, _ in shown if p is not None), default=0)
            self.holds.setdefault(key, []).append(
                _Held(ev.event_id, ev.session_id, clock, position))
            return HOLD
        if reason is not None and reason != "bot_repeat":
            for key in self._keys(ev):
                self.flags[key] = clock
                _bounded(self.flags, key)
        if reason is None and self._flagged(ev, clock):
            return "bot_flagged"
        return reason

    def _observe_impression(self, ev: Event, clock: float) -> None:
        for query in (ev.query, None) if ev.query is not None else (None,):
            key = (ev.session_id, query)
            positions = self.shown.setdefault(key, {}).setdefault(ev.item_id, [])
            positions.append((ev.position, ev.ts))
            del positions[:-MAX_POSITIONS]
            _bounded(self.shown, key)
        position = ev.position or 0
        since = clock - self.rules.window_s
        if position:
            depth = self.depths.get(ev.session_id)
            if depth is None or depth.clock < since:
                depth = self.depths[ev.session_id] = _Page(clock)
                _bounded(self.depths, ev.session_id)
            depth.depth = max(depth.depth, position)
        if ev.query is not None and not self._recent(self.chosen, f"s:{ev.session_id}", None,
                                                     clock):
            # a new session's page: not personalised, what the shop serves everyone now
            pages = self.pages.setdefault(ev.query, OrderedDict())
            page = pages.get(ev.session_id)
            if page is None or page.clock < since:
                pages.pop(ev.session_id, None)
                page = pages[ev.session_id] = _Page(clock)
                while len(pages) > 4 * PAGE_SAMPLE:
                    pages.popitem(last=False)
            page.items.add(ev.item_id)
            page.depth = max(page.depth, position)

    def _observe_positive(self, ev: Event, clock: float,
                          shown: list[tuple[int | None, float]]) -> None:
        """Remember a positive event, whatever becomes of it: the rules read events, never
        decisions (see the module docstring)."""
        qualifies = ev.type != "purchase" and bool(
            shown or self._recent(self.qualified, f"s:{ev.session_id}", ev.item_id, clock))
        for key in self._keys(ev):
            self.chosen.setdefault(key, {})[ev.item_id] = clock
            _bounded(self.chosen, key)
            if qualifies:
                self.qualified.setdefault(key, {})[ev.item_id] = clock
                _bounded(self.qualified, key)
        depth = self.depths.get(ev.session_id)
        if depth is not None and ev.type == "click" and ev.position is not None:
            depth.clicked_depth = max(depth.clicked_depth, ev.position)
        for key in self._interval_keys(ev):
            times = self.intervals.setdefault(key, deque())
            times.append(clock)
            while len(times) > self.rules.regular_events:
                times.popleft()
            _bounded(self.intervals, key)
        sent = (ev.session_id, ev.type, ev.query, ev.item_id)
        self.sent[sent] = clock
        _bounded(self.sent, sent)

    # -- rules ------------------------------------------------------------------------------

    def _judge(self, ev: Event, clock: float,
               shown: list[tuple[int | None, float]]) -> str | None:
        session = f"s:{ev.session_id}"
        sent = self.sent.get((ev.session_id, ev.type, ev.query, ev.item_id))
        if sent is not None and sent >= clock - self.rules.window_s:
            return "bot_repeat"
        if ev.type == "purchase":
            if not any(self._recent(self.qualified, k, ev.item_id, clock)
                       for k in self._keys(ev)):
                return "bot_no_click"
            return self._regular(ev, clock)
        if not shown:
            if ev.type == "click" or not self._recent(self.qualified, session, ev.item_id,
                                                      clock):
                return "bot_no_impression"
            return self._regular(ev, clock)
        if ev.type == "click" and ev.position is not None and all(
                p is not None and p != ev.position for p, _ in shown):
            return "bot_position"
        # where the item was, if the event does not say: leaving it out changes nothing
        position = ev.position if ev.position is not None else max(
            (p for p, _ in shown if p is not None), default=None)
        if position is not None and position > 1 and self._too_deep(ev.session_id, position,
                                                                    clock):
            return "bot_depth"
        if ev.query is not None and (page := self._made_up(ev, position or 0, clock)):
            return page
        return self._regular(ev, clock)

    def _too_deep(self, session_id: str, position: int, clock: float) -> bool:
        # sessions shown this deep that clicked, higher up: a script's deep pages all end in its
        # click (or are waiting for it), so however many it sends they never count
        since = clock - self.rules.window_s
        n = deep = 0
        for session, page in reversed(self.depths.items()):
            if n >= DEPTH_SAMPLE:
                break
            if page.clock < since - self.rules.window_s:
                break       # older still (the order is by first impression, roughly by time)
            if session == session_id or page.clock < since:
                continue
            n += 1
            deep += page.depth >= position > page.clicked_depth > 0
        return n >= DEPTH_MIN_SESSIONS and deep < self.rules.depth_min_share * n

    def _made_up(self, ev: Event, position: int, clock: float) -> str | None:
        """``bot_page``, :data:`HOLD` or None (see the module docstring)."""
        assert ev.query is not None
        pages = self.pages.get(ev.query, {})
        own = pages.get(ev.session_id)
        if own is None or own.clock < clock - self.rules.window_s or ev.item_id not in own.items:
            return None     # a personalised page (shown after a choice): anything may be on it
        served, n, recent = self._served(ev.query, ev.item_id, position, clock, ev.session_id)
        if served or n < PAGE_MIN_SESSIONS:
            return None
        # a page that differs from the latest ones in another item too may be a new ranking
        new = any(2 * sum(item in page.items for page in recent) < len(recent)
                  for item in own.items if item != ev.item_id)
        return HOLD if new else "bot_page"

    def _served(self, query: str, item: str, position: int, clock: float,
                exclude: str | None = None) -> tuple[bool, int, list[_Page]]:
        """Whether the query's last :data:`PAGE_SAMPLE` new sessions' pages (but session
        ``exclude``'s) as deep as ``position`` show that the shop served ``item``: one shown it
        chose something else, or nearly all show it. Also how many pages were compared, and
        the latest :data:`PAGE_RECENT` of them."""
        since = clock - self.rules.window_s
        n = shown = passed = 0
        recent: list[_Page] = []
        for session, page in reversed(self.pages.get(query, {}).items()):
            if n >= PAGE_SAMPLE:
                break
            if session == exclude or page.clock < since or page.depth < position:
                continue
            n += 1
            if len(recent) < PAGE_RECENT:
                recent.append(page)
            if item in page.items:
                shown += 1
                # it chose something else (too): a shopper choosing from what the shop served
                passed += any(t >= since for other, t in self.chosen.get(f"s:{session}",
                                                                          {}).items()
                              if other != item)
        served = passed >= self.rules.page_min_passed or (
            n >= PAGE_MIN_SESSIONS and shown >= PAGE_UNANIMOUS * n)
        return served, n, recent

    def settle(self, ev: Event) -> list[tuple[str, str | None]]:
        """After each event: the held events it settles, each with None (it may teach now) or
        ``bot_page`` (held for :data:`HOLD_S` and no one else was shown its item). Each held
        event is settled by events of its own hold time on only, so that a replay of the
        window settles it alike."""
        if not self.holds:
            return []
        clock = _clock(ev)
        out: list[tuple[str, str | None]] = []
        for key in list(self.holds):
            held = self.holds[key]
            while held and held[0].clock < clock - HOLD_S:
                out.append((held.pop(0).event_id, "bot_page"))
            if held and ev.query == key[0] and self._served(
                    key[0], key[1], min(h.position for h in held), clock)[0]:
                out += [(h.event_id, None) for h in held]
                held.clear()
            if not held:
                del self.holds[key]
        if out:
            pending = {(h.session_id, key) for key, held in self.holds.items() for h in held}
            self.holding = {k: v for k, v in self.holding.items() if (k[0], v) in pending}
        return out

    def _interval_keys(self, ev: Event) -> list[tuple]:
        keys: list[tuple] = [("s", ev.session_id)]
        if ev.user:
            keys.append(("u", ev.user))
        if ev.type == "click" and ev.query is not None:
            keys.append(("q", ev.query, ev.item_id))
        return keys

    def _regular(self, ev: Event, clock: float) -> str | None:
        n, since = self.rules.regular_events, clock - self.rules.window_s
        for key in self._interval_keys(ev):
            times = [t for t in self.intervals.get(key, ()) if t >= since][-(n - 1):] + [clock]
            if len(times) < n:
                continue
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            if min(gaps) >= MIN_REGULAR_GAP_S and (
                    statistics.pstdev(gaps) < self.rules.regular_cv * statistics.fmean(gaps)):
                return "bot_regular"
        return None
