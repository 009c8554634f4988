"""A corrupt ranker checkpoint never stops serving: the newest readable older checkpoint of
the release serves instead, or the untrained ranker, and the reason is logged."""

from __future__ import annotations

import logging

import pytest

from serving.checkpoint import load_usable, publish_checkpoint
from serving.layout import rankers_dir
from serving.ranker import Ranker
from serving.recommender import Recommender
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


def _publish(home, rec: Recommender, offset: int, bias: float) -> str:
    ranker = Ranker.initial(rec.release_id, rec.manifest.encoder.dim, rec.manifest.item_count)
    ranker.b0 = ranker.b0 + bias  # a mark to tell checkpoints apart
    return publish_checkpoint(home, ranker, offset).file


def test_a_truncated_latest_checkpoint_falls_back_to_the_older_one(demo_copy, caplog):
    rec = Recommender.load(settings=make_settings(demo_copy), watch=False)
    _publish(demo_copy, rec, 10, 1.0)
    newest = _publish(demo_copy, rec, 20, 2.0)
    path = rankers_dir(demo_copy) / newest
    path.write_bytes(path.read_bytes()[:100])  # truncated mid-write by a crash or a full disk
    rec.close()

    ref, ranker, problems = load_usable(demo_copy, rec.release_id)
    assert ref.file.endswith("ckpt-000000000010.npz") and ref.seq == 2 and ref.offset == 10
    start = Ranker.initial(rec.release_id, rec.manifest.encoder.dim, rec.manifest.item_count)
    assert ranker.b0 == pytest.approx(start.b0 + 1.0)
    assert problems and "cannot be read" in problems[0]

    with caplog.at_level(logging.ERROR, logger="serving.recommender"):
        served = Recommender.load(settings=make_settings(demo_copy), watch=False)
    assert "serving the older checkpoint" in caplog.text
    assert served.recommend("cordless drill", k=3)
    served.close()


def test_no_readable_checkpoint_serves_the_untrained_ranker(demo_copy, caplog):
    rec = Recommender.load(settings=make_settings(demo_copy), watch=False)
    only = _publish(demo_copy, rec, 10, 1.0)
    rec.close()
    (rankers_dir(demo_copy) / only).write_bytes(b"not a zip file")
    with caplog.at_level(logging.ERROR, logger="serving.recommender"):
        served = Recommender.load(settings=make_settings(demo_copy), watch=False)
    assert "serving the untrained ranker" in caplog.text
    assert served.ranker_seq == 0 and served.recommend("cordless drill", k=3)
    served.close()
