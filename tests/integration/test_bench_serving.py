"""`instantrec bench serving` runs end to end on a tiny real catalogue (figures not judged)."""

from __future__ import annotations

import argparse

from pipelines.benchmarks import serving as bench_serving
from tests.conftest import make_settings


def test_bench_serving_reports_the_promised_keys(shared_data, tiny_homedepot, tmp_path):
    parser = argparse.ArgumentParser()
    bench_serving.add_arguments(parser)
    args = parser.parse_args(["--products", str(tiny_homedepot), "--judgments",
                              str(shared_data / "homedepot" / "judgments.parquet"),
                              "--queries", "4", "--repeats", "1", "--backend", "onnx"])
    out = bench_serving.run(make_settings(tmp_path / "home"), args)

    assert out["n_items"] == 60
    for part in ("unseen", "cached", "session"):
        assert set(out[part]) >= {"p50_ms", "p95_ms", "p99_ms"}
        assert 0 < out[part]["p50_ms"] <= out[part]["p95_ms"] <= out[part]["p99_ms"]
    assert out["qps"] > 0 and out["peak_rss_mb"] > 0
    assert out["backends"]["onnx"]["backend"] == "onnx"  # it did not fall back to torch
    assert set(out["stages_p50_ms"]) == {"encode", "ann", "bm25", "ranker"}
    assert out["build"]["publish"]["live"] is True
