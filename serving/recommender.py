"""What shop applications import: load the live release and answer requests.

The facade: :class:`Recommender` (requests, feedback, hot reload) and its results. Candidates,
filters and relevance features come from :mod:`serving.retrieval`, the one retrieval path.

The live state (bundle + encoder) is one immutable object; a reload builds the next one aside
and swaps the reference, so requests running on the old state finish undisturbed and a
release that fails to load never replaces a working one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np

from serving.cache import LRUCache
from serving.checkpoint import (
    CheckpointRef,
    CheckpointSync,
    load_usable,
    open_checkpoint_sync,
    read_latest,
)
from serving.encoder import Encoder
from serving.errors import InvalidInputError, QueryError, ReleaseError, short_repr
from serving.eventlog import AppendResult, EventLog
from serving.events import (
    Event,
    EventConflictError,
    EventError,
    check_id,
    parse_event,
    same_payload,
)
from serving.forgotten import ForgottenFeed, append_forgotten
from serving.layout import encoders_dir, rankers_dir
from serving.manifest import Manifest
from serving.privacy import scrub
from serving.query import DEFAULT_STEPS, Step, Vocabulary, parse_steps
from serving.ranker import Ranker, query_key, sigmoid
from serving.release import (
    Bundle,
    Pointer,
    changed_files,
    current_bundle_dir,
    load_bundle,
    read_pointer,
)
from serving.release_sync import ReleaseSync, open_release_sync
from serving.relevance import MatchFeatures
from serving.retrieval import (
    NO_TIMER,
    Filters,
    LexicalCache,
    NoTimer,
    StageTimer,
    release_vocabulary,
    relevance_features,
    retrieve_candidates,
    understood,
)
from serving.schema import ITEM_ID
from serving.session import (
    EVENT_WEIGHTS,
    SessionConfig,
    SessionState,
    SessionStore,
    blend_query,
    current_weight,
    interest_vector,
    session_signal,
)
from serving.settings import Settings
from serving.text import normalise_query

log = logging.getLogger(__name__)

MAX_K = 1000
# a release that failed to load (corrupt, incomplete) is tried again after this long, or as
# soon as the pointer moves: not checksummed again on every poll
RETRY_REFUSED_S = 30.0
# how long load() waits for another process of the home downloading the same release
SYNC_WAIT_S = 600.0


@dataclass(frozen=True)
class Recommendation:
    """One result: the item, its final score, and the signals the score was made of."""

    item_id: str
    title: str
    score: float
    rank: int
    category: str | None
    brand: str | None
    price: float | None
    in_stock: bool
    signals: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            ITEM_ID: self.item_id, "title": self.title, "score": self.score, "rank": self.rank,
            "category": self.category, "brand": self.brand, "price": self.price,
            "in_stock": self.in_stock, "signals": dict(self.signals),
        }


@dataclass(frozen=True)
class _State:
    bundle: Bundle
    encoder: Encoder
    generation: int
    ranker: Ranker
    ranker_seq: int            # 0 = the untrained starting point
    row_of: dict[str, int]     # item id -> row in the bundle
    vocabulary: Vocabulary | None = None   # the catalogue's words, for spelling and compounds
    match: MatchFeatures | None = None     # title match evidence, for the relevance model


def _make_state(bundle: Bundle, encoder: Encoder, generation: int, home: Path | None,
                steps: tuple[Step, ...] = DEFAULT_STEPS, warm: bool = True) -> _State:
    """The state for ``bundle``, with the newest ranker checkpoint trained for this release
    (a checkpoint for another release is never applied to this index) and, when ``steps``
    need it, the catalogue vocabulary for spelling and compounds (built once per release;
    with ``warm`` before the state is used, otherwise by the first query that needs it)."""
    ranker, seq = None, 0
    if home is not None:
        ref, ranker, problems = load_usable(home, bundle.release_id)
        if problems:  # serve on: an older checkpoint, or the untrained ranker
            log.error("ranker checkpoint unusable (%s); serving %s", "; ".join(problems),
                      f"the older checkpoint {ref.file}" if ref is not None
                      else "the untrained ranker")
        if ref is not None:
            seq = ref.seq
    if ranker is None:
        ranker = Ranker.initial(bundle.release_id, bundle.manifest.encoder.dim, len(bundle.items))
    if len(ranker.item_bias) != len(bundle.items):
        raise ReleaseError(f"ranker checkpoint for {bundle.release_id} has {len(ranker.item_bias)} "
                           f"item biases, the release has {len(bundle.items)} items")
    row_of = {item: i for i, item in enumerate(bundle.items.item_ids.tolist())}
    vocabulary = release_vocabulary(bundle, steps, warm)
    match = MatchFeatures(bundle.items.titles)
    if warm and ranker.relevance is not None:  # only the relevance model reads title matches
        match.warm()
    return _State(bundle, encoder, generation, ranker, seq, row_of, vocabulary, match)


class Recommender:
    """Answers ``recommend(query, k, filters)`` from the live release; thread-safe.

    Use :meth:`load` for a home directory with a release pointer (hot reload on), or
    :meth:`from_bundle` for one fixed bundle directory (e.g. inside a registered model).
    """

    def __init__(self, state: _State, settings: Settings, releases_dir: Path | None,
                 event_log: EventLog | None = None, sessions: SessionStore | None = None,
                 release_sync: ReleaseSync | None = None,
                 checkpoint_sync: CheckpointSync | None = None) -> None:
        from serving.backends import open_session_store

        self._state = state
        self._settings = settings
        self._releases_dir = releases_dir
        self._home = releases_dir.parent if releases_dir is not None else None
        self._event_log = event_log
        self._sessions = sessions or open_session_store(settings)
        self._session_cfg = SessionConfig(ttl_s=settings.session_ttl_s)
        self._steps = parse_steps(settings.query_steps)
        self._user_key: bytes | None = None
        self._lexical = LexicalCache()
        self._candidates: LRUCache[tuple[int, ...]] = LRUCache(1024)
        self._relevance: LRUCache[np.ndarray] = LRUCache(1024)
        self._reload_lock = threading.Lock()
        self._log_lock = threading.Lock()  # the event log is opened once, by the first writer
        self._sync = release_sync  # None: the home's own releases are served
        self._ranker_sync = checkpoint_sync  # None: the home's own checkpoints are served
        # the pointer whose release failed to load, and when: not verified again every poll
        self._refused: tuple[Pointer | None, float] = (None, 0.0)
        # what other processes' ``forget`` named since this one started
        self._forgotten = ForgottenFeed(self._home) if self._home is not None else None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.counters: Counter[str] = Counter()
        self._categories: tuple[str, dict[str, int]] | None = None  # (release, counts)
        self._changed: tuple[Path | None, tuple[str, ...]] = (None, ())  # (bundle, its changes)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def load(cls, home: Path | str | None = None, *, settings: Settings | None = None,
             encoder: Encoder | None = None, watch: bool = True) -> Recommender:
        """Load the live release under ``home`` (default: settings.home).

        With ``settings.release_source`` ``store`` or ``mlflow``, the release that source
        names is first synced into the home's releases (see :mod:`serving.release_sync`); a
        sync that fails leaves the release already there serving (counted in
        ``sync_failures``), and raises when there is none. With a ``release_store`` set too,
        the ranker checkpoint the store's ``rankers/LATEST`` names is then synced into the
        home's rankers (see :class:`serving.checkpoint.CheckpointSync`), if it was trained for
        that release; a sync that fails leaves the checkpoint already here serving (counted in
        ``ranker_sync_failures``).

        With ``watch``, a background thread follows the release pointer (and the source)
        every ``settings.reload_interval_s`` seconds and swaps in new releases.
        """
        settings = settings or Settings()
        if home is not None:
            settings = settings.model_copy(update={"home": Path(home)})
        settings.check_scaled_out()
        releases_dir = settings.releases_dir
        sync = open_release_sync(settings)
        sync_failed = False
        if sync is not None:
            try:
                sync.sync(wait_s=SYNC_WAIT_S)
            except Exception as exc:  # noqa: BLE001 - with a release here, serve it
                if read_pointer(releases_dir) is None:
                    raise
                sync_failed = True
                log.error("serving the release already here: cannot sync from %s: %s",
                          sync.source.describe(), exc)
        pointer = read_pointer(releases_dir)
        if pointer is None and sync is not None:
            raise ReleaseError(f"no release has been published to {sync.source.describe()} "
                               f"(INSTANTREC_RELEASE_SOURCE={settings.release_source}), nor "
                               f"under {releases_dir}")
        ranker_sync = open_checkpoint_sync(settings)
        ranker_sync_failed = False
        if ranker_sync is not None and pointer is not None:
            try:
                ranker_sync.sync(pointer.release_id)
            except Exception as exc:  # noqa: BLE001 - serve the checkpoint here, or none
                ranker_sync_failed = True
                log.error("serving the ranker checkpoint already here: cannot sync it from "
                          "%s: %s", ranker_sync.describe(), exc)
        bundle = load_bundle(current_bundle_dir(releases_dir))
        state = _make_state(bundle, release_encoder(bundle, settings, encoder),
                            pointer.generation if pointer else 0, settings.home,
                            parse_steps(settings.query_steps))
        rec = cls(state, settings, releases_dir, release_sync=sync, checkpoint_sync=ranker_sync)
        if sync_failed:
            rec.counters["sync_failures"] += 1
        if ranker_sync_failed:
            rec.counters["ranker_sync_failures"] += 1
        if watch:
            rec._watcher = threading.Thread(target=rec._watch, name="instantrec-reload",
                                            daemon=True)
            rec._watcher.start()
        log.info("serving release %s (%d items)", bundle.release_id, bundle.manifest.item_count)
        return rec

    @classmethod
    def from_bundle(cls, bundle_dir: Path | str, *, settings: Settings | None = None,
                    encoder: Encoder | None = None, warm: bool = True) -> Recommender:
        """Serve one fixed bundle directory, without following any pointer. ``warm=False``
        leaves the spelling index to the first query that needs it (for a caller that may
        ask none, such as a release gate without golden queries)."""
        settings = settings or Settings()
        bundle = load_bundle(Path(bundle_dir))
        return cls(_make_state(bundle, release_encoder(bundle, settings, encoder), 0, None,
                               parse_steps(settings.query_steps), warm), settings, None)

    # -- requests -----------------------------------------------------------------------

    @property
    def release_id(self) -> str:
        return self._state.bundle.release_id

    @property
    def bundle(self) -> Bundle:
        """The release being served right now."""
        return self._state.bundle

    @property
    def encoder(self) -> Encoder:
        return self._state.encoder

    @property
    def manifest(self) -> Manifest:
        return self._state.bundle.manifest

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def ranker_seq(self) -> int:
        """Sequence number of the ranker checkpoint in use (0 = untrained)."""
        return self._state.ranker_seq

    def recommend(self, query: str | None = None, k: int = 10,
                  filters: Filters | Mapping[str, Any] | None = None,
                  session_id: str | None = None,
                  timings: dict[str, float] | None = None,
                  info: dict[str, Any] | None = None) -> list[Recommendation]:
        """Top ``k`` items for ``query`` after ``filters``, best first.

        With ``session_id``, the session's recent interactions shape the results; with no
        query, they alone do ("keep browsing"). Raises :class:`InvalidInputError`
        (QueryError / FilterError) naming the problem; rejected requests are counted in
        :attr:`counters`.

        ``timings``, when given, receives the seconds this call spent in each stage that ran
        (names in :data:`serving.retrieval.STAGES`: validation, query understanding, encoding, session, BM25
        scores, the filter mask, ANN, the lexical top and union, the candidate cache, the
        candidates' vectors, relevance features (incl. term coverage), relevance scoring,
        the ranker's online terms, building results); their sum is the call's time up to
        the last lap. Without it nothing is timed.

        ``info``, when given, receives what the results came from: ``release_id`` and
        ``ranker_seq`` of the state that answered, and ``intent_shift`` (whether this query
        moved the session away from its interest).
        """
        watch: StageTimer | NoTimer = StageTimer(timings) if timings is not None else NO_TIMER
        try:
            text = None
            if query is None and session_id is None:
                raise QueryError("give a query, a session_id, or both", "query")
            if query is not None:
                text = normalise_query(query, self._settings.max_query_chars)
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
                raise InvalidInputError(f"k must be an integer from 1 to {MAX_K}, got "
                                        f"{short_repr(k)}", "k")
            parsed = Filters.parse(filters)
            if session_id is not None:
                check_id(session_id, "session_id")
        except InvalidInputError as exc:
            self.counters[f"rejected_{type(exc).__name__}"] += 1
            raise
        state = self._state  # one consistent snapshot for the whole request
        if info is not None:
            info.update(release_id=state.bundle.release_id, ranker_seq=state.ranker_seq,
                        intent_shift=False)
        watch.lap("parse")
        dense_text, lexical_text = understood(text, self._steps, state.vocabulary)
        watch.lap("understand")
        qvec = state.encoder.encode_query(dense_text) if dense_text is not None else None
        watch.lap("encode")
        now = time.time()
        session = self._sessions.get(session_id) if session_id is not None else None
        interest = interest_vector(session, state.bundle.vectors, state.row_of, now,
                                   self._session_cfg)
        if qvec is None and interest is None:
            self.counters["rejected_QueryError"] += 1
            raise QueryError(f"no query given and session {session_id!r} has no recent "
                             "interactions to recommend from", "query")
        vec, shifted = blend_query(qvec, interest, self._session_cfg)
        if shifted and session is not None:
            # the shopper moved on: the old intent stops steering at once
            # atomic: an interaction another replica records meanwhile is faded, not lost
            session = self._sessions.update(
                session_id, lambda current: (current or session).shifted(now, self._session_cfg))
            interest = interest_vector(session, state.bundle.vectors, state.row_of, now,
                                       self._session_cfg)
            vec, _ = blend_query(qvec, interest, self._session_cfg)
            self.counters["intent_shifts"] += 1
            if info is not None:
                info["intent_shift"] = True
        depth = max(k, self._settings.candidates)
        watch.lap("session")
        lex = (self._lexical.relative(state.bundle, lexical_text) if lexical_text is not None
               else None)
        watch.lap("bm25")

        def retrieve() -> list[int]:
            return retrieve_candidates(state.bundle, vec, lex, depth, parsed, watch)

        plain = parsed is None and interest is None and dense_text is not None
        if plain:
            # the candidates of a plain query depend only on the release and the query: a
            # repeated query skips both channels' searches
            rows = list(self._candidates.get_or_compute(
                (state.bundle.release_id, dense_text, lexical_text, depth),
                lambda: tuple(retrieve())))
            watch.lap("candidates_cached")  # all of it when the candidates were cached
        else:
            rows = retrieve()
        self.counters["requests"] += 1
        if not rows:
            return []
        rows_arr = np.asarray(rows)
        # one float64 copy of the candidates' vectors serves the relevance features and the
        # ranker (both compute in float64)
        X = np.asarray(state.bundle.vectors[rows_arr], dtype=np.float64)
        watch.lap("vectors")
        rel = None
        model = state.ranker.relevance
        if model is not None and qvec is not None:
            def score() -> np.ndarray:
                feats = relevance_features(state.bundle, state.match, self._lexical, text,
                                           lexical_text, qvec, rows_arr, X)
                watch.lap("features")
                out = model.score(feats)
                out.setflags(write=False)
                return out

            # so are a plain query's relevance scores, for one model (the key holds it)
            rel = (self._relevance.get_or_compute(
                (state.bundle.release_id, model, text, dense_text, lexical_text, depth), score)
                if plain else score())
            watch.lap("relevance")
        z, feats = state.ranker.logits(vec.astype(np.float64), X, session_signal(interest),
                                       rows_arr, lex[rows_arr] if lex is not None else None,
                                       # the key the learner saw: events store the query
                                       # scrubbed of personal data
                                       query_key(scrub(text)) if text is not None else None,
                                       rel)
        order = np.argsort(-z, kind="stable")[:k]
        watch.lap("ranker")
        out = self._results(state.bundle, rows_arr[order], z[order], {
            name: v[order] for name, v in feats.items()})
        watch.lap("results")
        return out

    @staticmethod
    def _results(bundle: Bundle, rows: np.ndarray, z: np.ndarray,
                 feats: dict[str, np.ndarray]) -> list[Recommendation]:
        """Recommendations for ``rows`` (best first) with logits ``z`` and their signals:
        one conversion to Python floats per column rather than per value."""
        items = bundle.items
        prices = items.prices[rows].tolist()
        scores = sigmoid(z).tolist()
        columns = {name: np.asarray(v, dtype=np.float64).tolist() for name, v in feats.items()}
        columns["logit"] = z.tolist()
        out = []
        for j, row in enumerate(rows.tolist()):
            price = prices[j]
            out.append(Recommendation(
                item_id=str(items.item_ids[row]), title=str(items.titles[row]),
                score=scores[j], rank=j + 1, category=items.categories[row],
                brand=items.brands[row], price=None if price != price else price,  # NaN
                in_stock=bool(items.in_stock[row]),
                signals={name: col[j] for name, col in columns.items()},
            ))
        return out

    # -- feedback -----------------------------------------------------------------------

    def _log(self) -> EventLog:
        if self._event_log is None:
            with self._log_lock:  # concurrent first events must not open it twice
                if self._event_log is None:
                    from serving.backends import open_event_log

                    self._event_log = open_event_log(self._settings)
        return self._event_log

    def record(self, event: Mapping[str, Any] | Event) -> Event:
        """Validate, store durably and apply one feedback event; returns the stored form.

        Raises :class:`EventError` naming the bad field (the rejection is counted). Re-sending
        an event id with the same payload is a no-op; with another payload it is refused
        (:class:`EventConflictError`, nothing overwritten). A click, add-to-cart or purchase
        shapes the same session's next request at once.
        """
        return self.record_many([event])[0]

    def record_many(self, events: list[Mapping[str, Any] | Event]) -> list[Event]:
        """Record several events in one durable write (all or none are validated first)."""
        return self.record_batch(events)[0]

    def record_batch(self, events: list[Mapping[str, Any] | Event],
                     ) -> tuple[list[Event], AppendResult]:
        """:meth:`record_many`, also returning what the log did with them (how many were new,
        how many were re-sent ids). A bad event raises :class:`EventError` whose ``field``
        names it as ``events[i].<field>``, and nothing of the batch is stored; so does an
        event id already recorded (or given twice in the batch) with another payload:
        :class:`EventConflictError` naming ``events[i].event_id`` (``event_id`` for one)."""
        if self._user_key is None:
            self._user_key = self._settings.user_key()
        parsed = []
        for i, raw in enumerate(events):
            try:
                parsed.append(parse_event(raw, self._user_key, self._settings.max_query_chars,
                                          live=True))
            except EventError as exc:
                self.counters["rejected_events"] += 1
                if len(events) > 1:
                    raise EventError(f"event {i}: {exc}",
                                     f"events[{i}]" + (f".{exc.field}" if exc.field else "")
                                     ) from exc
                raise
        repeated = _repeated_with_another_payload(parsed)
        if repeated is not None:
            self._refuse_conflict(parsed, repeated, len(events) > 1)
        result: AppendResult = self._log().append(parsed)
        if result.conflicts:  # nothing of the batch was stored
            self._refuse_conflict(parsed, next(i for i, ev in enumerate(parsed)
                                               if ev.event_id in result.conflicts), len(events) > 1)
        self.counters["events_recorded"] += result.accepted
        self.counters["events_duplicate"] += result.duplicates
        # a re-sent event changes nothing, in the log or in the session
        self._apply_to_sessions([ev for ev in parsed if ev.event_id in result.new_ids])
        return parsed, result

    def _refuse_conflict(self, parsed: list[Event], i: int, batch: bool) -> NoReturn:
        """Count and raise :class:`EventConflictError` for ``parsed[i]``."""
        self.counters["rejected_events"] += 1
        self.counters["events_conflict"] += 1
        message = (f"event id {parsed[i].event_id!r} was already recorded with a different "
                   "payload (a retry must repeat the event as it was sent)")
        if batch:
            raise EventConflictError(f"event {i}: {message}", f"events[{i}].event_id")
        raise EventConflictError(message, "event_id")

    def forget(self, user_id: str) -> dict[str, int]:
        """Remove a user: every stored event of theirs (found by the keyed hash of
        ``user_id``) and the state of every session those events belonged to. Returns what
        was removed. The ranker keeps only aggregates (per query and item), never a user."""
        from serving.events import pseudonymise

        check_id(user_id, "user_id")
        if self._user_key is None:
            self._user_key = self._settings.user_key()
        user = pseudonymise(user_id, self._user_key)
        deleted, sessions = self._log().forget(user)
        cleared = sum(self._sessions.delete(sid) for sid in sessions)
        if self._home is not None:
            # every other serving process of this home, and the nearline updater, clear them
            # at their next poll
            append_forgotten(self._home, self._user_key, sessions, user)
        self.counters["users_forgotten"] += 1
        return {"events_deleted": deleted, "sessions": len(sessions), "sessions_cleared": cleared}

    def _clear_forgotten(self) -> int:
        """Clear the in-process sessions that another process's ``forget`` named since the
        last poll (a shared Redis store was cleared by that call); returns how many."""
        ids = getattr(self._sessions, "ids", None)
        if self._forgotten is None or ids is None or not self._forgotten.pending():
            return 0
        if self._user_key is None:
            self._user_key = self._settings.user_key()
        gone = self._forgotten.read(self._user_key)
        if not gone.sessions:
            return 0
        cleared = sum(self._sessions.delete(sid) for sid in ids() if gone.session(sid))
        self.counters["forgotten_sessions_cleared"] += cleared
        return cleared

    @property
    def event_log(self) -> EventLog:
        """The durable event log this recommender records to (opened on first use)."""
        return self._log()

    @property
    def home(self) -> Path | None:
        """The home directory whose pointers this recommender follows (None: a fixed bundle)."""
        return self._home

    def item(self, item_id: str) -> dict[str, Any] | None:
        """The live release's attributes of one item, or None when it is not listed."""
        state = self._state
        row = state.row_of.get(item_id) if isinstance(item_id, str) else None
        if row is None:
            return None
        items = state.bundle.items
        price = float(items.prices[row])
        return {ITEM_ID: item_id, "title": str(items.titles[row]),
                "category": items.categories[row], "brand": items.brands[row],
                "price": None if price != price else price, "in_stock": bool(items.in_stock[row])}

    def categories(self) -> dict[str, int]:
        """Items per category in the live release, most items first (counted once a
        release)."""
        bundle = self._state.bundle
        cached = self._categories
        if cached is None or cached[0] != bundle.release_id:
            values, counts = np.unique(np.asarray([c for c in bundle.items.categories
                                                   if c is not None], dtype=object).astype(str),
                                       return_counts=True)
            order = np.argsort(-counts, kind="stable")
            cached = (bundle.release_id, {str(values[i]): int(counts[i]) for i in order})
            self._categories = cached
        return dict(cached[1])

    def session_summary(self, session_id: str, now: float | None = None) -> dict[str, Any]:
        """What the session's next request will be shaped by: its recent interactions (newest
        first, each with its current weight after decay and any intent shift), the strength of
        its interest, the categories it leans to, and when the last intent shift happened."""
        check_id(session_id, "session_id")
        now = time.time() if now is None else now
        state = self._state
        session = self._sessions.get(session_id)
        cfg = self._session_cfg
        interactions = []
        leaning: Counter[str] = Counter()
        for it in reversed(session.interactions if session is not None else ()):
            weight = current_weight(it, now, cfg)
            if weight is None:
                continue
            item = self.item(it.item_id)
            interactions.append({ITEM_ID: it.item_id, "title": item and item["title"],
                                 "category": item and item["category"],
                                 "age_s": round(now - it.ts, 1), "weight": round(weight, 4)})
            if item is not None and item["category"]:
                leaning[item["category"]] += weight
        interest = interest_vector(session, state.bundle.vectors, state.row_of, now, cfg)
        total = sum(leaning.values()) or 1.0
        return {"session_id": session_id, "interactions": interactions,
                "interest_strength": round(float(np.linalg.norm(interest)), 4)
                if interest is not None else 0.0,
                "categories": {c: round(w / total, 3) for c, w in leaning.most_common(5)},
                "intent_shift_ts": session.shift_ts if session is not None and session.shift_ts
                else None}

    def restore_session(self, session_id: str) -> bool:
        """Rebuild a session's state from its recent events in the durable log, for a process
        that starts without it (a one-shot CLI call, a replica without a shared session
        store). Reads the whole log: meant for start-up, not the request path."""
        from serving.eventlog import iter_all

        horizon = time.time() - self._session_cfg.ttl_s
        events = [logged.event for logged in iter_all(self._log())
                  if logged.event.session_id == session_id and logged.event.ts >= horizon]
        self._apply_to_sessions(events)
        return bool(events)

    def _apply_to_sessions(self, events: list[Event]) -> None:
        row_of = self._state.row_of
        for ev in events:
            weight = EVENT_WEIGHTS.get(ev.type)
            if weight is None or ev.item_id not in row_of:
                continue
            self._sessions.update(ev.session_id, lambda current, ev=ev, weight=weight: (
                current or SessionState()).add(ev.item_id, weight, ev.ts, self._session_cfg))

    # -- hot reload ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Sync from the release source (if any), then follow the pointer now; returns True
        if a new release was swapped in.

        A release that fails to load, or to sync, is logged and counted, and the current one
        keeps serving.
        """
        if self._releases_dir is None:
            return False
        with self._reload_lock:
            self._sync_source()
            current = self._state
            self._check_files(current.bundle)
            try:
                pointer = read_pointer(self._releases_dir)
                refused, when = self._refused
                if (pointer is not None and pointer.release_id != current.bundle.release_id
                        and (pointer != refused or time.monotonic() - when >= RETRY_REFUSED_S)):
                    self._refused = (pointer, time.monotonic())
                    bundle = load_bundle(self._releases_dir / pointer.release_id)
                    self._refused = (None, 0.0)
                    self._sync_ranker(bundle.release_id)  # come up with its trained ranker
                    encoder = release_encoder(bundle, self._settings, current.encoder)
                    self._state = _make_state(bundle, encoder, pointer.generation, self._home,
                                              self._steps)
                    self.counters["reloads"] += 1
                    log.info("now serving release %s", bundle.release_id)
                    return True
            except Exception as exc:  # noqa: BLE001 - a bad release must never stop serving
                self.counters["reload_failures"] += 1
                log.error("keeping release %s: new release failed to load: %s",
                          current.bundle.release_id, exc)
                return False
            self._sync_ranker(current.bundle.release_id)
            return self._reload_ranker()

    def _sync_ranker(self, release_id: str) -> None:
        """Bring the store's newest ranker checkpoint for ``release_id`` into this home (one
        small read of the store when nothing changed); the ranker here keeps serving if not."""
        if self._ranker_sync is not None:
            sync = self._ranker_sync
            self._counted_sync(lambda: sync.sync(release_id), "ranker_syncs",
                               "ranker_sync_failures",
                               f"keeping ranker {self._state.ranker_seq}: cannot sync a "
                               f"checkpoint from {sync.describe()}")

    def _sync_source(self) -> None:
        """Bring the release the source names into the local releases (one small read of the
        source when nothing changed); the live release keeps serving if not."""
        if self._sync is not None:
            self._counted_sync(self._sync.sync, "syncs", "sync_failures",
                               f"keeping release {self._state.bundle.release_id}: cannot sync "
                               f"from {self._sync.source.describe()}")

    def _counted_sync(self, sync: Callable[[], object | None], done: str, failed: str,
                      keeping: str) -> None:
        """Run ``sync``; count ``done`` when it brought something, and on any error log
        ``keeping`` with the error and count ``failed`` instead of raising."""
        try:
            if sync() is not None:
                self.counters[done] += 1
        except Exception as exc:  # noqa: BLE001 - an unreachable or bad source must never stop serving
            self.counters[failed] += 1
            log.error("%s: %s", keeping, exc)

    @property
    def changed_files(self) -> list[str]:
        """Files of the live release that changed on disk after it was loaded (paths inside
        the release; empty when none did), as seen when the pointer was last polled. A
        published release must never be edited in place: the loaded release keeps serving
        (a truncated memory-mapped file would kill the process); checksums are verified
        again at its next load."""
        where, names = self._changed
        return list(names) if where == self._state.bundle.path else []

    def _check_files(self, bundle: Bundle) -> None:
        """Log (as an error naming the file) and count each file of the live release that
        changed since it was loaded (size, mtime or inode), once per file and bundle."""
        try:
            changed = changed_files(bundle)
        except Exception as exc:  # noqa: BLE001 - a check must never stop serving
            log.error("cannot check the files of release %s: %s", bundle.release_id, exc)
            return
        where, known = self._changed
        known = known if where == bundle.path else ()
        for name in changed:
            if name not in known:
                self.counters["release_files_changed"] += 1
                log.error("release %s: file %s changed on disk after it was loaded (release "
                          "files are immutable and must never be edited in place); serving "
                          "on what was loaded; its checksums are verified at its next load",
                          bundle.release_id, bundle.path / name)
        self._changed = (bundle.path, tuple(sorted({*known, *changed})))

    def _reload_ranker(self) -> bool:
        """Swap in a newer ranker checkpoint trained for the live release, if there is one."""
        current = self._state
        try:
            ref: CheckpointRef | None = read_latest(self._home)
            if (ref is None or ref.seq == current.ranker_seq
                    or ref.release_id != current.bundle.release_id):
                return False
            ranker = Ranker.load(rankers_dir(self._home) / ref.file)
            if ranker.release_id != current.bundle.release_id or len(ranker.item_bias) != len(
                    current.bundle.items):
                raise ReleaseError(f"checkpoint {ref.file} does not fit release "
                                   f"{current.bundle.release_id}")
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint must never stop serving
            self.counters["ranker_reload_failures"] += 1
            log.error("keeping ranker %d: checkpoint failed to load: %s", current.ranker_seq, exc)
            return False
        if ranker.relevance is not None and current.match is not None:
            current.match.warm()  # a first relevance model: analyse the titles before the swap
        self._state = dataclasses.replace(current, ranker=ranker, ranker_seq=ref.seq)
        self.counters["ranker_reloads"] += 1
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self._settings.reload_interval_s):
            try:
                self._clear_forgotten()
            except Exception as exc:  # noqa: BLE001 - must never stop the reload watcher
                log.error("cannot clear forgotten sessions: %s", exc)
            self.reload()

    def close(self) -> None:
        """Stop following the pointer and close the event log (requests keep working on the
        current release)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self._event_log is not None:
            self._event_log.close()

    def __enter__(self) -> Recommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repeated_with_another_payload(events: list[Event]) -> int | None:
    """The index of the first event whose id came earlier in ``events`` with another payload
    (the log would report the id; this names the event), or None."""
    first: dict[str, Event] = {}
    for i, ev in enumerate(events):
        earlier = first.setdefault(ev.event_id, ev)
        if earlier is not ev and not same_payload(earlier, ev):
            return i
    return None


