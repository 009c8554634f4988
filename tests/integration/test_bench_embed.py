"""``instantrec bench embed`` on 20 real texts: the real encoder against sentence-transformers
(figures are printed by the CLI, never asserted; what is asserted is what must hold whatever
the machine: like-for-like vectors, the model's shape, fractions within their bounds)."""

from __future__ import annotations

from argparse import Namespace

from pipelines.benchmarks import embed


def test_smoke_run_reports_ours_peer_ratio_and_flop_fraction(tmp_path):
    from serving.settings import Settings

    args = Namespace(items=20, datasets="crowdflower", repeats=1, batch_size=None,
                     peer_batch_size=32, int8="", quality=False, vectors_cache=None,
                     quality_datasets="crowdflower")
    result = embed.run(Settings(home=tmp_path), args)
    cf = result["crowdflower"]
    assert cf["texts"] == 20
    names = ("ours", "peer") + (("ours_fp32",) if result["precision_ours"] == "bf16" else ())
    for name in names:
        assert cf[name]["items_per_s"] > 0
        assert 0 < cf[name]["flop_fraction"] < 1
    assert cf["ratio_ours_over_peer"] > 0
    assert result["peer_max_seq_length_used"] == result["max_tokens_ours"] == 128
    # like for like: the same weights, pooling and truncation give the same vectors
    assert cf["cosine_ours_vs_peer"]["min"] > 0.999
    assert result["model"] == {"layers": 6, "hidden": 384, "params_non_embedding": 10_646_784}
