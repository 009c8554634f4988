"""Each rule of the bot filter on tiny event lists whose outcome is worked out by hand."""

from __future__ import annotations

import itertools

import pytest

from pipelines.learning.abuse import (
    DEPTH_MIN_SESSIONS,
    HOLD,
    HOLD_S,
    PAGE_MIN_SESSIONS,
    REASONS,
    BotFilter,
    BotRules,
    lookback_s,
)
from serving.events import Event
from serving.settings import Settings

T0 = 1_700_000_000.0
_ids = itertools.count()


def ev(etype: str, session: str, item: str, ts: float, query: str | None = "tent",
       position: int | None = None, user: str | None = None,
       received: float | None = None) -> Event:
    return Event(f"e{next(_ids)}", T0 + ts, session, user, query, item, etype, position,
                 None if received is None else T0 + received)


def page(f: BotFilter, session: str, items: list[str], ts: float, query: str = "tent",
         user: str | None = None) -> None:
    """Show ``items`` at positions 1.. to ``session``; none may be dropped."""
    for p, item in enumerate(items, start=1):
        assert f.impression(ev("impression", session, item, ts, query, p, user)) is None


def judge(f: BotFilter, event: Event) -> str | None:
    reason = f.positive(event) if event.type != "impression" else f.impression(event)
    assert reason is None or reason in (*REASONS, HOLD)
    return reason


PAGE_A = [f"a{i}" for i in range(1, 11)]


def test_rules_follow_the_settings():
    rules = BotRules.from_settings(Settings(bot_window_s=60.0, bot_page_min_passed=3,
                                            bot_regular_events=5, bot_filter=False))
    assert rules == BotRules(enabled=False, window_s=60.0, page_min_passed=3,
                             depth_min_share=0.01, regular_events=5, regular_cv=0.05)
    assert BotRules.from_settings(Settings()) == BotRules()
    # a flag lasts a window and is set by a rule that looks a window back
    assert lookback_s(BotRules(window_s=900.0)) == 2 * 900.0 + HOLD_S
    assert lookback_s(BotRules(enabled=False)) == 0.0


def test_a_disabled_filter_keeps_everything():
    f = BotFilter(BotRules(enabled=False))
    assert judge(f, ev("click", "s", "x", 1.0, position=3)) is None
    assert judge(f, ev("purchase", "s", "y", 2.0)) is None


def test_a_click_on_an_item_never_shown_is_dropped():
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b"], 0.0)
    assert judge(f, ev("click", "s1", "c", 5.0, position=3)) == "bot_no_impression"
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b"], 0.0)
    assert judge(f, ev("click", "s1", "b", 5.0, position=2)) is None
    # shown to another session, or for another query, is not shown to this one
    assert judge(f, ev("click", "s2", "b", 5.0, position=2)) == "bot_no_impression"
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b"], 0.0, query="tent")
    assert judge(f, ev("click", "s1", "b", 5.0, query="stove", position=2)) == (
        "bot_no_impression")
    # an event that names no query: shown for any query is enough
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b"], 0.0, query="tent")
    assert judge(f, ev("click", "s1", "a", 6.0, query=None)) is None


def test_an_impression_older_than_the_window_no_longer_counts():
    f = BotFilter(BotRules(window_s=60.0))
    page(f, "s1", ["a"], 0.0)
    assert judge(f, ev("click", "s1", "a", 61.0, position=1)) == "bot_no_impression"
    f = BotFilter(BotRules(window_s=60.0))
    page(f, "s1", ["a"], 0.0)
    assert judge(f, ev("click", "s1", "a", 60.0, position=1)) is None


def test_an_add_to_cart_needs_the_item_shown_or_clicked():
    f = BotFilter(BotRules())
    assert judge(f, ev("add_to_cart", "s1", "a", 1.0)) == "bot_no_impression"
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b"], 0.0)
    assert judge(f, ev("add_to_cart", "s1", "b", 3.0, position=2)) is None
    # from the product page (no query): the session clicked it
    assert judge(f, ev("click", "s1", "a", 4.0, position=1)) is None
    assert judge(f, ev("add_to_cart", "s1", "a", 9.0, query=None)) is None


