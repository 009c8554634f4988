"""A benchmark result with a figure that was not measured (NaN, infinity) is refused, naming
the figure, before anything is printed."""

from __future__ import annotations

import pytest

from pipelines.benchmarks import check_finite
from serving.errors import MeasurementError


def test_finite_results_pass():
    check_finite({"p50_ms": 1.5, "rows": [{"qps": 3.0}], "name": "x", "n": 3}, "bench x")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_figure_that_is_not_finite_is_named(bad):
    result = {"ok": 1.0, "stages": {"ann": [0.1, bad]}}
    with pytest.raises(MeasurementError, match=r"bench x: stages\.ann\[1\] is (nan|inf|-inf)"):
        check_finite(result, "bench x")


def test_the_cli_exits_non_zero_instead_of_printing_nan(monkeypatch, capsys):
    from pipelines import benchmarks, cli

    class NotMeasured:
        @staticmethod
        def add_arguments(p):
            pass

        @staticmethod
        def run(settings, args):
            return {"freshness_p95_s": float("nan")}

    real_load = benchmarks.load
    monkeypatch.setattr(benchmarks, "load",
                        lambda name: NotMeasured if name == "nearline" else real_load(name))
    assert cli.main(["bench", "nearline", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "freshness_p95_s is nan: not measured" in err
