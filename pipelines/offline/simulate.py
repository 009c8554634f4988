"""Click simulation on human-judged queries, through the real feedback loop.

Simulated shoppers search the development queries of a judged data set, look at the live
results, and click, add to cart and buy according to a position-based click model driven by
the human relevance labels. Their events go through the real path (``Recommender.record_many``
into the durable event log, then the real ``NearlineUpdater`` and a hot-reloaded checkpoint),
and search quality is measured in the full-catalogue retrieval protocol after every round:

* ``seen`` queries are the only ones shoppers search, so their feedback is learned from;
* ``unseen`` queries never get feedback: they show whether learning on some queries helps or
  hurts the others (the item biases and the query adapter are shared by all queries).

The split orders the queries by a hash of ``query_id``: it depends on the ids alone, so it is
the same on every run and every machine.

A second experiment measures intent shift in the real session path: a shopper interacts with
the products of one need (A), then searches a different need (B, whose relevant products are
disjoint from A's); how far is the in-session ranking for B from a fresh session's, and how
many interactions with B's results does it take to catch up?

The simulation runs in private workspaces under ``<home>/simulate/`` (``seed-<seed>`` for the
learning loop, ``seed-<seed>-untrained`` for the intent-shift baseline): copies of the live
release with their own, empty event logs and ranker checkpoints, so the "before" figures are
always those of the untrained ranker and a re-run starts from scratch, while the expensive
part (embedding the catalogue into ``<home>``) is done once and reused.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.offline.judged import Judgments, load_judgments, read_table, score_rankings
from pipelines.offline.metrics import ndcg_at_k
from pipelines.offline.splits import hash_unit
from serving.encoder import Encoder
from serving.errors import InvalidInputError, ReleaseError
from serving.schema import ITEM_ID, QUERY_ID
from serving.settings import Settings

log = logging.getLogger(__name__)

METRICS = ("ndcg@10", "recall@100", "mrr")
EVAL_DEPTH = 100          # retrieval protocol: rank 100 items, score nDCG@10, recall@100, MRR
SHOWN = 10                # a simulated shopper sees one page of ten results
RECOVERY_TOLERANCE = 0.01
A_LEAD_S = 90.0           # an intent-shift session served need A this long before the switch


# -- the click model --------------------------------------------------------------------


@dataclass(frozen=True)
class ClickModel:
    """A position-based click model whose attractiveness comes from human relevance labels.

    For an item shown at 1-based rank ``r`` with gain ``g = label - min_label`` (an unjudged
    item has gain 0, like a judged-irrelevant one), ``G = max_gain`` the largest gain of the
    label scale, and ``share(g) = (2**g - 1) / (2**G - 1)`` (0 for gain 0, 1 for the top
    label, the exponential gain of nDCG):

    * examination: ``P(E | r) = 1 / r ** eta``. ``eta = 1`` is the usual inverse-rank decay
      of eye-tracking studies; larger values make the shopper look at fewer results;
    * click given examination: ``P(C | E, g) = eps + (1 - eps) * share(g)``. ``eps`` (0.02) is
      the noise of an occasional click on an irrelevant result; a perfect match examined is
      always clicked;
    * add to cart given a click: ``P(A | C, g) = cart_max * share(g)``;
    * purchase given add to cart: ``P(P | A, g) = purchase_max * share(g)``.

    Events at different positions are independent (the position-based model), so a list can
    get several clicks or none.
    """

    eta: float = 1.0
    eps: float = 0.02
    max_gain: float = 3.0
    cart_max: float = 0.5
    purchase_max: float = 0.5

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise InvalidInputError(f"click model eta must be positive, got {self.eta}")
        if not 0.0 <= self.eps < 1.0:
            raise InvalidInputError(f"click model eps must be in [0, 1), got {self.eps}")
        if not self.max_gain > 0:
            raise InvalidInputError(f"click model max_gain must be positive, got {self.max_gain}")
        for name in ("cart_max", "purchase_max"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInputError(f"click model {name} must be in [0, 1], got {value}")

    @classmethod
    def for_judgments(cls, judgments: Judgments, **params: float) -> ClickModel:
        """The model for a label scale: ``max_gain`` = top label - lowest label."""
        top = float(judgments.frame["relevance"].max())
        return cls(max_gain=top - judgments.min_label, **params)

    def share(self, gain: float) -> float:
        """``(2**g - 1) / (2**G - 1)`` with ``g`` clipped to ``[0, max_gain]``."""
        g = min(max(float(gain), 0.0), self.max_gain)
        return (2.0 ** g - 1.0) / (2.0 ** self.max_gain - 1.0)

    def examination(self, rank: int) -> float:
        """Probability that the result at 1-based ``rank`` is looked at."""
        if rank < 1:
            raise InvalidInputError(f"rank is 1-based, got {rank}")
        return 1.0 / rank ** self.eta

    def attraction(self, gain: float) -> float:
        """Probability of a click on an examined result of gain ``gain``."""
        return self.eps + (1.0 - self.eps) * self.share(gain)

    def click_probability(self, rank: int, gain: float) -> float:
        return self.examination(rank) * self.attraction(gain)

    def cart_probability(self, gain: float) -> float:
        """Probability of an add-to-cart given a click."""
        return self.cart_max * self.share(gain)

    def purchase_probability(self, gain: float) -> float:
        """Probability of a purchase given an add-to-cart."""
        return self.purchase_max * self.share(gain)

    def sample(self, gains: Sequence[float], rng: random.Random) -> list[Feedback]:
        """Simulate one shopper on a result list whose item at rank ``i + 1`` has ``gains[i]``.

        Returns the clicked results, best rank first. Four uniform draws per position, always,
        so one position's outcome never changes how many draws the next one sees.
        """
        out = []
        for rank, gain in enumerate(gains, start=1):
            u_exam, u_click, u_cart, u_buy = (rng.random() for _ in range(4))
            if u_exam >= self.examination(rank) or u_click >= self.attraction(gain):
                continue
            cart = u_cart < self.cart_probability(gain)
            out.append(Feedback(rank, cart, cart and u_buy < self.purchase_probability(gain)))
        return out


@dataclass(frozen=True)
class Feedback:
    """What one simulated shopper did with the result at ``rank``: a click, and perhaps more."""

    rank: int
    add_to_cart: bool
    purchase: bool


# -- queries ------------------------------------------------------------------------------


def seen_bucket(query_id: int) -> float:
    """Where a judged query id falls in [0, 1) for the seen/unseen split (a salted hash, the
    same on every machine)."""
    return hash_unit(f"instantrec-simulate:{query_id}")


def split_queries(judgments: Judgments, seen_share: float = 0.5,
                  max_queries: int | None = None) -> tuple[list[int], list[int]]:
    """Development queries with at least one relevant product, split into (seen, unseen).

    ``max_queries`` keeps the first M such queries by query id before splitting. The queries
    are ordered by :func:`seen_bucket` of their id and the first ``round(seen_share * n)``
    are seen: the proportion is exact even for a dozen queries, and the split depends only on
    the ids, never on the run.
    """
    if not 0.0 < seen_share < 1.0:
        raise InvalidInputError(f"seen_share must be between 0 and 1, got {seen_share}")
    if max_queries is not None and max_queries < 2:
        raise InvalidInputError(f"max_queries must be at least 2, got {max_queries}")
    qids = sorted(judgments.relevant())
    if max_queries is not None:
        qids = qids[:max_queries]
    ordered = sorted(qids, key=seen_bucket)
    cut = round(seen_share * len(ordered))
    seen, unseen = sorted(ordered[:cut]), sorted(ordered[cut:])
    if not seen or not unseen:
        raise InvalidInputError(f"the {len(qids)} judged queries with a relevant product give "
                                f"{len(seen)} seen and {len(unseen)} unseen queries; "
                                "both sets need at least one (use more queries)")
    return seen, unseen


# -- the simulation -------------------------------------------------------------------------


@dataclass
class _Shopper:
    """Issues event ids, session ids and pseudonymous users, and keeps each session's clock.

    A session's clock advances a few seconds per action, as a person's would, so no session
    comes near the abuse filter's rate limit; every session has its own user, so no user does
    either. Serving compares event times with the wall clock (interest decay, and an intent
    shift abandons the interactions *older* than the request that detected it), so clocks are
    placed on the wall clock with care: see :meth:`end_now` and :func:`_intent_shift`.
    """

    run: str
    rng: random.Random
    n_sessions: int = 0
    n_events: int = 0

    def new_session(self, start: float = 0.0) -> tuple[str, str, list[float]]:
        """(session id, user id, clock) of a new session whose clock reads ``start``."""
        self.n_sessions += 1
        n = self.n_sessions
        return f"{self.run}-s{n}", f"sim-user-{n}", [start]

    @staticmethod
    def end_now(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Shift a whole session's events so that its last one happens now: the visit has just
        ended when it is recorded (never in the future, whatever its length)."""
        if events:
            offset = time.time() - events[-1]["ts"]
            for event in events:
                event["ts"] += offset
        return events

    def event(self, session: tuple[str, str, list[float]], query: str, item_id: str,
              etype: str, position: int, advance: tuple[float, float]) -> dict[str, Any]:
        session_id, user_id, clock = session
        clock[0] += self.rng.uniform(*advance)
        self.n_events += 1
        return {"event_id": f"{self.run}-e{self.n_events}", "ts": clock[0],
                "session_id": session_id, "user_id": user_id, "query": query,
                ITEM_ID: item_id, "type": etype, "position": position}

    def impressions(self, session: tuple[str, str, list[float]], query: str,
                    items: Sequence[str]) -> list[dict[str, Any]]:
        # a page is shown at once: its impressions are milliseconds apart, in rank order
        return [self.event(session, query, item, "impression", rank, (0.001, 0.001))
                for rank, item in enumerate(items, start=1)]

    def click(self, session: tuple[str, str, list[float]], query: str, item_id: str,
              position: int) -> dict[str, Any]:
        return self.event(session, query, item_id, "click", position, (2.0, 8.0))

    def cart(self, session: tuple[str, str, list[float]], query: str, item_id: str,
             position: int) -> dict[str, Any]:
        return self.event(session, query, item_id, "add_to_cart", position, (3.0, 10.0))

    def purchase(self, session: tuple[str, str, list[float]], query: str, item_id: str,
                 position: int) -> dict[str, Any]:
        return self.event(session, query, item_id, "purchase", position, (5.0, 15.0))

    def browse(self, session: tuple[str, str, list[float]], query: str, items: Sequence[str],
               model: ClickModel, gains: dict[str, float],
               rng: random.Random) -> list[dict[str, Any]]:
        """A page of ``items`` shown for ``query`` and what the click model does on it
        (``gains``: the judged gain of each item): impressions, clicks, carts, purchases."""
        events = self.impressions(session, query, items)
        for fb in model.sample([gains.get(i, 0.0) for i in items], rng):
            item = items[fb.rank - 1]
            events.append(self.click(session, query, item, fb.rank))
            if fb.add_to_cart:
                events.append(self.cart(session, query, item, fb.rank))
            if fb.purchase:
                events.append(self.purchase(session, query, item, fb.rank))
        return events


