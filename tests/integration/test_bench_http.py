"""`instantrec bench http` on the demo release, tiny: every figure present and measured."""

from __future__ import annotations

import shutil

import pytest

from pipelines.benchmarks import check_finite
from pipelines.benchmarks.http import LEVELS, bench_http
from serving.errors import MeasurementError
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


def test_bench_http_measures_every_server_and_level(demo_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    out = bench_http(make_settings(home), n_queries=5, n_repeated=20, repeats=1,
                     servers=["uvicorn", "granian"])
    check_finite(out, "bench http")
    assert out["in_process"]["unseen"]["requests"] == 5
    assert out["in_process"]["repeated"]["requests"] == 20
    for server in ("uvicorn", "granian"):
        for c in LEVELS:
            assert out[server][f"unseen_c{c}"]["requests"] == 5
            assert out[server][f"repeated_c{c}"]["requests"] == 20
            assert out[server][f"repeated_c{c}"]["qps"] > 0
        assert set(out[f"{server}_overhead_p50_ms"]) == {"unseen", "repeated"}


def test_bench_http_without_a_release_says_why(tmp_path):
    with pytest.raises(MeasurementError, match="no live release"):
        bench_http(make_settings(tmp_path), repeats=1)
