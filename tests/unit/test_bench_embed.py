"""``instantrec bench embed``: FLOP accounting by hand, and a smoke run on 20 real texts (the
real encoder and sentence-transformers; figures are printed by the CLI, never asserted)."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest

from pipelines.benchmarks import embed


def test_text_flops_known_answer():
    shape = {"layers": 2, "hidden": 4, "params_non_embedding": 100}
    # 2 * 100 * 10 (weights) + 4 * 2 * 10^2 * 4 (attention) = 2000 + 3200
    assert embed.text_flops(np.array([10, 1]), shape).tolist() == [5200.0, 2 * 100 + 4 * 2 * 4]


def test_padded_share_known_answer():
    tokens = np.array([4, 2, 3, 1])
    # sorted: batches (4, 3) -> 2 * 4 and (2, 1) -> 2 * 2: 12 slots for 10 tokens
    assert embed.padded_share(tokens, np.array([0, 2, 1, 3]), 2) == pytest.approx(0.2)
    # unsorted: (4, 2) -> 8 and (3, 1) -> 6: 14 slots
    assert embed.padded_share(tokens, np.arange(4), 2) == pytest.approx(0.4)


def test_cpu_peak_is_cores_times_clock_times_flops_per_cycle():
    peak = embed.cpu_peak()
    assert peak["fp32_flops_per_cycle_per_core"] in (8, 16, 32, 64)
    assert peak["peak_gflops"] == pytest.approx(
        peak["physical_cores"] * peak["clock_ghz"] * peak["fp32_flops_per_cycle_per_core"], rel=1e-3)
    assert round(peak["peak_gflops_bf16"] / peak["peak_gflops"], 2) in (1.0, 2.0)


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
