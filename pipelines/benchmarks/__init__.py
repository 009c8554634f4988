"""Benchmarks that print figures, never pass/fail: ``instantrec bench <name> [--json]``.

Each module here is one benchmark and exposes ``add_arguments(parser)`` (its own options)
and ``run(settings, args) -> dict`` (the figures, JSON-able). Timings are medians over
repeated runs, and every peer is measured in the same run, so ratios stay meaningful on a
noisy machine.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

from serving.errors import MeasurementError

NAMES = ("nearline", "serving", "ann", "embed", "refresh", "growth", "http", "fuzz",
         "reliability", "redis_group", "scaled", "replicas")


def load(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r} (one of {', '.join(NAMES)})")
    return importlib.import_module(f"pipelines.benchmarks.{name}")


def available() -> list[str]:
    """The benchmarks whose module exists in this installation."""
    import importlib.util

    return [n for n in NAMES if importlib.util.find_spec(f"pipelines.benchmarks.{n}")]


def check_finite(result: Any, where: str) -> None:
    """Raise :class:`MeasurementError` naming the first figure of ``result`` that is NaN or
    infinite: a benchmark that could not measure something says so instead of printing it."""

    def walk(value: Any, path: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise MeasurementError(f"{where}: {path or 'the result'} is {value}: not measured")
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    walk(result, "")
