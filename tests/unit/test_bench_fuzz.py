"""`instantrec bench fuzz`, bounded: the parsers survive a short coverage-guided run, and a
crashing target is reported as a finding (not as a run that went well)."""

from __future__ import annotations

from pipelines.benchmarks import fuzz


def test_the_parsers_survive_a_short_fuzzing_run(tmp_path):
    out = fuzz.fuzz(runs=5000, work=tmp_path)
    assert out["runs"] == 5000 and out["crashes"] == out["hangs"] == 0, out
    assert out["findings"] == []


def test_a_crash_is_counted_and_its_input_saved(tmp_path, monkeypatch):
    # the child imports the target by name: point it at one that fails on every input
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "sitecustomize.py").write_text(
        "import pipelines.benchmarks.fuzz as f\n"
        "def broken(data):\n    raise TypeError('boom')\n"
        "f.target = broken\n")
    out = fuzz.fuzz(runs=100, work=tmp_path / "out")
    assert out["crashes"] == 1 and out["findings"] and out["exit_code"] != 0
