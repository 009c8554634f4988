"""Serving on a real release of the demo catalogue, built with the real encoder."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections import Counter

import pytest

from pipelines.catalogue.gate import DEMO_GOLDEN
from pipelines.steps import run_build
from serving import FilterError, InvalidInputError, QueryError, Recommender, ReleaseError
from serving.release import read_pointer
from tests.conftest import make_settings, read_demo_rows, write_rows

ROWS = {r["id"]: r for r in read_demo_rows()}


@pytest.fixture(scope="module")
def rec(demo_home, encoder):
    r = Recommender.load(demo_home, settings=make_settings(demo_home), encoder=encoder,
                         watch=False)
    yield r
    r.close()


def test_golden_queries_find_their_products(rec):
    golden = json.loads(DEMO_GOLDEN.read_text())
    found = sum(len(set(g["expected"]) & {r.item_id for r in rec.recommend(g["query"])})
                for g in golden)
    assert found / sum(len(g["expected"]) for g in golden) >= 0.9


def test_results_are_typed_ranked_and_explained(rec):
    results = rec.recommend("cast iron skillet", k=5)
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(results, results[1:], strict=False))
    top = results[0]
    assert "skillet" in top.title.lower()
    # untrained ranker: identity adapter, no session, zero item bias -> 10 cos + 4 lex - 5
    sig = top.signals
    assert sig["adapter"] == 0.0 and sig["session_affinity"] == 0.0 and sig["item_bias"] == 0.0
    assert 0.0 < sig["lexical"] <= 1.0  # the lexical channel matched "skillet"
    assert sig["logit"] == pytest.approx(10.0 * sig["dense_cosine"] + 4.0 * sig["lexical"] - 5.0)
    assert top.score == pytest.approx(1.0 / (1.0 + math.exp(-sig["logit"])))
    assert top.item_id in ROWS and top.price == pytest.approx(float(ROWS[top.item_id]["price"]))


def test_typos_and_glued_words_are_understood_from_the_catalogue(rec, demo_home, encoder):
    right = [r.item_id for r in rec.recommend("espresso machine", k=3)]
    assert [r.item_id for r in rec.recommend("expresso machin", k=3)] == right
    assert [r.item_id for r in rec.recommend("espressomachine", k=3)] == right
    raw = Recommender.load(demo_home, settings=make_settings(demo_home, query_steps="none"),
                           encoder=encoder, watch=False)
    try:  # without the steps the typo loses the lexical match
        typo = raw.recommend("expresso machin", k=3)
        assert max(r.signals["lexical"] for r in typo) < max(
            r.signals["lexical"] for r in rec.recommend("expresso machin", k=3))
    finally:
        raw.close()


def test_unknown_query_steps_are_refused_by_name(demo_home):
    with pytest.raises(ValueError, match="spellling"):
        make_settings(demo_home, query_steps="units,spellling")


def test_category_price_and_stock_filters_still_return_k(rec):
    filters = {"category": "Kitchen", "max_price": 60.0, "in_stock": True}
    results = rec.recommend("headphones", k=10, filters=filters)  # far from the filtered set
    expected = sum(1 for r in ROWS.values() if r["category"] == "Kitchen"
                   and float(r["price"]) <= 60 and r["in_stock"] == "true")
    assert len(results) == min(10, expected)
    for r in results:
        row = ROWS[r.item_id]
        assert row["category"] == "Kitchen" and float(row["price"]) <= 60 and row["in_stock"] == "true"


def test_very_selective_filter_returns_every_match(rec):
    row = next(r for r in ROWS.values() if r["category"] == "Office Supplies")
    price = float(row["price"])
    matches = {i for i, r in ROWS.items() if r["category"] == "Office Supplies"
               and float(r["price"]) == price}
    results = rec.recommend("anything at all", k=50,
                            filters={"category": ["Office Supplies"], "min_price": price,
                                     "max_price": price})
    assert {r.item_id for r in results} == matches


@pytest.mark.parametrize("query, k, filters, error, message", [
    ("", 10, None, QueryError, "empty"),
    ("x" * 300, 10, None, QueryError, "limit is 256"),
    ("drill\x00", 10, None, QueryError, "control character"),
    ("drill", 0, None, InvalidInputError, "k must be"),
    ("drill", 10, {"colour": "red"}, FilterError, "unknown filter field(s) ['colour']"),
    ("drill", 10, {"max_price": "cheap"}, FilterError, "'max_price' must be a number from 0"),
    ("drill", 10, {"min_price": 50, "max_price": 10}, FilterError, "above max_price"),
    ("drill", 10, {"in_stock": "yes"}, FilterError, "'in_stock' must be true or false"),
])
def test_bad_requests_get_clear_errors_and_serving_goes_on(rec, query, k, filters, error,
                                                            message):
    before = sum(v for key, v in rec.counters.items() if key.startswith("rejected_"))
    with pytest.raises(error) as info:
        rec.recommend(query, k=k, filters=filters)
    assert message in str(info.value)
    assert sum(v for key, v in rec.counters.items() if key.startswith("rejected_")) == before + 1
    assert rec.recommend("drill", k=3)


def test_many_threads_get_the_same_answers(rec):
    queries = ["yoga mat", "espresso machine", "kids building blocks", "65 inch tv"]
    expected = {q: [r.item_id for r in rec.recommend(q)] for q in queries}
    errors: list[BaseException] = []
    seen: Counter[str] = Counter()

    def worker(i):
        try:
            for j in range(25):
                q = queries[(i + j) % len(queries)]
                assert [r.item_id for r in rec.recommend(q)] == expected[q]
                seen[q] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sum(seen.values()) == 200


def test_unchanged_catalogue_rebuild_embeds_nothing_and_keeps_the_release(demo_copy, encoder):
    before = read_pointer(demo_copy / "releases")
    out = run_build(make_settings(demo_copy), register=False, encoder=encoder)
    assert out["embed"]["embedded"] == 0
    assert out["publish"]["release_id"] == before.release_id
    assert read_pointer(demo_copy / "releases") == before


def test_hot_reload_follows_the_pointer_without_failing_requests(demo_copy, encoder, tmp_path):
    settings = make_settings(demo_copy)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=True)
    old_release = rec.release_id
    rows = read_demo_rows()
    target = next(r for r in rows if "skillet" in r["title"].lower())
    target["price"] = "1.23"
    rows[1]["title"] = rows[1]["title"] + " (2-pack)"
    stop = threading.Event()
    failures: list[BaseException] = []

    def traffic():
        while not stop.is_set():
            try:
                rec.recommend("cast iron skillet", k=5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        out = run_build(settings, catalogue=write_rows(tmp_path / "c.csv", rows), register=False,
                        encoder=encoder)
        assert out["embed"]["embedded"] == 1  # only the retitled item
        deadline = time.monotonic() + 15
        while rec.release_id == old_release and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
        rec.close()
    assert rec.release_id == out["publish"]["release_id"] != old_release
    assert failures == []
    hit = next(r for r in rec.recommend("cast iron skillet", k=10) if r.item_id == target["id"])
    assert hit.price == pytest.approx(1.23)


def test_a_release_that_fails_to_load_never_replaces_the_live_one(demo_copy, encoder):
    releases = demo_copy / "releases"
    rec = Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                           watch=False)
    live = rec.release_id
    broken = releases / "broken0000000000"
    shutil.copytree(releases / live, broken)
    with (broken / "index.ann").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff" * 16)
    (releases / "CURRENT").write_text(json.dumps({"release_id": broken.name, "generation": 9}))
    assert rec.reload() is False
    assert rec.counters["reload_failures"] == 1
    assert rec.release_id == live and rec.recommend("yoga mat", k=3)
    # the same broken pointer is not checksummed again on every poll, only once it moves
    assert rec.reload() is False and rec.counters["reload_failures"] == 1
    (releases / "CURRENT").write_text(json.dumps({"release_id": broken.name, "generation": 10}))
    assert rec.reload() is False and rec.counters["reload_failures"] == 2
    with pytest.raises(ReleaseError, match="checksum mismatch on index.ann"):
        Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                         watch=False)


def test_missing_or_corrupt_releases_are_named(tmp_path, demo_copy, encoder):
    with pytest.raises(ReleaseError, match="no release has been published"):
        Recommender.load(tmp_path / "empty", settings=make_settings(tmp_path / "empty"),
                         watch=False)
    (demo_copy / "releases" / "CURRENT").write_text("{not json")
    with pytest.raises(ReleaseError, match="pointer .* is corrupt"):
        Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                         watch=False)


def test_a_release_built_with_another_encoder_is_refused(demo_copy, encoder):
    release = demo_copy / "releases" / read_pointer(demo_copy / "releases").release_id
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["encoder"]["revision"] = "0" * 16
    (release / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="built with encoder .* rev 0000"):
        Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                         watch=False)


def test_a_release_failing_its_gate_is_published_but_not_live(demo_copy, encoder, tmp_path):
    golden = tmp_path / "golden.json"
    rows = read_demo_rows()
    golden.write_text(json.dumps([{"query": "yoga mat", "expected": [rows[0]["id"]]}]))
    rows[0]["price"] = "2.00"  # a new release id
    before = read_pointer(demo_copy / "releases")
    out = run_build(make_settings(demo_copy), catalogue=write_rows(tmp_path / "c.csv", rows),
                    golden=golden, register=False, encoder=encoder)
    assert out["evaluate"]["gate"]["passed"] is False
    assert "golden recall@10 0.000 < 0.9" in out["evaluate"]["gate"]["failures"][0]
    assert out["publish"]["live"] is False
    assert (demo_copy / "releases" / out["publish"]["release_id"] / "manifest.json").is_file()
    assert read_pointer(demo_copy / "releases") == before
