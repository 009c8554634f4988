"""Coverage-guided fuzzing of what clients send (``instantrec bench fuzz``).

An atheris (libFuzzer) target feeds arbitrary bytes, decoded as text and as JSON, to query
normalisation, event parsing and filter parsing. Any exception other than the typed
:class:`~serving.errors.InvalidInputError` kinds is a crash; an input that takes longer
than ``--timeout-s`` is a hang. The fuzzer runs in a child process (libFuzzer exits the
process on a finding) for ``--runs`` inputs; the figure is runs done, crashes and hangs found,
with the crashing input saved beside the report.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serving.errors import MeasurementError
from serving.settings import Settings

KEY = b"fuzz-key"


def target(data: bytes) -> None:
    """One input: every reading of ``data`` a client could send, through the parsers."""
    from serving.errors import InvalidInputError
    from serving.events import parse_event
    from serving.retrieval import Filters
    from serving.text import clean_text, normalise_query

    text = data.decode("utf-8", errors="surrogateescape")  # invalid UTF-8 -> lone surrogates
    clean_text(text)
    try:
        normalise_query(text, 256)
    except InvalidInputError:
        pass
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # not JSON (JSON errors are ValueErrors too)
        return
    for parse in (lambda v: parse_event(v, KEY, now=1_800_000_000.0, live=True),
                  lambda v: parse_event(v, KEY), Filters.parse,
                  lambda v: normalise_query(v, 256)):
        try:
            parse(value)
        except InvalidInputError:
            pass


def _child() -> None:
    import atheris

    with atheris.instrument_imports():
        import serving.events  # noqa: F401
        import serving.retrieval  # noqa: F401
        import serving.text  # noqa: F401
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


SEEDS = [b"cordless drill", b'{"type": "click", "session_id": "s", "item_id": "i"}',
         b'{"max_price": 1e400, "category": ["Tools"]}', b'"drill\\ud800"',
         b'{"ts": 100000000000000000000000000000, "position": true}']


def fuzz(runs: int, timeout_s: float = 5.0, max_len: int = 512,
         work: Path | None = None) -> dict[str, Any]:
    if runs < 1:
        raise MeasurementError("bench fuzz: --runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="instantrec-fuzz-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(SEEDS):
            (corpus / f"seed-{i}").write_bytes(seed)
        out_dir = Path(work or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", "from pipelines.benchmarks.fuzz import _child; _child()",
             f"-runs={runs}", f"-max_len={max_len}", f"-timeout={int(max(1, timeout_s))}",
             f"-artifact_prefix={out_dir}/", "-print_final_stats=1", str(corpus)],
            capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr  # atheris reports an uncaught exception on stdout
    # the final stats when it ran to the end; the last progress line ("#N ...") when a
    # finding stopped it
    done = re.search(r"stat::number_of_executed_units:\s*(\d+)", log) or (
        re.findall(r"(?m)^#(\d+)\b", log) or [None])[-1]
    crashes = len(re.findall(r"Uncaught Python exception|ERROR: libFuzzer: deadly signal",
                             log))
    hangs = len(re.findall(r"ERROR: libFuzzer: timeout", log))
    if done is None or (proc.returncode != 0 and not crashes and not hangs):
        raise MeasurementError(f"bench fuzz: the fuzzer failed (exit {proc.returncode}) "
                               f"without a finding or a run count:\n{log[-3000:]}")
    runs_done = int(done.group(1) if isinstance(done, re.Match) else done)
    found = sorted(str(p) for p in out_dir.glob("crash-*")) + sorted(
        str(p) for p in out_dir.glob("timeout-*"))
    return {"runs": runs_done, "crashes": crashes, "hangs": hangs,
            "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "runs_per_s": round(runs_done / seconds, 1), "findings": found,
            "targets": ["serving.text.clean_text", "serving.text.normalise_query",
                        "serving.events.parse_event (live and imported)",
                        "serving.retrieval.Filters.parse"],
            "last_lines": log.strip().splitlines()[-3:] if crashes or hangs else []}


def add_arguments(p: Any) -> None:
    p.add_argument("--runs", type=int, default=1_000_000, help="inputs to try")
    p.add_argument("--timeout-s", type=float, default=5.0, help="an input slower is a hang")
    p.add_argument("--max-len", type=int, default=512, help="longest input, bytes")
    p.add_argument("--out", type=Path, default=None,
                   help="where crashing inputs are saved (default: a temporary directory)")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    return fuzz(args.runs, args.timeout_s, args.max_len, args.out)