def encoder_path_for(bundle: Bundle, settings: Settings) -> Path | None:
    """The directory of the encoder recorded in the manifest: its path, else a directory of the
    same name under this home's ``encoders/`` (another machine); without a recorded path, the
    configured encoder (None = the packaged default)."""
    spec = bundle.manifest.encoder
    if spec.path is None:
        return settings.encoder_path
    recorded = Path(spec.path)
    for candidate in (recorded, encoders_dir(settings.home) / recorded.name):
        if candidate.is_dir():
            return candidate
    if settings.encoder_path is not None:
        return settings.encoder_path  # the revision check below says whether it is the same
    raise ReleaseError(
        f"release {bundle.release_id} was built with encoder {spec.name} rev {spec.revision} "
        f"from {spec.path}, which does not exist here (nor under {settings.home / 'encoders'})")


def release_encoder(bundle: Bundle, settings: Settings, current: Encoder | None = None,
                    backend: Literal["torch", "onnx"] | None = None) -> Encoder:
    """The encoder a bundle was built with (its recorded directory, checked by revision):
    reuse ``current`` when it matches. ``backend`` overrides ``settings.encoder_backend``."""
    spec = bundle.manifest.encoder
    encoder = current
    if encoder is None or encoder.revision != spec.revision:
        # the exported ONNX model is shared by every home on the machine (keyed by revision)
        encoder = Encoder(encoder_path_for(bundle, settings), max_length=spec.max_tokens,
                          backend=backend or settings.encoder_backend,
                          query_precision=settings.query_precision)
    if encoder.revision != spec.revision or encoder.dim != spec.dim:
        raise ReleaseError(
            f"release {bundle.release_id} was built with encoder {spec.name} rev {spec.revision} "
            f"(dim {spec.dim}); the configured encoder is rev {encoder.revision} (dim {encoder.dim})"
        )
    return encoder
