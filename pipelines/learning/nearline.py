"""The nearline updater: folds feedback events into the ranker within seconds.

It reads the durable event log from the offset its last checkpoint recorded, turns events into
labelled examples, takes one online step per example, and publishes checkpoints every N events
or T seconds. A checkpoint holds the parameters and the offset they include, written
atomically, so a kill at any instant loses nothing and applies nothing twice.

Labels follow a cascade reading of a result list: the clicked item is a positive (carts and
purchases weigh more); items shown *above* it that the shopper skipped are negatives; items
below it were perhaps never examined and teach nothing. Clicks alone would teach position bias.

Everything the updater keeps besides the parameters (session interest, recent impressions,
abuse windows, recent event ids) is a function of the events of the last few minutes, keyed
by event time. After a restart it replays that window without learning, so it resumes in
exactly the state it had.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.backends import open_event_log
from serving.checkpoint import load_latest, publish_checkpoint, read_latest
from serving.encoder import Encoder
from serving.eventlog import EventLog, LoggedEvent
from serving.events import POSITIVE_TYPES, Event
from serving.failpoints import failpoint
from serving.query import parse_steps
from serving.ranker import Ranker, query_key
from serving.recommender import release_encoder
from serving.release import Bundle, current_bundle_dir, load_bundle, read_pointer
from serving.retrieval import LexicalCache, QueryRelevance
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


@dataclass
class UpdaterStats:
    counters: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    ledger: str = ""        # sha256 chain over applied event ids: proof of exactly-once


class NearlineUpdater:
    """Consumes the event log and trains the ranker of the live release."""

    def __init__(self, settings: Settings, encoder: Encoder | None = None,
                 event_log: EventLog | None = None, restore: bool = True,
                 collect: bool = False) -> None:
        """``restore``: continue from the live checkpoint (else from an untrained ranker at
        offset 0); ``collect``: derive labelled examples into :attr:`sink` (with a
        :attr:`tally` of what was shown and chosen) instead of learning from them, and never
        publish by itself (the batch retrain)."""
        self.settings = settings
        self.home = settings.home
        self.log = event_log or open_event_log(settings)
        self.session_cfg = SessionConfig(ttl_s=settings.session_ttl_s)
        self.window_s = max(settings.session_ttl_s, IMPRESSION_TTL_S, settings.abuse_window_s) + SLACK_S
        self.bundle: Bundle = load_bundle(current_bundle_dir(settings.releases_dir))
        # the encoder the release was embedded with (a fine-tuned one is recorded by path)
        # PyTorch, whatever serving uses: the updater's arithmetic stays the same bit for bit
        # across restarts and in-process replays
        self.encoder = encoder or release_encoder(self.bundle, settings, backend="torch")
        self.row_of = {i: r for r, i in enumerate(self.bundle.items.item_ids.tolist())}
        self.stats = UpdaterStats()
        self.offset = 0
        self._lexical = LexicalCache()
        self.relevance = QueryRelevance(self.bundle, self.encoder,
                                        parse_steps(settings.query_steps), settings.candidates)
        self.sink: list[Example] | None = [] if collect else None
        self.tally: FeedbackTally | None = FeedbackTally() if collect else None
        self._published_seq = 0
        if restore:
            self.ranker = self._restore()
        else:
            self._reset_transient()
            self.ranker = Ranker.initial(self.bundle.release_id, self.bundle.manifest.encoder.dim,
                                         len(self.bundle.items))
        self._since_publish = 0
        self._last_publish = time.monotonic()

    # -- state ----------------------------------------------------------------------------

    def _reset_transient(self) -> None:
        self.sessions: OrderedDict[str, SessionState] = OrderedDict()
        self.shown: OrderedDict[tuple[str, str], list[_Shown]] = OrderedDict()
        self.rate: dict[str, deque[float]] = {}
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.recent: deque[tuple[int, float]] = deque()   # (offset, ts) inside the window
        self.max_ts = 0.0

    def _restore(self) -> Ranker:
        self._reset_transient()
        latest = load_latest(self.home)
        items = self.bundle.items
        if latest is None:
            ranker = Ranker.initial(self.bundle.release_id, self.bundle.manifest.encoder.dim,
                                    len(items))
            return ranker
        ref, ranker = latest
        self._published_seq = ref.seq
        meta = ranker.meta
        self.offset = meta.offset if meta.offset is not None else ref.offset
        self.stats = UpdaterStats(Counter(meta.counters), meta.applied, meta.ledger)
        warm_from = meta.warm_from if meta.warm_from is not None else self.offset
        if ranker.release_id != self.bundle.release_id:
            ranker = self._migrate(ranker, ref.release_id)
        if warm_from < self.offset:
            self.ranker = ranker
            replayed = 0
            after = warm_from
            while after < self.offset:
                batch = [e for e in self.log.read(after, 2000) if e.offset <= self.offset]
                if not batch:
                    break
                for logged in batch:
                    self._process(logged, learn=False)
                replayed += len(batch)
                after = batch[-1].offset
            log.info("resumed at offset %d (warm-up replayed %d events)", self.offset, replayed)
        return ranker

    def _migrate(self, ranker: Ranker, old_release: str) -> Ranker:
        old_dir = self.settings.releases_dir / old_release
        try:
            old_ids = load_bundle(old_dir, verify_files=False).items.item_ids
        except Exception as exc:  # noqa: BLE001 - the old release may be gone
            log.warning("cannot read release %s to carry item biases over (%s); "
                        "item biases restart at zero", old_release, exc)
            old_ids = np.array([], dtype=object)
            ranker.item_bias = np.zeros(0)
            ranker.accum["item_bias"] = np.zeros(0)
        log.info("carrying the ranker from release %s to %s", old_release,
                 self.bundle.release_id)
        return ranker.for_release(self.bundle.release_id, old_ids, self.bundle.items.item_ids)

    def follow_release(self) -> bool:
        """Switch to a newly published release, carrying the ranker over; True if switched."""
        pointer = read_pointer(self.settings.releases_dir)
        if pointer is None or pointer.release_id == self.bundle.release_id:
            return False
        old = self.bundle
        self.bundle = load_bundle(self.settings.releases_dir / pointer.release_id)
        self.row_of = {i: r for r, i in enumerate(self.bundle.items.item_ids.tolist())}
        self.relevance = QueryRelevance(self.bundle, self.encoder, self.relevance.steps,
                                        self.relevance.depth)
        self.ranker = self.ranker.for_release(self.bundle.release_id, old.items.item_ids,
                                              self.bundle.items.item_ids)
        self.publish()
        return True

    def follow_checkpoint(self) -> bool:
        """Continue from a checkpoint someone else published (the batch retrain): its state
        replaces ours and the events after its offset are applied again on top of it."""
        latest = read_latest(self.home)
        if latest is None or latest.seq == self._published_seq:
            return False
        log.info("continuing from externally published checkpoint %s (offset %d)",
                 latest.file, latest.offset)
        self.stats = UpdaterStats()
        self.offset = 0
        self.ranker = self._restore()
        self._since_publish = 0
        return True

    # -- events -> examples -> steps ------------------------------------------------------

    def _abusive(self, ev: Event) -> bool:
        """More positive events per window than a person makes, per session and per user."""
        limit, window = self.settings.abuse_max_clicks, self.settings.abuse_window_s
        flagged = False
        for key in (f"s:{ev.session_id}", f"u:{ev.user}" if ev.user else None):
            if key is None:
                continue
            times = self.rate.setdefault(key, deque())
            while times and times[0] < ev.ts - window:
                times.popleft()
            if len(times) >= limit:
                flagged = True
            times.append(ev.ts)
        if len(self.rate) > MAX_KEYS:
            for key in [k for k, v in self.rate.items() if not v or v[-1] < ev.ts - window]:
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

    def _process(self, logged: LoggedEvent, learn: bool) -> None:
        ev = logged.event
        counters = self.stats.counters if learn else Counter()
        if not self._remember(logged):
            counters["duplicates_dropped"] += 1
            return
        row = self.row_of.get(ev.item_id)
        if row is None:
            counters["unknown_item"] += 1
            return
        if ev.type == "impression":
            counters["impressions"] += 1
            if ev.query is not None and ev.position is not None:
                key = (ev.session_id, ev.query)
                shown = self.shown.setdefault(key, [])
                shown.append(_Shown(ev.position, ev.item_id, ev.ts))
                if learn and self.tally is not None and ev.position >= 1:
                    self.tally.impression(ev.query, ev.session_id, ev.item_id, ev.position)
                del shown[:-MAX_IMPRESSIONS_PER_LIST]
                self.shown.move_to_end(key)
                while len(self.shown) > MAX_KEYS:
                    self.shown.popitem(last=False)
            self._applied(ev, learn)
            return
        if ev.type not in POSITIVE_TYPES:
            return
        if self._abusive(ev):
            counters["abuse_dropped"] += 1
            return
        counters[ev.type] += 1
        if learn and self.tally is not None and ev.query is not None:
            self.tally.positive(ev.query, ev.item_id, EVENT_WEIGHTS[ev.type])
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
            if learn:
                self._learn(logged.offset, q, vectors[row], s_unit, row, 1.0,
                            EVENT_WEIGHTS[ev.type], _at(lex, row), qkey, ev.query)
                counters["positives"] += 1
            if ev.type == "click" and ev.query is not None and ev.position is not None:
                for shown in self.shown.get((ev.session_id, ev.query), []):
                    if shown.item_id == ev.item_id:
                        shown.used = True
                    elif (not shown.used and shown.position < ev.position
                          and shown.ts >= ev.ts - IMPRESSION_TTL_S):
                        shown.used = True
                        neg = self.row_of.get(shown.item_id)
                        if learn and neg is not None:
                            self._learn(logged.offset, q, vectors[neg], s_unit, neg, 0.0, 1.0,
                                        _at(lex, neg), qkey, ev.query)
                            counters["negatives"] += 1
        else:
            counters["no_context"] += 1
        state = session or SessionState()
        self.sessions[ev.session_id] = state.add(ev.item_id, EVENT_WEIGHTS[ev.type], ev.ts,
                                                 self.session_cfg)
        self.sessions.move_to_end(ev.session_id)
        while len(self.sessions) > MAX_KEYS:
            self.sessions.popitem(last=False)
        self._applied(ev, learn)

    def _learn(self, offset: int, q: np.ndarray, x: np.ndarray, s: np.ndarray | None, row: int,
               label: float, weight: float, lex: float, qkey: int | None,
               query: str | None) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.sink is not None:
            self.sink.append(Example(offset, q, x, s, row, label, weight, lex, qkey, query))
            return
        model = self.ranker.relevance
        rel = self.relevance(model, query, row) if model is not None and query else None
        self.ranker.step(q, x, s, row, label, weight, lex, qkey, rel)

    def _applied(self, ev: Event, learn: bool) -> None:
        if learn:
            self.stats.applied += 1
            self.stats.ledger = hashlib.sha256(
                (self.stats.ledger + ev.event_id).encode()).hexdigest()

    # -- loop -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the event log."""
        self.log.close()

    def replay_all(self) -> int:
        """Read the log to its end (learning, or collecting with ``collect``); returns the
        offset reached."""
        while self.poll():
            pass
        return self.offset

    def publish(self, ranker: Ranker | None = None) -> None:
        """Publish a checkpoint at the current offset: of the updater's own ranker, or of
        ``ranker`` (e.g. the batch retrain's), which the updater then continues from. The
        updater's warm-up metadata (counters, ledger, replay window) goes with it."""
        if ranker is not None:
            self.ranker = ranker
        warm_from = self.recent[0][0] - 1 if self.recent else self.offset
        meta = self.ranker.meta
        meta.applied, meta.ledger = self.stats.applied, self.stats.ledger
        meta.counters, meta.warm_from = dict(self.stats.counters), warm_from
        meta.published_at = time.time()
        ref = publish_checkpoint(self.home, self.ranker, self.offset)
        self._published_seq = ref.seq
        self._since_publish = 0
        self._last_publish = time.monotonic()

    def poll(self, limit: int = 2000) -> int:
        """Process the next batch of events; returns how many were read."""
        batch = self.log.read(self.offset, limit)
        for logged in batch:
            self._process(logged, learn=True)
            self.offset = logged.offset
            failpoint("nearline.applied")
            self._since_publish += 1
            # a collecting updater (sink set, for batch training) never publishes
            if self.sink is None and self._since_publish >= self.settings.checkpoint_every_events:
                self.publish()
        return len(batch)

    def run_once(self) -> dict[str, Any]:
        """Process everything pending, publish a checkpoint, return a summary."""
        start = time.monotonic()
        read = 0
        self.follow_release()
        while (n := self.poll()):
            read += n
        if self._since_publish or load_latest(self.home) is None:
            self.publish()
        seconds = time.monotonic() - start
        return self.summary(read, seconds)

    def run_forever(self, poll_s: float = 0.02, max_seconds: float | None = None) -> None:
        """Follow the log until stopped (or ``max_seconds``), publishing every N events or
        T seconds, and switching to new releases as they are published."""
        start = time.monotonic()
        next_release_check = 0.0
        while max_seconds is None or time.monotonic() - start < max_seconds:
            now = time.monotonic()
            if now >= next_release_check:
                self.follow_checkpoint()
                self.follow_release()
                next_release_check = now + 1.0
            n = self.poll()
            if self._since_publish and (time.monotonic() - self._last_publish
                                        >= self.settings.checkpoint_every_s):
                self.publish()
            if n == 0:
                time.sleep(poll_s)
        if self._since_publish:
            self.publish()

    def summary(self, read: int = 0, seconds: float = 0.0) -> dict[str, Any]:
        return {"release_id": self.bundle.release_id, "offset": self.offset, "read": read,
                "applied_total": self.stats.applied, "seconds": round(seconds, 3),
                "events_per_s": round(read / seconds, 1) if seconds > 0 else None,
                "counters": dict(self.stats.counters), "ledger": self.stats.ledger}


def run_nearline(settings: Settings, once: bool,
                 max_seconds: float | None = None) -> dict[str, Any]:
    updater = NearlineUpdater(settings)
    if once:
        return updater.run_once()
    updater.run_forever(max_seconds=max_seconds)
    return updater.summary()
