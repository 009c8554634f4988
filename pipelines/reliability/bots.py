"""Bot and fake-click campaign: scripted bots beside simulated shoppers, through the real
feedback path, counting what the bot filter (:mod:`pipelines.learning.abuse`) drops.

The shop is a live release: a home's, or one built from a slice of CrowdFlower (its judged
queries with the fewest judged products, their products and some others). Shoppers are the
click simulator's (:mod:`pipelines.offline.simulate`): one query a session, a page of ten
results as the shop serves it, the position-based click model on human labels, carts and
purchases, a few seconds between actions, every event sent as it happens. Sessions arrive at
random over ``rounds`` rounds of ten simulated minutes; after each round the real nearline
updater applies the round's events, and the next round is served by its checkpoint.

From the second round on (until five minutes before the end, so that every click the filter
holds is settled when the campaign ends), one attacker promotes one item: the item the shop
ranks 25th for one of the queries. Its scripts, each a kind of bot a shop meets:

* ``burst``: one session clicks the item twenty times in four seconds, nothing shown;
* ``unshown``: a slow clicker below the rate limit, a new session per click, half of its
  clicks on the item and half on random items for random queries, never shown any;
* ``deep``: a headless browser: the real result pages down to the item, a pause, a click,
  sometimes an add-to-cart;
* ``planted``: the real first page with the item put in at a random position, a pause, a
  click, sometimes a cart and a purchase;
* ``clockwork``: ``planted`` from a scheduler, one session every 45 s;
* ``replay``: one recorded ``planted`` session played back with new ids at later times;
* ``forger``: an add-to-cart and a purchase of the item, no impression, no click.

Each script uses a new session (bots mint session ids for free), half of them with a user id
of their own, half anonymous. The same shoppers, without the attacker, run in a second
workspace: the item's rank there is what the attack is measured against.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from serving.encoder import Encoder
from serving.errors import InvalidInputError, ReleaseError
from serving.schema import ITEM_ID
from serving.settings import Settings

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
T0 = 1_700_000_000.0        # simulated unix time of the campaign's start
ROUND_S = 600.0             # simulated seconds a round lasts
ATTACK_RANK = 25            # the attacked item: the one the untrained shop ranks here
DEPTH = 100                 # how deep ranks are looked up
PAGE = 10                   # what the shop shows a shopper
BURST_CLICKS = 20
CLOCKWORK_S = 45.0
KINDS = ("burst", "unshown", "deep", "planted", "clockwork", "replay", "forger")


def slice_judged(data: Path, out: Path, n_queries: int = 12,
                 n_distractors: int = 100) -> tuple[Path, Path]:
    """The ``n_queries`` judged queries of ``data`` (a directory with ``products.parquet`` and
    ``judgments.parquet``, CrowdFlower's schema) with the fewest judged products, at least one
    of them relevant (label 3 or more); their judged products and ``n_distractors`` others.
    Returns (products, judgments) written under ``out``."""
    judgments = pl.read_parquet(data / "judgments.parquet")
    sizes = (judgments.group_by("query_id")
             .agg(pl.len().alias("judged"), (pl.col("relevance") >= 3).sum().alias("relevant"))
             .filter(pl.col("relevant") >= 1)
             .sort("judged", "query_id"))
    judgments = judgments.filter(
        pl.col("query_id").is_in(sizes["query_id"].head(n_queries).implode()))
    products = pl.read_parquet(data / "products.parquet")
    judged = products["product_id"].is_in(judgments["product_id"].implode())
    out.mkdir(parents=True, exist_ok=True)
    pl.concat([products.filter(judged), products.filter(~judged).head(n_distractors)]
              ).write_parquet(out / "products.parquet")
    judgments.write_parquet(out / "judgments.parquet")
    return out / "products.parquet", out / "judgments.parquet"


def _workspace(shop: Path, path: Path, settings: Settings) -> Settings:
    """A private home at ``path``: a copy of ``shop``'s live release, no events, no ranker."""
    from serving.release import Pointer, read_pointer, write_pointer

    pointer = read_pointer(shop / "releases")
    if pointer is None:
        raise ReleaseError(f"no release is live under {shop / 'releases'}")
    shutil.rmtree(path, ignore_errors=True)
    (path / "releases").mkdir(parents=True)
    shutil.copytree(shop / "releases" / pointer.release_id, path / "releases" / pointer.release_id)
    write_pointer(path / "releases", Pointer(pointer.release_id, pointer.generation))
    return settings.model_copy(update={"home": path})


class _Traffic:
    """Builds one round's events: raw event mappings with client time ``ts`` and the server's
    receive time ``received`` (each event sent as it happens, 50-400 ms on the way)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.owner: dict[str, str] = {}      # event id -> "human" or the bot kind
        self.n = 0

    def rng(self, *key: object) -> random.Random:
        # one generator per session: the shoppers of the two workspaces make the same draws
        # whatever pages they are shown
        return random.Random(":".join(map(str, (self.seed, *key))))

    def add(self, raw: dict[str, Any], owner: str, rng: random.Random) -> None:
        self.n += 1
        raw.setdefault("event_id", f"ev{self.seed}-{self.n}")
        self.owner[raw["event_id"]] = owner
        self.events.append((raw["ts"] + rng.uniform(0.05, 0.4), raw))


def _humans(traffic: _Traffic, rec: Any, start: float, first: int, count: int,
            texts: dict[int, str], gains: dict[int, dict[str, float]], model: Any) -> None:
    """``count`` shoppers, as the click simulator's, arriving at random in the round."""
    # the click simulator's own shopper: its ids, its clock, its pauses between actions
    from pipelines.offline.simulate import SHOWN, _Shopper

    qids = sorted(texts)
    pages: dict[int, list[str]] = {}
    for n in range(first, first + count):
        rng = traffic.rng("human", n)
        qid = qids[rng.randrange(len(qids))]
        if qid not in pages:
            pages[qid] = [r.item_id for r in rec.recommend(texts[qid], k=SHOWN)]
        items = pages[qid]
        shopper = _Shopper(run=f"h{traffic.seed}", rng=rng, n_sessions=n)
        session = shopper.new_session(start + rng.uniform(0.0, ROUND_S))
        text = texts[qid]
        events = shopper.browse(session, text, items, model, gains[qid], rng)
        for raw in events:
            raw["event_id"] = f"h{traffic.seed}-{n}-{raw['event_id'].rsplit('-', 1)[1]}"
            traffic.add(raw, "human", rng)


class _Attacker:
    """The scripts of one attacker promoting ``item`` for ``query`` (see the module docstring)."""

    def __init__(self, traffic: _Traffic, query: str, item: str, catalogue: list[str],
                 queries: list[str]) -> None:
        self.traffic, self.query, self.item = traffic, query, item
        self.catalogue, self.queries = catalogue, queries
        self.recorded: list[dict[str, Any]] | None = None   # what ``replay`` plays back
        self.n = 0

    def _session(self, kind: str, rng: random.Random) -> tuple[str, str | None]:
        self.n += 1
        user = f"{kind}-user-{self.n}" if rng.random() < 0.5 else None
        return f"bot{self.traffic.seed}-{kind}-{self.n}", user

    def _event(self, session: tuple[str, str | None], etype: str, item: str, position: int | None,
               ts: float, query: str | None = None) -> dict[str, Any]:
        raw = {"ts": ts, "session_id": session[0], "query": query or self.query, ITEM_ID: item,
               "type": etype, "position": position}
        if session[1] is not None:
            raw["user_id"] = session[1]
        return raw

    def _page(self, session: tuple[str, str | None], page: list[str], ts: float,
              rng: random.Random, cart: float = 0.0, buy: float = 0.0) -> list[dict[str, Any]]:
        """Impressions of ``page`` (shown at once), a pause, a click on the item wherever
        it is on the page, perhaps a cart and a purchase."""
        events = [self._event(session, "impression", it, p, ts + 0.001 * p)
                  for p, it in enumerate(page, start=1)]
        pos = page.index(self.item) + 1
        t = ts + 0.001 * len(page) + rng.uniform(2.0, 8.0)
        events.append(self._event(session, "click", self.item, pos, t))
        if rng.random() < cart:
            t += rng.uniform(3.0, 10.0)
            events.append(self._event(session, "add_to_cart", self.item, pos, t))
            if rng.random() < buy:
                events.append(self._event(session, "purchase", self.item, pos,
                                          t + rng.uniform(5.0, 15.0)))
        return events

    def run(self, kind: str, ts: float, rng: random.Random, served: list[str]) -> None:
        """One script run of ``kind`` starting at ``ts``; ``served``: the shop's ranking for
        the query now (what a bot that asks the shop sees)."""
        rank = served.index(self.item) + 1 if self.item in served else ATTACK_RANK
        session = self._session(kind, rng)
        if kind == "burst":
            events = [self._event(session, "click", self.item, rank, ts + 0.2 * i)
                      for i in range(BURST_CLICKS)]
        elif kind == "unshown":
            if rng.random() < 0.5:
                events = [self._event(session, "click", self.item, rank, ts)]
            else:
                events = [self._event(session, "click", rng.choice(self.catalogue),
                                      rng.randint(1, PAGE), ts, rng.choice(self.queries))]
        elif kind == "deep":
            page = [it for it in served if it != self.item][:rank - 1] + [self.item]
            events = self._page(session, page, ts, rng, cart=0.3)
        elif kind in ("planted", "clockwork", "replay") and not (
                kind == "replay" and self.recorded is not None):
            page = [it for it in served[:PAGE] if it != self.item][:PAGE - 1]
            page.insert(rng.randrange(PAGE), self.item)
            events = self._page(session, page, ts, rng, cart=0.3, buy=0.3)
            if kind == "replay":
                self.recorded = events
        elif kind == "replay":
            assert self.recorded is not None
            shift = ts - self.recorded[0]["ts"]
            events = [{**{k: v for k, v in raw.items() if k not in ("event_id", "user_id")},
                       "ts": raw["ts"] + shift, "session_id": session[0]}
                      for raw in self.recorded]
            for raw in events:
                if session[1] is not None:
                    raw["user_id"] = session[1]
        elif kind == "forger":
            t = ts + rng.uniform(3.0, 10.0)
            events = [self._event(session, "add_to_cart", self.item, rank, ts),
                      self._event(session, "purchase", self.item, rank, t)]
        else:
            raise InvalidInputError(f"unknown bot kind {kind!r}")
        for raw in events:
            self.traffic.add(raw, kind, rng)


def _bot_times(kind: str, count: int, rounds: int, rng: random.Random) -> list[float]:
    """When each of ``count`` script runs of ``kind`` starts: at random from the second round
    on, or every :data:`CLOCKWORK_S` seconds for ``clockwork``; all before the last
    :data:`~pipelines.learning.abuse.HOLD_S` seconds, so that the filter has settled every
    click it held when the campaign ends."""
    from pipelines.learning.abuse import HOLD_S

    start, span = T0 + ROUND_S, (rounds - 1) * ROUND_S - HOLD_S
    if kind == "clockwork":
        every = min(CLOCKWORK_S, span / max(count, 1))
        return [start + k * every + rng.uniform(-0.5, 0.5) + 1.0 for k in range(count)]
    return sorted(start + rng.uniform(0.0, span) for _ in range(count))


def _record(rec: Any, traffic: _Traffic, key: bytes) -> int:
    """Store the round's events in the workspace's log in the order the server got them."""
    from dataclasses import replace

    from serving.events import parse_event

    traffic.events.sort(key=lambda pair: pair[0])
    events = [replace(parse_event(raw, key, rec.settings.max_query_chars), received=received)
              for received, raw in traffic.events]
    rec.event_log.append(events)
    traffic.events.clear()
    return len(events)


def _rank(rec: Any, query: str, item: str) -> int | None:
    ranked = [r.item_id for r in rec.recommend(query, k=DEPTH)]
    return ranked.index(item) + 1 if item in ranked else None


def _campaign(settings: Settings, encoder: Encoder, seed: int, humans: int, bots: int,
              rounds: int, texts: dict[int, str], gains: dict[int, dict[str, float]],
              model: Any, target: tuple[str, str] | None) -> dict[str, Any]:
    """One workspace's run: ``rounds`` rounds of shoppers (and bots, given a ``target``), the
    nearline updater after each. Returns the target's rank and every event's outcome."""
    from pipelines.learning.abuse import HOLD
    from pipelines.learning.nearline import NearlineUpdater
    from pipelines.learning.replay import FeedbackReplay
    from serving.recommender import Recommender

    rec = Recommender.load(settings=settings, encoder=encoder, watch=False)
    updater = NearlineUpdater(settings, encoder)
    traffic = _Traffic(seed)
    key = b"bots-campaign"
    tried: Counter[str] = Counter()
    try:
        attacker = None
        plan: list[tuple[float, str]] = []
        if target is not None and bots > 0:
            catalogue = [str(i) for i in rec.bundle.items.item_ids.tolist()]
            attacker = _Attacker(traffic, target[0], target[1], catalogue, list(texts.values()))
            rng = traffic.rng("plan")
            for k, kind in enumerate(KINDS):
                count = bots // len(KINDS) + (k < bots % len(KINDS))
                plan += [(t, kind) for t in _bot_times(kind, count, rounds, rng)]
            plan.sort()
        per_round = [humans // rounds + (r < humans % rounds) for r in range(rounds)]
        events = 0
        for r in range(rounds):
            start = T0 + r * ROUND_S
            _humans(traffic, rec, start, sum(per_round[:r]), per_round[r], texts, gains, model)
            if attacker is not None:
                served = [x.item_id for x in rec.recommend(attacker.query, k=DEPTH)]
                for i, (t, kind) in enumerate(plan):
                    if start <= t < start + ROUND_S:
                        attacker.run(kind, t, traffic.rng("bot", i), served)
                        tried[kind] += 1
            events += _record(rec, traffic, key)
            updater.run_once()
            rec.reload()
        rank = _rank(rec, target[0], target[1]) if target is not None else None
        # every event's outcome, by the same replay the updater ran (same order, same state)
        replay = FeedbackReplay(updater.bundle, encoder, settings)
        outcome: dict[str, tuple[str, str | None]] = {}
        after = 0
        while batch := rec.event_log.read(after, 5000):
            for logged in batch:
                ev = logged.event
                replay.process(logged, derive=False)
                outcome[ev.event_id] = (ev.type, HOLD if ev.event_id in replay.held
                                        else replay.last_drop)
                for event_id, reason in replay.last_settled:
                    outcome[event_id] = (outcome[event_id][0], reason)
            after = batch[-1].offset
        return {"rank": rank, "outcome": outcome, "owner": traffic.owner, "tried": tried,
                "events": events, "counters": dict(sorted(updater.stats.counters.items()))}
    finally:
        updater.close()
        rec.close()


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def _tally(run: dict[str, Any]) -> dict[str, Any]:
    """Drop figures by owner (human, each bot kind) and reason. An event still held when the
    campaign ends counts against the filter: a bot's as kept, a shopper's as dropped."""
    from pipelines.learning.abuse import HOLD

    positives: dict[str, Counter[str]] = {}
    by_reason: dict[str, Counter[str]] = {}
    impressions: dict[str, Counter[str]] = {}
    held: Counter[str] = Counter()
    for event_id, (etype, drop) in run["outcome"].items():
        owner = run["owner"].get(event_id, "other")
        who = "human" if owner == "human" else "bot"
        table = impressions if etype == "impression" else positives
        table.setdefault(owner, Counter())["events"] += 1
        if drop == HOLD:
            held[who] += 1
            table[owner]["dropped"] += who == "human"
        elif drop is not None:
            table[owner]["dropped"] += 1
            by_reason.setdefault(drop, Counter())[who] += 1
    bot_events = sum(c["events"] for o, c in positives.items() if o != "human")
    bot_dropped = sum(c["dropped"] for o, c in positives.items() if o != "human")
    human = positives.get("human", Counter())
    return {
        "bot_events": bot_events, "bot_dropped": bot_dropped,
        "bot_dropped_share": _share(bot_dropped, bot_events),
        "human_events": human["events"], "human_dropped": human["dropped"],
        "human_dropped_share": _share(human["dropped"], human["events"]),
        "by_reason": {r: dict(c) for r, c in sorted(by_reason.items())},
        "by_kind": {o: {"tried": run["tried"].get(o, 0), "events": c["events"],
                        "dropped": c["dropped"]}
                    for o, c in sorted(positives.items()) if o != "human"},
        "impressions": {"human": impressions.get("human", Counter())["events"],
                        "human_dropped": impressions.get("human", Counter())["dropped"],
                        "bot": sum(c["events"] for o, c in impressions.items() if o != "human"),
                        "bot_dropped": sum(c["dropped"] for o, c in impressions.items()
                                           if o != "human")},
        "held_at_end": dict(held),
    }


def _golden_judgments(path: Path, catalogue: set[str]) -> Any:
    """Golden queries (the gate's ``{"query", "expected"}`` file) as judgments: each query's
    expected items relevant (gain 1), everything else not."""
    from pipelines.catalogue.gate import load_golden
    from pipelines.offline.judged import Judgments
    from serving.schema import QUERY_ID

    rows = [(qid, entry["query"], str(item), 1.0)
            for qid, entry in enumerate(load_golden(path), start=1)
            for item in entry["expected"] if str(item) in catalogue]
    if not rows:
        raise InvalidInputError(f"none of the expected items of the golden queries {path} "
                                "is in the live release: pass judgments for its catalogue")
    frame = pl.DataFrame(rows, schema=[QUERY_ID, "query", ITEM_ID, "relevance"], orient="row")
    return Judgments(frame, 0.0, 1.0)


def _shoppers_judgments(shop: Settings, judgments: Path | None, catalogue: set[str]) -> Any:
    """What the shoppers of an existing home click by: ``judgments``, else the settings'
    judgments, else the gate's golden queries (the demo's for the demo catalogue)."""
    from pipelines.catalogue.gate import DEMO_GOLDEN
    from pipelines.offline.judged import load_judgments

    path = judgments or shop.judgments
    if path is not None:
        return load_judgments(Path(path))
    return _golden_judgments(shop.golden_queries or DEMO_GOLDEN, catalogue)


def run_bots(home: Path | None = None, seed: int = 0, humans: int = 3000, bots: int = 700,
             rounds: int = 4, judgments: Path | None = None, data: Path | None = None,
             queries: int = 12, encoder: Encoder | None = None,
             settings: Settings | None = None) -> dict[str, Any]:
    """Run the campaign (see the module docstring) and count what was dropped.

    Arguments:
        home: the shop to attack: a home with a live release, left as it is (the campaign
            runs in copies of the release under ``<home>/bench/reliability/bots/``, rebuilt every run); its
            shoppers click by ``judgments`` (a judged file for its catalogue), else the
            settings' judgments, else the gate's golden queries. None: a shop built from a
            slice of ``data`` (CrowdFlower's schema; default ``../shared/data/crowdflower``,
            its ``queries`` judged queries with the fewest judged products) in a temporary
            directory, removed afterwards.
        seed: seeds the shoppers, the attacked query and the scripts.
        humans: simulated shopping sessions in all (each one query, one page).
        bots: scripted bot sessions in all, spread evenly over the seven kinds.
        rounds: rounds of ten simulated minutes (at least 2: the attack starts in the second).
        settings: the filter's and updater's settings (default: read from the environment).

    Returns ``tried`` (bot sessions scripted), ``bot_events`` and ``human_events`` (positive
    events: clicks, carts, purchases), how many of each were dropped and the shares,
    ``attack`` (the item, its rank before, without the attack and after it; ``moved``: how
    many places the attack won it), the drops ``by_reason`` (bot and human), per bot kind,
    and impressions, and the attacked workspace's ``updater_counters``.
    """
    from pipelines.offline.judged import load_judgments
    from pipelines.offline.simulate import ClickModel
    from pipelines.steps import run_build
    from serving.layout import bench_dir
    from serving.recommender import Recommender

    if rounds < 2:
        raise InvalidInputError(f"rounds must be at least 2 (the attack starts in the second), "
                                f"got {rounds}")
    base = settings or Settings()
    temporary = home is None
    work = Path(tempfile.mkdtemp(prefix="instantrec-bots-")) if home is None else (
        bench_dir(Path(home)) / "reliability" / "bots")
    try:
        encoder = encoder or Encoder(base.encoder_path, max_length=base.item_max_tokens,
                                     precision=base.embed_precision)
        if home is None:
            products, judged_path = slice_judged(data or SHARED_DATA / "crowdflower",
                                                 work / "data", queries)
            shop = base.model_copy(update={"home": work / "shop"})
            build = run_build(shop, catalogue=products, golden=None, register=False,
                              encoder=encoder)
            if not build["publish"]["live"]:
                raise ReleaseError(f"release {build['publish']['release_id']} is not live")
            judged = load_judgments(judged_path)
        else:
            shop = base.model_copy(update={"home": Path(home)})
            judged = None
        with Recommender.load(settings=shop, encoder=encoder, watch=False) as rec:
            if judged is None:
                catalogue = {str(i) for i in rec.bundle.items.item_ids.tolist()}
                judged = _shoppers_judgments(shop, judgments, catalogue)
            texts = {qid: q[:base.max_query_chars] for qid, q in judged.queries().iter_rows()}
            qids = sorted(texts)
            query = texts[qids[random.Random(f"{seed}:query").randrange(len(qids))]]
            ranked = [r.item_id for r in rec.recommend(query, k=DEPTH)]
        if len(ranked) < ATTACK_RANK:
            raise InvalidInputError(f"{query!r} has only {len(ranked)} results: no item ranked "
                                    f"{ATTACK_RANK} to attack")
        item = ranked[ATTACK_RANK - 1]
        model = ClickModel.for_judgments(judged)
        gains = judged.gains()
        log.info("attacking %s (rank %d) for %r: %d shoppers, %d bot sessions, %d rounds",
                 item, ATTACK_RANK, query, humans, bots, rounds)

        control = _campaign(_workspace(shop.home, work / "control", shop), encoder, seed,
                            humans, 0, rounds, texts, gains, model, (query, item))
        attacked = _campaign(_workspace(shop.home, work / "attacked", shop), encoder, seed,
                             humans, bots, rounds, texts, gains, model, (query, item))
        figures = _tally(attacked)
        moved = (control["rank"] or DEPTH + 1) - (attacked["rank"] or DEPTH + 1)
        return {
            "tried": sum(attacked["tried"].values()),
            **{k: figures[k] for k in ("bot_events", "bot_dropped", "bot_dropped_share",
                                       "human_events", "human_dropped",
                                       "human_dropped_share")},
            "attack": {"query": query, "item": item, "rank_before": ATTACK_RANK,
                       "rank_without_attack": control["rank"], "rank_after": attacked["rank"],
                       "moved": moved},
            "by_reason": figures["by_reason"],
            "by_kind": figures["by_kind"],
            "impressions": figures["impressions"],
            "held_at_end": figures["held_at_end"],
            "events": {"control": control["events"], "attacked": attacked["events"]},
            "updater_counters": attacked["counters"],
            "humans": humans, "bots": bots, "rounds": rounds, "seed": seed,
        }
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="the bot and fake-click campaign")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--humans", type=int, default=3000)
    parser.add_argument("--bots", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--judgments", type=Path, default=None)
    args = parser.parse_args()
    print(json.dumps(run_bots(args.home, args.seed, args.humans, args.bots, args.rounds,
                              judgments=args.judgments), indent=2))


if __name__ == "__main__":
    main()