def _measure(rec: Any, texts: dict[int, str], qids: Sequence[int],
             judgments: Judgments) -> dict[str, float]:
    """Retrieval-protocol metrics of fresh (session-less) requests for ``qids``."""
    rankings = {q: [r.item_id for r in rec.recommend(texts[q], k=EVAL_DEPTH)] for q in qids}
    means, per_query = score_rankings(rankings, judgments, "retrieval")
    return {**{m: round(means[m], 4) for m in METRICS}, "n_queries": len(per_query)}


def _retrain(settings: Settings, encoder: Encoder, updater: Any) -> dict[str, Any]:
    """The batch retrain on the feedback so far; the updater continues from its checkpoint."""
    from pipelines.learning.retrain import retrain_ranker

    start = time.monotonic()
    out = retrain_ranker(settings, encoder=encoder)
    updater.follow_checkpoint()
    relevance = out.get("relevance", {})
    summary = {"promoted": out["promoted"], "seconds": round(time.monotonic() - start, 1),
               "relevance": {k: relevance.get(k) for k in
                             ("queries", "cross_fitted", "zero_shot", "promoted")},
               "log_loss_gain": out.get("log_loss_gain"), "promoted_by": out.get("promoted_by"),
               "reason": out.get("reason")}
    log.info("batch retrain: %s", summary)
    return summary


