"""Bad input of every kind a shop or an operator sends, each rejected with a reason code.

Each case goes through the real boundary that would meet it (catalogue validation, query
normalisation, event parsing, filter parsing, the manifest and pointer readers, catalogue
headers) and must be refused with the typed error of that boundary; the reason code is the
error's class and field (or the catalogue reject reason). Anything else (accepted, or a crash
with another exception) is counted.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.reliability import figures

KEY = b"probe-key"
NOW = 1_800_000_000.0
GOOD_EVENT = {"session_id": "s1", "item_id": "i1", "type": "click", "position": 1,
              "query": "drill", "ts": NOW}
GOOD_ROW = {"item_id": "i1", "title": "Cordless drill", "description": "", "category": "Tools",
            "brand": "Acme", "price": "99.0", "in_stock": "true"}


def _event(**change: Any) -> Callable[[], Any]:
    from serving.events import parse_event

    raw = {k: v for k, v in {**GOOD_EVENT, **change}.items() if v is not _DROP}
    return lambda: parse_event(raw, KEY, now=NOW, live=True)


def _query(value: Any) -> Callable[[], Any]:
    from serving.text import normalise_query

    return lambda: normalise_query(value, 256)


def _filters(value: Any) -> Callable[[], Any]:
    from serving.retrieval import Filters

    return lambda: Filters.parse(value)


def _row(**change: str | None) -> Callable[[], Any]:
    """One catalogue row (beside a good one) through validation: the reject reason."""

    def run() -> str:
        import polars as pl

        from pipelines.catalogue.ingest import validate_catalogue

        rows = [{**GOOD_ROW, "item_id": "i0"}, {**GOOD_ROW, **change}]
        raw = pl.DataFrame(rows, schema={k: pl.String for k in GOOD_ROW}).with_row_index(
            "row_number")
        _, rejected = validate_catalogue(raw)
        if rejected.height == 0:
            return "accepted"
        raise _Rejected(str(rejected["reason"][0]))

    return run


def _duplicate_rows() -> str:
    import polars as pl

    from pipelines.catalogue.ingest import validate_catalogue

    raw = pl.DataFrame([GOOD_ROW, GOOD_ROW], schema={k: pl.String for k in GOOD_ROW}
                       ).with_row_index("row_number")
    _, rejected = validate_catalogue(raw)
    if rejected.height == 0:
        return "accepted"
    raise _Rejected(str(rejected["reason"][0]))


def _headers(header: str) -> Callable[[], Any]:
    def run() -> Any:
        from pipelines.catalogue.ingest import read_catalogue

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "catalogue.csv"
            path.write_text(header + "\ni1,Cordless drill,,Tools,Acme,99,true\n")
            return read_catalogue(path)

    return run


def _manifest(text: str) -> Callable[[], Any]:
    def run() -> Any:
        from serving.manifest import read_manifest

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "manifest.json").write_text(text)
            return read_manifest(Path(tmp))

    return run


def _pointer(text: str) -> Callable[[], Any]:
    def run() -> Any:
        from serving.release import current_bundle_dir

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "CURRENT").write_text(text)
            return current_bundle_dir(Path(tmp))

    return run


class _Rejected(Exception):
    """A catalogue row rejected by validation (the reason is the message)."""


_DROP = object()

CASES: list[tuple[str, str, Callable[[], Any]]] = [
    ("catalogue row", "missing id", _row(item_id="")),
    ("catalogue row", "missing title", _row(title="")),
    ("catalogue row", "title too long", _row(title="x" * 5000)),
    ("catalogue row", "duplicate id", _duplicate_rows),
    ("catalogue row", "price not a number", _row(price="cheap")),
    ("catalogue row", "negative price", _row(price="-5")),
    ("catalogue row", "infinite price", _row(price="inf")),
    ("catalogue row", "NaN price", _row(price="nan")),
    ("catalogue row", "in_stock not a boolean", _row(in_stock="maybe")),
    ("catalogue row", "control characters only in the title", _row(title="\x00\x01\x02")),
    ("catalogue file", "misspelled header In_Stock", _headers(
        "item_id,title,description,category,brand,price,In_Stock")),
    ("catalogue file", "header with a trailing space", _headers(
        "item_id,title,description,category,brand,price ,in_stock")),
    ("catalogue file", "no title column", _headers(
        "item_id,name,description,category,brand,price,in_stock")),
    ("catalogue file", "no id column", _headers(
        "sku_code,title,description,category,brand,price,in_stock")),
    ("query", "empty", _query("")),
    ("query", "spaces only", _query("   \t ")),
    ("query", "too long", _query("drill " * 100)),
    ("query", "not a string", _query(42)),
    ("query", "control characters", _query("drill\x00\x07")),
    ("query", "lone surrogate", _query("drill\ud800")),
    ("query", "bidi override", _query("drill\u202e")),
    ("event", "unknown type", _event(type="like")),
    ("event", "missing session", _event(session_id=_DROP)),
    ("event", "missing item", _event(item_id=_DROP)),
    ("event", "session id too long", _event(session_id="s" * 1000)),
    ("event", "position zero", _event(position=0)),
    ("event", "position a string", _event(position="first")),
    ("event", "position a boolean", _event(position=True)),
    ("event", "timestamp NaN", _event(ts=math.nan)),
    ("event", "timestamp of 400 digits", _event(ts=10**400)),
    ("event", "timestamp two days old", _event(ts=NOW - 2 * 86400)),
    ("event", "timestamp in the future", _event(ts=NOW + 86400)),
    ("event", "surrogate in the query", _event(query="drill\ud800")),
    ("event", "unknown field", _event(colour="red")),
    ("filters", "not a mapping", _filters(["Tools"])),
    ("filters", "unknown field", _filters({"colour": "red"})),
    ("filters", "max_price a string", _filters({"max_price": "cheap"})),
    ("filters", "max_price of 400 digits", _filters({"max_price": 10**400})),
    ("filters", "max_price NaN", _filters({"max_price": math.nan})),
    ("filters", "min above max", _filters({"min_price": 10, "max_price": 5})),
    ("filters", "in_stock a string", _filters({"in_stock": "yes"})),
    ("manifest", "not JSON", _manifest("{")),
    ("manifest", "missing fields", _manifest(json.dumps({"release_id": "r"}))),
    ("pointer", "corrupt", _pointer("{")),
    ("pointer", "outside the releases", _pointer(json.dumps({"release_id": "../..",
                                                            "generation": 1}))),
]


def run_bad_input() -> dict[str, Any]:
    """Every case once: refused with a typed reason, accepted, or crashed."""
    from serving.errors import InstantrecError, InvalidInputError

    refused: dict[str, str] = {}
    accepted: list[str] = []
    crashed: list[str] = []
    for group, kind, thunk in CASES:
        name = f"{group}: {kind}"
        try:
            thunk()
        except _Rejected as exc:
            refused[name] = f"reject: {exc}"[:80]
        except InvalidInputError as exc:
            refused[name] = f"{type(exc).__name__}:{exc.field}"
        except InstantrecError as exc:
            refused[name] = f"{type(exc).__name__}: {exc}"[:80]
        except Exception as exc:  # noqa: BLE001 - what this counts
            crashed.append(f"{name}: {type(exc).__name__}: {exc}"[:160])
        else:
            accepted.append(name)
    return figures(tried=len(CASES), survived=len(refused), crashed=len(crashed),
                   kinds_refused=len(refused), accepted=accepted, crashes=crashed,
                   reason_codes=refused)