def test_a_purchase_needs_a_click_or_cart_by_the_session_or_the_user():
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b"], 0.0, user="u1")
    # shown is not enough: nobody clicked it
    assert judge(f, ev("purchase", "s1", "a", 5.0, position=1, user="u1")) == "bot_no_click"
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b"], 0.0, user="u1")
    assert judge(f, ev("click", "s1", "b", 5.0, position=2, user="u1")) is None
    assert judge(f, ev("purchase", "s1", "b", 9.0, query=None, user="u1")) is None
    # checkout in another session of the same user
    assert judge(f, ev("purchase", "s2", "b", 20.0, query=None, user="u1")) is None
    # another user's session, or another item
    assert judge(f, ev("purchase", "s3", "b", 21.0, query=None, user="u2")) == "bot_no_click"
    assert judge(f, ev("purchase", "s1", "a", 22.0, user="u1")) == "bot_no_click"


def test_a_click_at_a_position_the_item_was_not_shown_at_is_dropped():
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b", "c"], 0.0)
    assert judge(f, ev("click", "s1", "c", 4.0, position=1)) == "bot_position"
    f = BotFilter(BotRules())
    page(f, "s1", ["a", "b", "c"], 0.0)
    assert judge(f, ev("click", "s1", "c", 4.0, position=3)) is None
    # no position given: nothing to contradict
    assert judge(f, ev("click", "s1", "b", 9.0)) is None


def test_what_was_caught_stays_caught_for_the_window_impressions_and_user_included():
    f = BotFilter(BotRules(window_s=100.0))
    page(f, "s1", ["a", "b"], 0.0, user="u1")
    assert judge(f, ev("click", "s1", "z", 1.0, position=1, user="u1")) == "bot_no_impression"
    assert judge(f, ev("click", "s1", "a", 2.0, position=1, user="u1")) == "bot_flagged"
    assert judge(f, ev("impression", "s1", "a", 3.0, position=1, user="u1")) == "bot_flagged"
    # the same user in a new session, and the session without the user id
    assert judge(f, ev("impression", "s2", "a", 4.0, position=1, user="u1")) == "bot_flagged"
    assert judge(f, ev("click", "s1", "b", 5.0, position=2)) == "bot_flagged"
    # others are not affected; and after the window it is forgiven
    assert judge(f, ev("impression", "s3", "a", 6.0, position=1)) is None
    assert judge(f, ev("impression", "s1", "a", 101.5, position=1, user="u1")) is None
    assert judge(f, ev("click", "s1", "a", 105.0, position=1, user="u1")) is None


def test_the_flag_counts_by_the_servers_clock():
    f = BotFilter(BotRules(window_s=100.0))
    assert judge(f, ev("click", "s1", "z", 0.0, position=1, received=0.0)) == (
        "bot_no_impression")
    # a client timestamp 200 s later does not outrun it: the server got it 1 s later
    assert judge(f, ev("impression", "s1", "a", 200.0, position=1, received=1.0)) == (
        "bot_flagged")


def _sessions_shown(f: BotFilter, n: int, items: list[str], ts: float = 0.0,
                    query: str = "tent", prefix: str = "h", click: bool = False) -> None:
    """``n`` new sessions shown ``items``, a second apart; with ``click``, each clicks the
    first."""
    for i in range(n):
        page(f, f"{prefix}{i}", items, ts + i, query)
        if click:
            assert judge(f, ev("click", f"{prefix}{i}", items[0], ts + i + 0.5, query, 1)) is None


def test_a_click_deeper_than_the_shops_pages_go_is_dropped():
    f = BotFilter(BotRules())
    _sessions_shown(f, DEPTH_MIN_SESSIONS, PAGE_A, click=True)      # the shop shows ten
    deep = [f"d{i}" for i in range(1, 26)]
    page(f, "bot", deep, 100.0, query="stove")
    assert judge(f, ev("click", "bot", "d25", 105.0, "stove", 25)) == "bot_depth"
    f = BotFilter(BotRules())
    _sessions_shown(f, DEPTH_MIN_SESSIONS, PAGE_A, click=True)
    page(f, "s", deep, 100.0, query="stove")
    assert judge(f, ev("click", "s", "d10", 105.0, "stove", 10)) is None
    # sessions shown ten that chose nothing (or scripts waiting to click) are no evidence
    f = BotFilter(BotRules())
    _sessions_shown(f, DEPTH_MIN_SESSIONS, PAGE_A)
    page(f, "s", deep, 100.0, query="stove")
    assert judge(f, ev("click", "s", "d10", 105.0, "stove", 10)) == "bot_depth"