def _prepare_workspace(settings: Settings, name: str) -> Settings:
    """A private home ``<home>/simulate/<name>`` holding a copy of the live release and nothing
    else (no events, no ranker checkpoints), so every run starts from the untrained ranker."""
    from serving.release import Pointer, read_pointer, write_pointer

    pointer = read_pointer(settings.releases_dir)
    if pointer is None:
        raise ReleaseError(f"no release is live under {settings.releases_dir}")
    work = settings.home / "simulate" / name
    if work.exists():
        shutil.rmtree(work)
    (work / "releases").mkdir(parents=True)
    shutil.copytree(settings.releases_dir / pointer.release_id,
                    work / "releases" / pointer.release_id)
    write_pointer(work / "releases", Pointer(pointer.release_id, pointer.generation))
    # A simulated visit is recorded in one burst when it ends (its events keep their simulated
    # times), and the abuse filter counts a session's positives by the server's clock: a
    # shopper with more than abuse_max_clicks of them would look like a bot. The simulated
    # shoppers are people by construction, so the rate limit is lifted here.
    return settings.model_copy(update={"home": work, "abuse_max_clicks": 10**9})


def simulate(settings: Settings, products: Path, judgments: Path, sessions: int = 2500,
             rounds: int = 8, seed: int = 0, encoder: Encoder | None = None,
             max_queries: int | None = None, seen_share: float = 0.5,
             click_model: ClickModel | None = None, shift_sessions: int = 200,
             shift_interactions: int = 3, chart: Path | None = None,
             retrain_every: int = 4) -> dict[str, Any]:
    """Build (or reuse) a release of ``products``, replay simulated shoppers through the real
    feedback loop, and measure search quality before, during and after.

    Arguments:
        products, judgments: files with the schema of ``../shared/data`` (any id alias).
        sessions: simulated search sessions per round, each on one seen query (one page of
            ten results, the click model's events on it).
        rounds: how many times ``sessions`` sessions are followed by a nearline update, a
            checkpoint reload and a measurement (the learning curve has ``rounds + 1`` points).
        seed: seeds the click model, the order of the queries and the intent-shift pairs.
        max_queries: use only the first M judged queries (by id) with a relevant product.
        seen_share: share of those queries that get feedback (by a hash of the query id).
        shift_sessions: intent-shift sessions (need A, then need B), measured with the trained
            ranker at the end (``intent_shift``) and, on the same pairs, with the untrained
            one (``intent_shift_untrained``).
        shift_interactions: interactions with A's results before the switch.
        chart: PNG of the learning curve (default ``<home>/simulate.png``).
        retrain_every: after every this many rounds, the batch retrain runs as its DAG would
            (:func:`pipelines.learning.retrain.retrain_ranker`): it fits the relevance model on the
            position-debiased feedback, gated on the seen queries' judgments (never the
            unseen ones'), then the ranker; the updater and serving continue from what it
            published; 0: never.

    Returns a JSON-able report: ``seen`` and ``unseen`` (``before``/``after`` retrieval
    metrics), ``intent_shift``, the learning ``curve``, event and updater counters.
    """
    from pipelines.learning.nearline import NearlineUpdater
    from pipelines.steps import run_build
    from serving.recommender import Recommender

    if sessions < 1 or rounds < 1:
        raise InvalidInputError(f"sessions and rounds must be at least 1, got {sessions}, {rounds}")
    started = time.monotonic()
    judged = load_judgments(Path(judgments))
    model = click_model or ClickModel.for_judgments(judged)
    seen, unseen = split_queries(judged, seen_share, max_queries)
    texts = {qid: query[:settings.max_query_chars] for qid, query in judged.queries().iter_rows()}
    gains = judged.gains()

    encoder = encoder or Encoder(settings.encoder_path, max_length=settings.item_max_tokens,
                                 precision=settings.embed_precision)
    build = run_build(settings, catalogue=Path(products), golden=None, register=False,
                      encoder=encoder)
    if not build["publish"]["live"]:
        raise ReleaseError(f"release {build['publish']['release_id']} of {products} failed its "
                           f"gate and is not live: {build['evaluate']['gate']}")
    build_s = time.monotonic() - started
    # Intent shift with the untrained ranker, in a workspace of its own: its events must not
    # reach the updater (they include unseen queries).
    shift_rng_seed = seed + 1_000_003     # the same pairs and clocks for both measurements
    shift_start = time.monotonic()
    untrained_settings = _prepare_workspace(settings, f"seed-{seed}-untrained")
    with Recommender.load(settings=untrained_settings, encoder=encoder, watch=False) as fresh_rec:
        shift_untrained = _intent_shift(fresh_rec, _Shopper(f"sim{seed}u", random.Random(0)),
                                        judged, texts, seen + unseen, shift_sessions,
                                        shift_interactions, random.Random(shift_rng_seed))
    shift_s = time.monotonic() - shift_start

    sim_settings = _learning_settings(settings, seed, Path(judgments), seen)
    rec = Recommender.load(settings=sim_settings, encoder=encoder, watch=False)
    updater = NearlineUpdater(sim_settings, encoder)
    rng = random.Random(seed)
    shopper = _Shopper(run=f"sim{seed}", rng=rng)
    log.info("simulating on release %s: %d seen, %d unseen queries, %d sessions x %d rounds",
             rec.release_id, len(seen), len(unseen), sessions, rounds)

    def measure(round_: int) -> dict[str, Any]:
        point = {"round": round_, "events": shopper.n_events, "sessions": shopper.n_sessions,
                 "ranker_checkpoint": rec.ranker_seq,
                 "seen": _measure(rec, texts, seen, judged),
                 "unseen": _measure(rec, texts, unseen, judged)}
        log.info("round %d: %d events, nDCG@10 seen %.4f unseen %.4f", round_, point["events"],
                 point["seen"]["ndcg@10"], point["unseen"]["ndcg@10"])
        return point

    try:
        curve = [measure(0)]
        feedback: Counter[str] = Counter()
        sim_start = time.monotonic()
        order = list(seen)
        for round_ in range(1, rounds + 1):
            # every seen query gets its share of sessions; the order is shuffled each round
            rng.shuffle(order)
            for n in range(sessions):
                qid = order[n % len(order)]
                feedback.update(_shop(rec, shopper, model, texts[qid], gains[qid], rng))
            update = updater.run_once()
            retrain = None
            if retrain_every and round_ % retrain_every == 0:
                retrain = _retrain(sim_settings, encoder, updater)
            rec.reload()
            curve.append({**measure(round_), "updater_seconds": update["seconds"],
                          **({"retrain": retrain} if retrain else {})})
        learn_s = time.monotonic() - sim_start

        # the same measurement on the live, trained ranker; these events are logged (the real
        # path) but never applied: the updater has run for the last time
        shift_start = time.monotonic()
        shift = _intent_shift(rec, _Shopper(f"sim{seed}t", random.Random(0)), judged, texts,
                              seen + unseen, shift_sessions, shift_interactions,
                              random.Random(shift_rng_seed))
        shift = {**shift, "ranker_checkpoint": rec.ranker_seq}
        shift_s += time.monotonic() - shift_start
        recorded = dict(rec.counters)
        updater_counters = dict(updater.stats.counters)
        applied = updater.stats.applied
    finally:
        updater.close()
        rec.close()

    chart_path = Path(chart) if chart is not None else settings.home / "simulate.png"
    write_chart(curve, chart_path, title=f"{Path(products).parent.name or 'catalogue'}: "
                f"{len(seen)} seen / {len(unseen)} unseen queries, seed {seed}")
    before, after = curve[0], curve[-1]
    return {
        "seen": {"before": before["seen"], "after": after["seen"]},
        "unseen": {"before": before["unseen"], "after": after["unseen"]},
        "intent_shift": shift,
        "intent_shift_untrained": shift_untrained,
        "ndcg_gain": {name: round(after[name]["ndcg@10"] - before[name]["ndcg@10"], 4)
                      for name in ("seen", "unseen")},
        "curve": curve,
        "click_model": asdict(model),
        "n_seen_queries": len(seen),
        "n_unseen_queries": len(unseen),
        "seen_query_ids": seen,
        "sessions": sessions,
        "rounds": rounds,
        "seed": seed,
        "events": {"learning": curve[-1]["events"], "by_type": dict(feedback),
                   "recorded": recorded.get("events_recorded", 0),
                   "duplicates": recorded.get("events_duplicate", 0),
                   "rejected": recorded.get("rejected_events", 0),
                   "intent_shift": shift["events"]},
        "updater_counters": {**updater_counters, "applied": applied},
        "release_id": rec.release_id,
        "workspace": str(sim_settings.home),
        "chart": str(chart_path),
        "seconds": {"build": round(build_s, 1), "learning": round(learn_s, 1),
                    "intent_shift": round(shift_s, 1),
                    "total": round(time.monotonic() - started, 1)},
    }


