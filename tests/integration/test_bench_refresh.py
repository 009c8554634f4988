"""``instantrec bench refresh`` on the demo catalogue: the real steps run twice and the
refresh re-embeds exactly the new and changed items (timings are printed, never asserted)."""

from __future__ import annotations

import pytest

from pipelines.benchmarks.refresh import bench_refresh
from tests.conftest import make_settings


def test_refresh_reembeds_exactly_the_changed_items(tmp_path, encoder):
    result = bench_refresh(make_settings(tmp_path / "unused-home"), "demo", changed_share=0.03,
                           added_share=0.006, delisted_share=0.006, repeats=1, encoder=encoder)
    # 333 demo items: 10 retitled, 2 held back from the first snapshot, 2 delisted
    assert (result["changed"], result["added"], result["delisted"]) == (10, 2, 2)
    assert result["embedded_full"] == [333 - 2]
    assert result["re_embedded"] == [10 + 2]
    assert result["items"] == 333 - 2
    # the refresh keeps the live release's Annoy file: the new and changed items are searched
    # exactly beside it, the delisted and changed ones dropped from it
    assert not result["index_full"]["reused_live_setting"]
    assert result["index_full"]["annoy_rebuilt"]
    assert result["index_refresh"]["reused_live_setting"]
    assert not result["index_refresh"]["annoy_rebuilt"]
    assert (result["index_refresh"]["delta_items"],
            result["index_refresh"]["dropped_items"]) == (10 + 2, 10 + 2)
    assert result["index_refresh"]["recall_at_10"] >= 0.95
    assert set(result["refresh_steps_s"]) == {"ingest", "embed", "index", "evaluate", "publish"}
    assert result["full_s"] > 0 and result["refresh_s"] > 0
    assert result["refresh_over_full"] == pytest.approx(result["refresh_s"] / result["full_s"],
                                                        rel=1e-2)
