"""Benchmarks that print figures, never pass/fail: ``instantrec bench <name> [--json]``.

Each module here is one benchmark and exposes ``add_arguments(parser)`` (its own options)
and ``run(settings, args) -> dict`` (the figures, JSON-able). Timings are medians over
repeated runs, and every peer is measured in the same run, so ratios stay meaningful on a
noisy machine.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("nearline", "serving", "ann", "embed", "refresh", "growth")


def load(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r} (one of {', '.join(NAMES)})")
    return importlib.import_module(f"pipelines.benchmarks.{name}")


def available() -> list[str]:
    """The benchmarks whose module exists in this installation."""
    import importlib.util

    return [n for n in NAMES if importlib.util.find_spec(f"pipelines.benchmarks.{n}")]