def _learning_settings(settings: Settings, seed: int, judgments: Path,
                       seen: list[int]) -> Settings:
    """The learning run's workspace: the judgments drive the shoppers, the batch retrain
    learns from their feedback alone and may check what it learned against the judgments of
    the seen queries only (a shop's staff judge queries that have traffic), never the unseen
    ones'."""
    sim_settings = _prepare_workspace(settings, f"seed-{seed}")
    seen_judgments = sim_settings.home / "seen-judgments.parquet"
    read_table(judgments).filter(pl.col(QUERY_ID).is_in(seen)).write_parquet(seen_judgments)
    return sim_settings.model_copy(update={"judgments": seen_judgments,
                                           "relevance_source": "feedback"})


def _shop(rec: Any, shopper: _Shopper, model: ClickModel, text: str, gains: dict[str, float],
          rng: random.Random) -> Counter[str]:
    """One search session on query ``text``: a page of results, the click model's clicks,
    carts and purchases on it (``gains``: the judged gain of each item), all recorded through
    ``rec``; returns the events' types counted."""
    session = shopper.new_session()
    items = [r.item_id for r in rec.recommend(text, k=SHOWN, session_id=session[0])]
    events = shopper.browse(session, text, items, model, gains, rng)
    rec.record_many(shopper.end_now(events))
    return Counter(e["type"] for e in events)


