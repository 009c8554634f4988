from __future__ import annotations

import argparse

import numpy as np
import pytest

from pipelines.benchmarks import ann
from serving.settings import Settings


def unit_rows(n, dim, seed):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_scale_up_keeps_the_real_rows_and_the_chosen_parent_cosine():
    real = unit_rows(500, 64, 0)
    out = ann.scale_up(real, 3000, parent_cos=0.8, seed=1)
    assert out.shape == (3000, 64)
    assert np.array_equal(out[:500], real)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # every synthetic row's best real match is (almost always) its parent, at cosine ~0.8
    best = (out[500:] @ real.T).max(axis=1)
    assert np.median(best) == pytest.approx(0.8, abs=0.03)


def test_run_on_tiny_data_returns_every_figure(tmp_path):
    np.save(tmp_path / "items.npy", unit_rows(2000, 384, 0))
    queries = unit_rows(2000, 384, 0)[:40] + 0.02 * unit_rows(40, 384, 1)
    np.save(tmp_path / "queries.npy", queries / np.linalg.norm(queries, axis=1, keepdims=True))
    parser = argparse.ArgumentParser()
    ann.add_arguments(parser)
    args = parser.parse_args(["--vectors", str(tmp_path / "items.npy"),
                              "--query-vectors", str(tmp_path / "queries.npy"),
                              "--sizes", "1000,3000", "--repeats", "1", "--exact-queries", "10",
                              "--growth-queries", "20"])
    report = ann.run(Settings(home=tmp_path), args)

    assert [r["items"] for r in report["results"]] == [2000, 1000, 3000]
    assert [r["label"] for r in report["results"]] == ["real", "real subset", "real + synthetic"]
    for r in report["results"]:
        assert set(r) >= {"annoy", "exact", "hnswlib", "serving"}
        for recall in (r["annoy"]["as_configured"]["recall_at_10"],
                       r["annoy"]["tuned_on_real_queries"]["recall_at_10"],
                       r["hnswlib"]["recall_at_10"]):
            assert 0.0 <= recall <= 1.0
        assert r["exact"]["recall_at_10"] == 1.0
        for figure in (r["annoy"]["as_configured"]["qps"], r["hnswlib"]["qps"],
                       r["exact"]["qps_single"], r["exact"]["qps_batched"],
                       r["annoy"]["size_mb"], r["hnswlib"]["size_mb"]):
            assert figure > 0
    assert [g["items"] for g in report["growth"]] == [2000, 1000, 3000]
    assert set(report["growth"][0]) >= {"rss_after_queries_mb", "annoy_serving_p50_ms",
                                        "annoy_serving_p99_ms", "exact_p50_ms",
                                        "vectors_in_ram_rss_mb"}


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)  # the parent holds 600 MB when it starts the child
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident, not reserved
    probe = ("import resource; from pipelines.benchmarks.ann import peak_rss_mb; "
             "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    own, inherited = float(out[0]), float(out[1])
    assert inherited > 600          # what getrusage says: the parent's peak
    assert 0 < own < 300            # what the child really held
    del ballast