def test_depth_needs_evidence_and_a_share_of_deep_sessions_is_human():
    deep = [f"d{i}" for i in range(1, 26)]
    f = BotFilter(BotRules())
    _sessions_shown(f, DEPTH_MIN_SESSIONS - 1, PAGE_A, click=True)      # one session short
    page(f, "s", deep, 100.0, query="stove")
    assert judge(f, ev("click", "s", "d25", 105.0, "stove", 25)) is None
    # 1 in 50 sessions was shown 25 deep and clicked above: 2% >= 1%
    f = BotFilter(BotRules())
    _sessions_shown(f, DEPTH_MIN_SESSIONS - 1, PAGE_A, click=True)
    page(f, "other", deep, 60.0, query="stove")
    assert judge(f, ev("click", "other", "d3", 64.0, "stove", 3)) is None
    page(f, "s", deep, 100.0, query="stove")
    assert judge(f, ev("click", "s", "d25", 105.0, "stove", 25)) is None


def test_an_item_on_no_one_elses_first_page_is_a_made_up_page():
    planted = PAGE_A[:2] + ["x"] + PAGE_A[3:]
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    page(f, "bot", planted, 100.0)
    assert judge(f, ev("click", "bot", "x", 104.0, position=3)) == "bot_page"
    # the same page, a click on an item everyone was shown
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    page(f, "s", planted, 100.0)
    assert judge(f, ev("click", "s", "a2", 104.0, position=2)) is None


def test_a_made_up_page_needs_evidence_and_is_forgiven_a_share():
    planted = ["x"] + PAGE_A[1:]
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS - 1, PAGE_A)       # too few to tell
    page(f, "s", planted, 100.0)
    assert judge(f, ev("click", "s", "x", 104.0, position=1)) is None
    # one of the ten other new sessions was shown it and chose something else: served
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS - 1, PAGE_A)
    page(f, "other", planted, 50.0)
    assert judge(f, ev("click", "other", "a3", 55.0, position=3)) is None
    page(f, "s", planted, 100.0)
    assert judge(f, ev("click", "s", "x", 104.0, position=1)) is None
    # ... but a session that was shown it and chose nothing (yet) is no such evidence
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS - 1, PAGE_A)
    page(f, "other", planted, 50.0)
    page(f, "s", planted, 100.0)
    assert judge(f, ev("click", "s", "x", 104.0, position=1)) == "bot_page"
    # other queries' pages are no evidence
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A, query="stove")
    page(f, "s", planted, 100.0)
    assert judge(f, ev("click", "s", "x", 104.0, position=1)) is None


def test_a_page_shown_after_a_choice_is_personalised_not_made_up():
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    page(f, "s", PAGE_A, 100.0, query="stove")
    assert judge(f, ev("click", "s", "a1", 103.0, "stove", 1)) is None
    page(f, "s", ["x"] + PAGE_A[1:], 110.0)
    assert judge(f, ev("click", "s", "x", 114.0, position=1)) is None
    # a choice made on the made-up page itself changes nothing: the page was not personalised
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    page(f, "s", ["x"] + PAGE_A[1:], 110.0)
    assert judge(f, ev("click", "s", "a2", 113.0, position=2)) is None
    assert judge(f, ev("click", "s", "x", 116.0, position=1)) == "bot_page"


def test_made_up_pages_outnumbering_real_ones_are_still_made_up():
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    planted = ["x"] + PAGE_A[1:]
    # forty scripted sessions: soon most pages show "x", but everyone shown it clicked it
    for i in range(40):
        page(f, f"bot{i}", planted, 100.0 + 5 * i)
        assert judge(f, ev("click", f"bot{i}", "x", 103.0 + 5 * i + 0.01 * i,
                           position=1)) == "bot_page"


def test_an_item_on_nearly_every_page_may_be_clicked_by_all_who_saw_it():
    # a perfect first result: every shopper clicks it
    f = BotFilter(BotRules())
    starts = [0.0, 13.0, 21.0, 40.0, 44.0, 67.0, 90.0, 96.0, 120.0, 151.0]
    for i, t in enumerate(starts):
        page(f, f"h{i}", PAGE_A, t)
        assert judge(f, ev("click", f"h{i}", "a1", t + 2.0 + 0.01 * i, position=1)) is None
    page(f, "s", PAGE_A, 200.0)
    assert judge(f, ev("click", "s", "a1", 203.0, position=1)) is None