# -- intent shift -------------------------------------------------------------------------


def _first_relevant(items: Sequence[str], relevant: set[str], done: set[str]) -> int | None:
    """1-based rank of the best-ranked item of ``relevant`` not interacted with yet."""
    return next((r for r, item in enumerate(items, start=1)
                 if item in relevant and item not in done), None)


def _intent_shift(rec: Any, shopper: _Shopper, judged: Judgments, texts: dict[int, str],
                  qids: Sequence[int], n_sessions: int, a_interactions: int,
                  rng: random.Random, steps: int = 4) -> dict[str, Any]:
    """Sessions that serve need A, then switch to need B; nDCG@10 for B after ``i`` interactions
    with B's results (i = 0 .. steps - 1), against a fresh session's nDCG@10 for B.

    An interaction with A is a click on the best-ranked shown product relevant to A (the first
    one also goes to the cart); an interaction with B is a click on the best-ranked shown
    product relevant to B. A page with nothing relevant on it gets no click.
    """
    relevant, gains = judged.relevant(), judged.gains()
    pairs = [(a, b) for a in qids for b in qids
             if a != b and texts[a] != texts[b] and not relevant[a] & relevant[b]]
    if not pairs or n_sessions < 1:
        return {"sessions": 0, "events": 0}
    fresh_cache: dict[int, list[str]] = {}
    in_session = np.zeros((n_sessions, steps))
    fresh = np.zeros(n_sessions)
    share_old, share_old_fresh = np.zeros(n_sessions), np.zeros(n_sessions)
    recover: list[int | None] = []
    shifts_detected = 0
    a_clicks = 0
    events_before = shopper.n_events
    for n in range(n_sessions):
        a, b = pairs[rng.randrange(len(pairs))]
        if b not in fresh_cache:
            fresh_cache[b] = [r.item_id for r in rec.recommend(texts[b], k=SHOWN)]
        fresh[n] = ndcg_at_k(fresh_cache[b], gains[b], SHOWN)
        share_old_fresh[n] = len(set(fresh_cache[b]) & relevant[a]) / SHOWN
        # Need A was served a minute or two ago: its events are older than the switch to B, and
        # an intent shift detected at the switch (wall clock) finds them older, as it should.
        session = shopper.new_session(time.time() - A_LEAD_S)
        done: set[str] = set()
        for j in range(a_interactions):
            items = [r.item_id for r in rec.recommend(texts[a], k=SHOWN, session_id=session[0])]
            events = shopper.impressions(session, texts[a], items)
            rank = _first_relevant(items, relevant[a], done)
            if rank is not None:
                item = items[rank - 1]
                done.add(item)
                a_clicks += 1
                events.append(shopper.click(session, texts[a], item, rank))
                if j == 0:
                    events.append(shopper.cart(session, texts[a], item, rank))
            rec.record_many(events)
        recovered = None
        for i in range(steps):
            shifts = rec.counters["intent_shifts"]
            items = [r.item_id for r in rec.recommend(texts[b], k=SHOWN, session_id=session[0])]
            if i == 0:
                shifts_detected += rec.counters["intent_shifts"] > shifts
                share_old[n] = len(set(items) & relevant[a]) / SHOWN
            in_session[n, i] = ndcg_at_k(items, gains[b], SHOWN)
            if recovered is None and in_session[n, i] >= fresh[n] - RECOVERY_TOLERANCE:
                recovered = i
            if i < steps - 1:
                # from the switch on, the shopper acts after each page was served
                session[2][0] = max(session[2][0], time.time())
                events = shopper.impressions(session, texts[b], items)
                rank = _first_relevant(items, relevant[b], done)
                if rank is not None:
                    done.add(items[rank - 1])
                    events.append(shopper.click(session, texts[b], items[rank - 1], rank))
                rec.record_many(events)
        recover.append(recovered)
    mean_in, mean_fresh = in_session.mean(axis=0), float(fresh.mean())
    on_means = next((i for i in range(steps) if mean_in[i] >= mean_fresh - RECOVERY_TOLERANCE),
                    None)
    # a session that has not caught up after the last step counts as ``steps``
    per_session = [steps if r is None else r for r in recover]
    return {
        "sessions": n_sessions,
        "a_interactions": a_interactions,
        "a_clicks": a_clicks,
        "tolerance": RECOVERY_TOLERANCE,
        "fresh_ndcg@10": round(mean_fresh, 4),
        "per_interaction": [
            {"i": i, "ndcg@10": round(float(mean_in[i]), 4),
             "gap_to_fresh": round(float(mean_in[i]) - mean_fresh, 4),
             "recovered_share": round(sum(r is not None and r <= i for r in recover)
                                      / n_sessions, 4)}
            for i in range(steps)],
        "interactions_to_recover": on_means,
        "interactions_to_recover_mean": round(float(np.mean(per_session)), 4),
        "interactions_to_recover_median": float(np.median(per_session)),
        "unrecovered_sessions": sum(r is None for r in recover),
        "old_need_share_top10": round(float(share_old.mean()), 4),
        "old_need_share_top10_fresh": round(float(share_old_fresh.mean()), 4),
        "shift_detected_share": round(shifts_detected / n_sessions, 4),
        "events": shopper.n_events - events_before,
    }


# -- the chart ----------------------------------------------------------------------------


def write_chart(curve: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """PNG of nDCG@10 against the number of simulated events, for seen and unseen queries."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, whatever the environment says
    import matplotlib.pyplot as plt

    events = [p["events"] for p in curve]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    try:
        for name, colour in (("seen", "tab:blue"), ("unseen", "tab:orange")):
            values = [p[name]["ndcg@10"] for p in curve]
            label = (f"{name} queries ({curve[0][name]['n_queries']}): "
                     f"{values[0]:.3f} -> {values[-1]:.3f}")
            ax.plot(events, values, marker="o", color=colour, label=label)
            ax.axhline(values[0], color=colour, linestyle=":", linewidth=1)
        ax.set_xlabel("simulated feedback events (impressions, clicks, carts, purchases)")
        ax.set_ylabel("nDCG@10 (full-catalogue retrieval)")
        ax.set_title(title or "Learning from simulated clicks", fontsize=10)
        lows = [p[n]["ndcg@10"] for p in curve for n in ("seen", "unseen")]
        ax.set_ylim(max(0.0, math.floor(min(lows) * 20) / 20 - 0.05), 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
