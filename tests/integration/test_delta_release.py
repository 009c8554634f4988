"""Refreshes that change few items keep the live release's Annoy file and search the changed
items exactly beside it; past the limit, Annoy is built afresh (real steps, real encoder).
Retention (one old release kept) then deletes the base release of a delta release, which
still loads: the Annoy file is shared by hard link."""

from __future__ import annotations

import json

import numpy as np

from pipelines.catalogue.index import DELTA_MAX_SHARE
from pipelines.steps import run_build
from serving import Recommender
from serving.release import INDEX_FILE, load_bundle, read_pointer
from tests.conftest import make_settings, read_demo_rows, write_rows

NEW_TITLES = ["Aurora Borealis Star Projector Night Light", "Titanium Camping Spork, 3-pack",
              "Beeswax Food Wraps, Assorted Sizes", "Cast Aluminum Pizza Peel, 14 in.",
              "Heated Ice Scraper for Car Windshields"]


def _index_spec(releases, release_id):
    return json.loads((releases / release_id / "manifest.json").read_text())["index"]


def _ids(rec, query):
    return [r.item_id for r in rec.recommend(query, k=10)]


def test_a_small_refresh_links_annoy_and_a_large_one_rebuilds_it(demo_copy, encoder, tmp_path):
    settings = make_settings(demo_copy, keep_releases=1)
    releases = demo_copy / "releases"
    first = read_pointer(releases).release_id
    rows = read_demo_rows()
    changed = [rows[10 + 20 * i] for i in range(len(NEW_TITLES))]
    old_titles = {r["id"]: r["title"] for r in changed}
    for row, title in zip(changed, NEW_TITLES, strict=True):
        row["title"] = title
    delisted = rows[5], rows[100], rows[200]
    gone = {r["id"] for r in delisted}
    added = [dict(rows[0], id=f"SKU-NEW-{i}", title=t) for i, t in
             enumerate(["Solar Powered Garden Gnome", "Bamboo Shower Caddy"])]
    refresh = [r for r in rows if r["id"] not in gone] + added

    out = run_build(settings, catalogue=write_rows(tmp_path / "one.csv", refresh),
                    register=False, encoder=encoder)
    second = out["publish"]["release_id"]
    assert out["publish"]["pruned"] == []  # the one old release is kept
    spec = _index_spec(releases, second)
    assert (spec["base_release"], spec["delta_items"], spec["dropped_items"]) == (
        first, len(changed) + len(added), len(changed) + len(delisted))
    assert spec["recall_at_10"] >= 0.95
    # the same Annoy file, not a copy
    assert ((releases / second / INDEX_FILE).stat().st_ino
            == (releases / first / INDEX_FILE).stat().st_ino)
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    try:
        assert rec.release_id == second
        for row in changed + added:  # changed and new items are found by their text
            assert _ids(rec, row["title"])[0] == row["id"]
        for row in delisted:  # delisted items are never answered, though Annoy holds them
            assert row["id"] not in _ids(rec, row["title"])
        # nor do changed items' old vectors: every answer scores with the release's vector
        index, vectors = rec.bundle.index, rec.bundle.vectors
        for title in old_titles.values():
            qvec = encoder.encode_query(title)
            rows, sims = index.nearest(qvec, 20)
            np.testing.assert_allclose(sims, vectors[rows] @ qvec, atol=1e-4)
    finally:
        rec.close()

    # a refresh on top of it that pushes the delta past the limit rebuilds Annoy
    more = int(DELTA_MAX_SHARE * len(refresh)) + 1
    for row in refresh[-more - len(added):-len(added)]:
        row["title"] += " (refurbished)"
    out = run_build(settings, catalogue=write_rows(tmp_path / "two.csv", refresh),
                    register=False, encoder=encoder)
    third = out["publish"]["release_id"]
    spec = _index_spec(releases, third)
    assert (spec["base_release"], spec["delta_items"], spec["dropped_items"]) == (None, 0, 0)
    assert ((releases / third / INDEX_FILE).stat().st_ino
            != (releases / second / INDEX_FILE).stat().st_ino)
    # retention kept the live release and one more: the delta release's base went, the delta
    # release (its Annoy file a hard link to the base's) still loads with every file verified
    assert out["publish"]["pruned"] == [first]
    assert sorted(p.name for p in releases.iterdir() if not p.name.startswith(".")
                  and p.is_dir()) == sorted([second, third])
    assert not [p for p in (releases / ".staging").iterdir() if ".pruned-" in p.name]
    assert load_bundle(releases / second, verify_files=True).release_id == second
    rec = Recommender.load(demo_copy, settings=settings, encoder=encoder, watch=False)
    try:
        assert rec.release_id == third
        assert _ids(rec, NEW_TITLES[0])[0] == changed[0]["id"]
    finally:
        rec.close()
