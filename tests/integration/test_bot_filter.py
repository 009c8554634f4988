"""The bot filter on the real feedback path: a scripted bot campaign beside simulated shoppers
on a real CrowdFlower release, through the real nearline updater; and a restarted updater that
must end exactly where an uninterrupted one ends although bots were dropped all along."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace

import numpy as np
import pytest

from pipelines.learning.abuse import REASONS
from pipelines.learning.nearline import NearlineUpdater
from pipelines.reliability.bots import KINDS, run_bots
from serving import Recommender
from serving.checkpoint import read_latest
from serving.eventlog import SqliteEventLog
from serving.events import parse_event
from serving.ranker import Ranker
from serving.settings import Settings
from tests.conftest import make_settings

HUMANS, BOTS, ROUNDS = 1200, 210, 3


def test_a_bot_campaign_is_dropped_and_moves_its_item_nowhere(shared_data, encoder):
    report = run_bots(None, seed=0, humans=HUMANS, bots=BOTS, rounds=ROUNDS, encoder=encoder,
                      data=shared_data / "crowdflower")

    # the thresholds
    assert report["bot_dropped_share"] >= 0.99
    assert report["human_dropped_share"] <= 0.005
    attack = report["attack"]
    assert attack["rank_before"] == 25 and attack["rank_without_attack"] is not None
    assert attack["moved"] <= 1

    # every kind of script ran and sent positives; the shares are what the counts say
    assert report["tried"] == BOTS
    assert set(report["by_kind"]) == set(KINDS)
    assert all(k["tried"] == BOTS // len(KINDS) and k["events"] >= k["tried"]
               for k in report["by_kind"].values())
    assert report["bot_events"] == sum(k["events"] for k in report["by_kind"].values())
    assert report["bot_dropped_share"] == pytest.approx(
        report["bot_dropped"] / report["bot_events"], abs=1e-6)
    assert report["human_events"] > HUMANS  # clicks, carts and purchases of real labels
    assert report["impressions"]["human"] == HUMANS * 10

    # the updater counted each drop by reason, as the per-event accounting did
    counters = report["updater_counters"]
    assert {r for r in report["by_reason"]} <= set(REASONS) | {"abuse_dropped"}
    for reason, by in report["by_reason"].items():
        assert counters[reason] == sum(by.values()), reason
    assert {"bot_no_impression", "bot_no_click", "bot_page", "bot_depth"} <= set(counters)


def test_without_the_filter_the_same_attack_moves_the_item(shared_data, encoder):
    """What the campaign measures is real: the attack works on a shop that only rate-limits."""
    report = run_bots(None, seed=0, humans=600, bots=140, rounds=2, encoder=encoder,
                      data=shared_data / "crowdflower", settings=Settings(bot_filter=False))
    assert report["attack"]["moved"] > 5
    assert report["bot_dropped_share"] < 0.9
    assert not {r for r in report["by_reason"] if r.startswith("bot_")}


# -- a restart with bots in the log -----------------------------------------------------------

T0 = 1_700_000_000.0


def long_stream(rec, hours: float = 3.0, seed: int = 3) -> list:
    """Shoppers (one page, position-biased clicks, some carts; one in five shown a page with
    two items from further down, as a new ranking would) and, one session in eight, a bot (a
    page with an item planted, a click on an item never shown, a purchase out of nowhere),
    every 15 s on average for ``hours``, each sent as it happens."""
    rng = random.Random(seed)
    queries = ["coffee maker", "yoga mat", "headphones", "cordless drill", "office chair"]
    pages = {q: [r.item_id for r in rec.recommend(q, k=30)] for q in queries}
    raw, t, n = [], T0, 0
    while t < T0 + hours * 3600:
        n += 1
        t += rng.expovariate(1 / 15)
        q, sid, user = rng.choice(queries), f"s{n}", f"u{rng.randrange(300)}"
        shown = pages[q][:10]
        kind = rng.choice(["planted", "unshown", "forger"]) if rng.random() < 0.125 else "human"
        if kind == "planted":
            shown = shown[:2] + [pages[q][25]] + shown[3:]
        elif rng.random() < 0.2:
            shown = shown[:6] + [pages[q][12], shown[7], pages[q][14], shown[9]]
        if kind != "unshown" and kind != "forger":
            raw += [{"event_id": f"{sid}-i{p}", "session_id": sid, "user_id": user, "query": q,
                     "item_id": it, "type": "impression", "position": p, "ts": t + 0.001 * p}
                    for p, it in enumerate(shown, start=1)]
        clock = t + rng.uniform(2.0, 8.0)
        if kind == "human":
            for p, it in enumerate(shown, start=1):
                if rng.random() < 0.6 / p:
                    raw.append({"event_id": f"{sid}-c{p}", "session_id": sid, "user_id": user,
                                "query": q, "item_id": it, "type": "click", "position": p,
                                "ts": clock})
                    if rng.random() < 0.2:
                        raw.append({"event_id": f"{sid}-a{p}", "session_id": sid,
                                    "user_id": user, "query": q, "item_id": it,
                                    "type": "add_to_cart", "position": p, "ts": clock + 4.0})
                    clock += rng.uniform(5.0, 20.0)
        elif kind == "planted":
            raw.append({"event_id": f"{sid}-c", "session_id": sid, "query": q,
                        "item_id": pages[q][25], "type": "click", "position": 3, "ts": clock})
        elif kind == "unshown":
            raw.append({"event_id": f"{sid}-c", "session_id": sid, "user_id": user, "query": q,
                        "item_id": pages[q][rng.randrange(30)], "type": "click",
                        "position": rng.randint(1, 10), "ts": clock})
        else:
            raw.append({"event_id": f"{sid}-p", "session_id": sid, "query": q,
                        "item_id": pages[q][20], "type": "purchase", "ts": clock})
    raw.sort(key=lambda e: e["ts"])
    return [replace(parse_event(e, b"k"), received=e["ts"] + 0.2) for e in raw]


def test_a_restarted_updater_with_bots_in_the_log_ends_as_an_uninterrupted_one(
        demo_copy, encoder, tmp_path):
    reference_home = tmp_path / "reference"
    shutil.copytree(demo_copy, reference_home)
    rec = Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                           watch=False)
    events = long_stream(rec)
    rec.close()
    # stop after two hours and a quarter: longer ago than the warm-up replay reaches back
    cut = next(i for i, e in enumerate(events) if e.ts >= T0 + 2.25 * 3600)

    SqliteEventLog(reference_home / "events" / "events.db").append(events)
    reference = NearlineUpdater(make_settings(reference_home), encoder).run_once()

    log = SqliteEventLog(demo_copy / "events" / "events.db")
    log.append(events[:cut])
    first = NearlineUpdater(make_settings(demo_copy), encoder)
    first.run_once()
    warm_from = first.replay.warm_from(first.offset)
    first.close()
    log.append(events[cut:])
    resumed = NearlineUpdater(make_settings(demo_copy), encoder).run_once()

    # the warm-up replay started well after the first event: the window, not the whole log
    assert 1000 < warm_from < cut
    counters = reference["counters"]
    assert counters["bot_page"] > 0 and counters["bot_no_impression"] > 0
    assert counters["bot_no_click"] > 0 and counters["positives"] > 0
    assert counters["bot_held"] > 0     # clicks on what may be a new ranking waited
    assert resumed["offset"] == reference["offset"] == len(events)
    assert resumed["applied_total"] == reference["applied_total"]
    assert resumed["ledger"] == reference["ledger"]
    assert resumed["counters"] == counters
    a = Ranker.load(demo_copy / "rankers" / read_latest(demo_copy).file)
    b = Ranker.load(reference_home / "rankers" / read_latest(reference_home).file)
    for name in ("w", "b0", "item_bias"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)
    assert a.query_item.keys() == b.query_item.keys()
    for key, value in a.query_item.items():
        assert value == pytest.approx(b.query_item[key], rel=1e-9, abs=1e-12)
