"""The refresh benchmark's catalogue snapshots (the timed runs are in tests/integration)."""

from __future__ import annotations

import polars as pl

from pipelines.benchmarks.refresh import snapshots


def test_each_snapshot_changes_adds_and_delists_from_the_one_before():
    frame = pl.DataFrame({"id": [f"i{n}" for n in range(1000)],
                          "title": [f"item {n}" for n in range(1000)]})
    series, count = snapshots(frame, 0.01, 0.002, 0.003, seed=1, refreshes=3)
    assert count == {"changed": 10, "added": 2, "delisted": 3}
    assert len(series) == 4 and series[0].height == 1000 - 3 * 2
    for before, after in zip(series, series[1:], strict=False):
        old = dict(before.iter_rows())
        new = dict(after.iter_rows())
        assert len(set(old) - set(new)) == 3                     # delisted
        added = set(new) - set(old)
        assert len(added) == 2 and all(new[i] == f"item {i[1:]}" for i in added)
        assert sum(old[i] != new[i] for i in set(old) & set(new)) == 10  # retitled
    # every id is one of the catalogue's
    assert set(series[-1]["id"]) <= set(frame["id"])