def _settled(f: BotFilter, event: Event) -> tuple[str | None, list]:
    """Judge ``event``, then settle held events as the replay does after every event."""
    return judge(f, event) if event.type != "impression" else f.impression(event), f.settle(event)


NEW_RANKING = ["a1", "n1", "a3", "a4", "n2"] + PAGE_A[5:]   # two items no one was shown yet


def test_a_click_on_what_may_be_a_new_ranking_waits_for_another_shopper():
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    page(f, "s", NEW_RANKING, 100.0)
    click, cart = ev("click", "s", "n1", 104.0, position=2), ev("add_to_cart", "s", "n1", 109.0,
                                                                position=2)
    assert _settled(f, click) == (HOLD, [])
    assert _settled(f, cart) == (HOLD, [])        # what the session does next with it waits too
    # the next new session is shown the new ranking too, and chooses something else
    page(f, "t", NEW_RANKING, 120.0)
    assert _settled(f, ev("click", "t", "a3", 125.0, position=3)) == (
        None, [(click.event_id, None), (cart.event_id, None)])
    assert f.holds == {} and f.holding == {}


def test_a_held_click_no_one_else_is_shown_is_dropped_after_the_hold():
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    page(f, "bot", NEW_RANKING, 100.0)
    click = ev("click", "bot", "n1", 104.0, position=2)
    assert _settled(f, click) == (HOLD, [])
    # shoppers keep being shown the old page and choosing from it: no evidence for n1
    for i, t in enumerate((150.0, 230.0, 330.0)):
        page(f, f"t{i}", PAGE_A, t)
        assert _settled(f, ev("click", f"t{i}", "a3", t + 4.0 + 0.1 * i, position=3)) == (
            None, [])
    assert _settled(f, ev("impression", "x", "a1", 104.0 + HOLD_S + 1.0, position=1)) == (
        None, [(click.event_id, "bot_page")])


def test_a_session_votes_once_for_an_item_and_is_not_flagged_for_a_double_click():
    f = BotFilter(BotRules(window_s=100.0))
    page(f, "s1", ["a", "b"], 0.0, user="u1")
    assert judge(f, ev("click", "s1", "b", 3.0, position=2, user="u1")) is None
    assert judge(f, ev("click", "s1", "b", 3.4, position=2, user="u1")) == "bot_repeat"
    # not a flag: its next choice counts
    assert judge(f, ev("add_to_cart", "s1", "b", 9.0, position=2, user="u1")) is None
    assert judge(f, ev("click", "s1", "a", 12.0, position=1, user="u1")) is None
    # the same item for another query, or after the window, is another vote
    page(f, "s1", ["b"], 20.0, query="stove", user="u1")
    assert judge(f, ev("click", "s1", "b", 24.0, "stove", 1, user="u1")) is None
    page(f, "s1", ["a", "b"], 110.0, user="u1")
    assert judge(f, ev("click", "s1", "b", 113.5, position=2, user="u1")) is None


def _clicks_at(f: BotFilter, times: list[float], user: str | None = None,
               item: str = "a") -> list[str | None]:
    """Sessions ``c0``, ``c1``, ... each shown ``item`` and clicking it at ``times``."""
    out = []
    for i, t in enumerate(times):
        page(f, f"c{i}", [item], t - 2.0 - 0.137 * i, user=user)
        out.append(judge(f, ev("click", f"c{i}", item, t, position=1, user=user)))
    return out


def test_clockwork_positives_are_a_scripts():
    # a user clicking every 30 s (+-0.1 s): the eighth click completes the pattern
    times = [30.0 * k + (0.1 if k % 2 else -0.1) for k in range(1, 9)]
    f = BotFilter(BotRules())
    assert _clicks_at(f, times, user="u1", item="a") == [None] * 7 + ["bot_regular"]
    assert judge(f, ev("impression", "c9", "a", 300.0, position=1, user="u1")) == "bot_flagged"
    # many anonymous sessions clicking one (query, item) on a schedule: the same
    f = BotFilter(BotRules())
    assert _clicks_at(f, times[:8])[-1] == "bot_regular"


