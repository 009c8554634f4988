"""Embedding progress as task-log lines: done/total, share, rate and ETA."""

from __future__ import annotations

import logging

from pipelines.catalogue.embed import ProgressLog


def test_progress_logs_every_interval_and_the_end(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.catalogue.embed")
    progress = ProgressLog("embed shard 1/4", total=10, every_s=0.0)
    progress.update(4)
    progress.update(6)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("embed shard 1/4: 4/10 items (40%), ")
    assert lines[1].startswith("embed shard 1/4: 10/10 items (100%), ")
    assert lines[1].endswith("items/s, ETA 0 s")


def test_progress_holds_lines_within_the_interval_but_not_the_last(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.catalogue.embed")
    progress = ProgressLog("embed shard 0/1", total=300, every_s=3600.0)
    for _ in range(3):
        progress.update(100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("embed shard 0/1: 300/300 items (100%)")


def test_an_embedding_process_yields_the_cpu_and_never_takes_priority_back():
    # in a child: niceness cannot be lowered again, and the test process must keep its own
    import subprocess
    import sys

    code = ("import os; from pipelines.steps import yield_cpu; from serving.settings import "
            "Settings; print(os.nice(0), yield_cpu(Settings(embed_nice=7)), "
            "yield_cpu(Settings(embed_nice=3)), yield_cpu(Settings(embed_nice=0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    start = int(out[0])
    assert [int(n) for n in out[1:]] == [max(7, start)] * 3


def test_an_embedding_process_takes_the_configured_torch_threads():
    import subprocess
    import sys

    code = ("import torch; from pipelines.steps import yield_cpu; from serving.settings import "
            "Settings; torch.set_num_threads(2); yield_cpu(Settings(embed_nice=0)); "
            "a = torch.get_num_threads(); yield_cpu(Settings(embed_nice=0, embed_threads=1)); "
            "print(a, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["2", "1"]  # 0 (the default) leaves torch's setting as it was