def test_irregular_or_burst_positives_are_not_clockwork():
    f = BotFilter(BotRules())
    gaps = [30.0, 12.0, 41.0, 25.0, 33.0, 8.0, 50.0, 19.0]
    times = [sum(gaps[:k + 1]) for k in range(len(gaps))]
    assert _clicks_at(f, times, user="u1") == [None] * 8
    # a burst (0.5 s apart) is the rate limit's business, not this rule's
    f = BotFilter(BotRules())
    assert _clicks_at(f, [100.0 + 0.5 * k for k in range(8)]) == [None] * 8
    # eight regular clicks, but spread over more than the window: not eight in a window
    f = BotFilter(BotRules(window_s=100.0))
    assert _clicks_at(f, [20.0 * k for k in range(1, 9)]) == [None] * 8


def test_rebuilt_from_the_window_it_judges_as_the_uninterrupted_filter():
    """What the nearline updater relies on after a restart: a filter fed only the events of
    the last window takes the same decisions as one fed everything."""
    window, restart = 200.0, 1500.0
    events = []
    for i in range(200):
        t, user = 10.0 * i, f"u{i % 13}"
        items = PAGE_A if i % 10 else ["x"] + PAGE_A[1:]     # every tenth page made up
        if i % 7 == 3:
            items = NEW_RANKING                              # or perhaps a new ranking
        events += [ev("impression", f"s{i}", it, t, position=p, user=user)
                   for p, it in enumerate(items, start=1)]
        clicked = "zz" if i % 9 == 0 else items[i % 10]     # every ninth never shown
        position = i % 10 + 1
        if i % 7 == 3:
            clicked, position = "n1", 2
        events.append(ev("click", f"s{i}", clicked, t + 3.0 + 0.01 * i, position=position,
                         user=user))
        if i % 5 == 0:
            events.append(ev("purchase", f"s{i}", items[i % 10], t + 9.0, user=user))
    cut = next(k for k, e in enumerate(events) if e.ts >= T0 + restart)
    full = BotFilter(BotRules(window_s=window))
    decisions = [_settled(full, e) for e in events][cut:]
    # the updater replays the events of the look-back (plus slack) before the restart
    rules = BotRules(window_s=window)
    start = next(k for k, e in enumerate(events)
                 if e.ts >= T0 + restart - lookback_s(rules) - 5.0)
    rebuilt = BotFilter(BotRules(window_s=window))
    for e in events[start:cut]:
        _settled(rebuilt, e)
    assert [_settled(rebuilt, e) for e in events[cut:]] == decisions
    assert {"bot_page", "bot_no_impression", "bot_flagged", HOLD, None} <= {
        d for d, _ in decisions}
    assert any(settled for _, settled in decisions)


@pytest.mark.parametrize("etype", ["click", "add_to_cart", "purchase"])
def test_every_positive_type_of_a_bot_is_dropped(etype):
    f = BotFilter(BotRules())
    assert judge(f, ev(etype, "bot", "x", 1.0, position=4)) in {"bot_no_impression",
                                                                "bot_no_click"}


def test_forget_drops_every_trace_of_a_session_and_user_and_their_held_clicks():
    from serving.forgotten import Forgotten, session_hash, user_hash

    key = b"k" * 32
    f = BotFilter(BotRules())
    _sessions_shown(f, PAGE_MIN_SESSIONS, PAGE_A)
    page(f, "gone", NEW_RANKING, 100.0, user="u_gone")
    click = ev("click", "gone", "n1", 104.0, position=2, user="u_gone")
    assert _settled(f, click) == (HOLD, [])
    page(f, "kept", PAGE_A, 150.0, user="u_kept")
    assert _settled(f, ev("click", "kept", "a3", 154.0, position=3, user="u_kept")) == (None, [])
    gone = Forgotten(key, {session_hash("gone", key)}, {user_hash("u_gone", key)})
    assert f.forget(gone) == {click.event_id}
    tables = [f.shown, f.sent, f.depths, f.holding, *f.pages.values()]
    assert not any(k == "gone" or (isinstance(k, tuple) and "gone" in k)
                   for t in tables for k in t)
    assert not any("gone" in str(k) for t in (f.chosen, f.qualified, f.flags, f.intervals)
                   for k in t)
    assert f.holds == {} and f.holding == {}
    # the other session's state is whole
    assert any("kept" in str(k) for k in f.intervals) and ("kept", "tent") in f.shown
    assert "s:kept" in f.chosen and "u:u_kept" in f.chosen
    assert f.forget(gone) == set()   # idempotent
