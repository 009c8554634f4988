"""Catalogue ingestion: read, validate, normalise, hash and upsert a catalogue snapshot.

A snapshot is the whole catalogue: items missing from it are marked inactive (delisted), not
deleted, so their history stays. Bad rows never vanish: each goes to ``rejects`` with the
reason and the raw row, and the run fails when the reject share passes the configured limit.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipelines.catalogue.warehouse import connect
from serving.errors import CatalogueError
from serving.failpoints import failpoint
from serving.schema import CONTENT_HASH, ID_ALIASES, ITEM_ID
from serving.text import clean_text

log = logging.getLogger(__name__)

OPTIONAL = ("description", "category", "brand", "price", "in_stock")
MAX_TITLE_CHARS = 500
MAX_DESCRIPTION_CHARS = 5000
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


@dataclass(frozen=True)
class IngestReport:
    run_id: str
    source: str
    rows_read: int
    rows_accepted: int
    rows_rejected: int
    items_new: int
    items_changed: int
    items_delisted: int
    reject_reasons: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_columns(columns: list[str], source: Path) -> list[str]:
    """Refuse a header that only nearly names a known column (``In_Stock``, ``price `` with a
    trailing space, ``in_stock\\r`` from ``\\r\\r\\n`` line ends): read as an unknown column it
    would silently drop what it holds (every price unknown, every item's stock the default).
    Columns not like any known one are ignored, with a warning; returns their names."""
    known = ("title", *OPTIONAL, *ID_ALIASES)
    folded = {k.casefold(): k for k in known}
    ignored = []
    for col in columns:
        if col in known:
            continue
        key = "".join(col.split()).casefold().replace("-", "_")
        near = folded.get(key) or next(iter(difflib.get_close_matches(key, list(folded), n=1,
                                                                        cutoff=0.85)), None)
        if near is not None:
            hint = (" (white space or a line-end character around the name: check the "
                    "file's line ends)" if col.strip() != col or "\r" in col else "")
            raise CatalogueError(f"catalogue {source}: column {col!r} is not a known column; "
                                 f"did you mean {folded[near]!r}?{hint} Known columns: "
                                 f"{list(known)}")
        ignored.append(col)
    if ignored:
        log.warning("catalogue %s: ignoring unknown columns %s (known: %s)", source, ignored,
                    list(known))
    return ignored


def read_catalogue(source: Path) -> pl.DataFrame:
    """Read a CSV or Parquet catalogue with every column as text (validation is ours)."""
    if source.is_dir():
        raise CatalogueError(f"catalogue {source} is a directory, expected a file")
    if not source.is_file():
        raise CatalogueError(f"catalogue file {source} does not exist")
    try:
        if source.suffix.lower() == ".parquet":
            df = pl.read_parquet(source)
            df = df.with_columns(pl.all().cast(pl.String))
        elif source.suffix.lower() in (".csv", ".tsv"):
            df = pl.read_csv(source, infer_schema=False, separator="\t" if source.suffix == ".tsv"
                             else ",")
        else:
            raise CatalogueError(f"catalogue {source}: unsupported format (use .csv or .parquet)")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise CatalogueError(f"cannot read catalogue {source}: {exc}") from exc
    check_columns(df.columns, source)
    id_col = next((c for c in ID_ALIASES if c in df.columns), None)
    if id_col is None:
        raise CatalogueError(f"catalogue {source} has no id column (one of {list(ID_ALIASES)})")
    if "title" not in df.columns:
        raise CatalogueError(f"catalogue {source} has no 'title' column")
    df = df.rename({id_col: ITEM_ID})
    for col in OPTIONAL:
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias(col))
    return df.select([ITEM_ID, "title", *OPTIONAL]).with_row_index("row_number", offset=1)


# Text that clean_text returns unchanged, recognised in polars without a Python call: printable
# ASCII (NFKC, the typographic folds and the control filter leave it alone) with no markup or
# entity ("<", "&"), no doubled space and no space at either end. Most catalogue text is.
_PLAIN_ASCII = r"^[!-~](?:[ -~]*[!-~])?$"


def clean_series(values: pl.Series) -> pl.Series:
    """:func:`serving.text.clean_text` over a string column: text it would return unchanged
    is recognised in polars (:data:`_PLAIN_ASCII`), only the rest goes through Python."""
    plain = (values.str.contains(_PLAIN_ASCII) & ~values.str.contains("  ", literal=True)
             & ~values.str.contains(r"[<&]")).fill_null(True)
    todo = (~plain).arg_true()
    if todo.len() == 0:
        return values
    return values.clone().scatter(todo, [clean_text(v) for v in values.gather(todo).to_list()])


def _clean(col: str) -> pl.Expr:
    return pl.col(col).map_batches(clean_series, return_dtype=pl.String)


def validate_catalogue(raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw rows into (accepted, rejected); rejected rows carry a ``reason``."""
    df = raw.with_columns(
        _clean(ITEM_ID).alias(ITEM_ID),
        _clean("title").alias("title"),
        _clean("description").str.slice(0, MAX_DESCRIPTION_CHARS).alias("description"),
        _clean("category").alias("category"),
        _clean("brand").alias("brand"),
        pl.col("price").str.strip_chars().str.strip_chars_start("$").alias("price_raw"),
        pl.col("in_stock").str.strip_chars().str.to_lowercase().alias("stock_raw"),
    ).with_columns(
        pl.col("price_raw").cast(pl.Float64, strict=False).alias("price"),
        pl.when(pl.col("stock_raw").is_null()).then(True)
        .when(pl.col("stock_raw").is_in(list(_TRUE))).then(True)
        .when(pl.col("stock_raw").is_in(list(_FALSE))).then(False)
        .otherwise(None).alias("in_stock"),
        pl.col(ITEM_ID).count().over(ITEM_ID).alias("id_count"),
    )
    for col in ("description", "category", "brand"):
        df = df.with_columns(pl.when(pl.col(col) == "").then(None).otherwise(pl.col(col)).alias(col))
    reason = (
        pl.when(pl.col(ITEM_ID).is_null() | (pl.col(ITEM_ID) == ""))
        .then(pl.lit("missing id"))
        .when(pl.col("title").is_null() | (pl.col("title") == ""))
        .then(pl.lit("missing title"))
        .when(pl.col("title").str.len_chars() > MAX_TITLE_CHARS)
        .then(pl.lit(f"title longer than {MAX_TITLE_CHARS} characters"))
        .when(pl.col("id_count") > 1)
        .then(pl.format("duplicate id '{}' ({} rows share it)", pl.col(ITEM_ID), pl.col("id_count")))
        .when(pl.col("price_raw").is_not_null() & (pl.col("price_raw") != "")
              & pl.col("price").is_null())
        .then(pl.format("price '{}' is not a number", pl.col("price_raw")))
        .when(pl.col("price").is_not_null() & (pl.col("price").is_nan() | pl.col("price").is_infinite()
                                              | (pl.col("price") < 0)))
        .then(pl.format("price '{}' is not a finite non-negative number", pl.col("price_raw")))
        .when(pl.col("in_stock").is_null())
        .then(pl.format("in_stock '{}' is not true/false", pl.col("stock_raw")))
        .otherwise(None)
        .alias("reason")
    )
    df = df.with_columns(reason)
    accepted = df.filter(pl.col("reason").is_null()).select(
        ITEM_ID, "title", "description", "category", "brand", "price", "in_stock")
    rejected = df.filter(pl.col("reason").is_not_null()).select("row_number", ITEM_ID, "reason")
    return accepted, rejected


# An incoming row (n) differs from the stored item (i): the content hash covers title,
# description, category and brand.
_CHANGED = ("i.content_hash <> n.content_hash OR i.price IS DISTINCT FROM n.price "
            "OR i.in_stock <> n.in_stock OR NOT i.active")


def content_hash(title: str, description: str | None, category: str | None,
                 brand: str | None) -> str:
    """Hash of exactly what the item's vector is computed from."""
    payload = json.dumps([title, description, category, brand], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def ingest_catalogue(source: Path, warehouse: Path, max_reject_share: float = 0.05,
                     run_id: str | None = None, max_delist_share: float = 0.2) -> IngestReport:
    """Ingest one catalogue snapshot from ``source`` (CSV/Parquet) into ``warehouse``.

    ``max_reject_share`` is the largest fraction of rejected rows (0..1) tolerated, and
    ``max_delist_share`` the largest fraction of the listed items a snapshot may delist (a
    truncated export would take the shop's catalogue with it); above either, the rejects are
    still recorded, the items are left untouched, and :class:`CatalogueError` is raised.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    raw = read_catalogue(source)
    accepted, rejected = validate_catalogue(raw)
    accepted = accepted.with_columns(
        pl.struct("title", "description", "category", "brand")
        .map_elements(lambda r: content_hash(r["title"], r["description"], r["category"],
                                             r["brand"]), return_dtype=pl.String)
        .alias(CONTENT_HASH)
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    raw_json = raw.select("row_number", pl.struct(pl.exclude("row_number"))
                          .struct.json_encode().alias("raw"))
    rejects = rejected.join(raw_json, on="row_number").with_columns(
        pl.lit(run_id).alias("run_id"), pl.lit(now).alias("rejected_at"))
    n = raw.height
    share = rejected.height / n if n else 0.0
    reasons: dict[str, int] = {}
    for r in rejected["reason"].to_list():
        key = r.split(" '")[0] if r.startswith(("duplicate id", "price", "in_stock")) else r
        reasons[key] = reasons.get(key, 0) + 1
    con = connect(warehouse)
    try:
        con.execute("BEGIN")
        if rejects.height:
            con.register("rejects_df", rejects)
            con.execute("INSERT INTO rejects SELECT run_id, row_number, item_id, reason, raw, "
                        "rejected_at FROM rejects_df")
        failed = n == 0 or share > max_reject_share
        new = changed = delisted = listed = 0
        if not failed:
            con.register("incoming", accepted.with_columns(pl.lit(now).alias("updated_at")))
            new, changed = con.execute(f"""
                SELECT count(*) FILTER (WHERE i.item_id IS NULL),
                       count(*) FILTER (WHERE i.item_id IS NOT NULL AND ({_CHANGED}))
                FROM incoming n LEFT JOIN items i USING (item_id)""").fetchone()
            delisted, listed = con.execute("""
                SELECT count(*) FILTER (WHERE item_id NOT IN (SELECT item_id FROM incoming)),
                       count(*)
                FROM items WHERE active""").fetchone()
            shrinks = listed > 0 and delisted > max_delist_share * listed
            failed = shrinks
        if not failed:
            con.execute("""
                UPDATE items SET active = false, updated_at = ?
                WHERE active AND item_id NOT IN (SELECT item_id FROM incoming)""", [now])
            # only new and changed rows are written: an upsert of every row cost a refresh of
            # Home Depot 0.7 s, and an unchanged item keeps the time it last changed
            con.execute(f"""
                INSERT INTO items
                SELECT n.item_id, n.title, n.description, n.category, n.brand, n.price,
                       n.in_stock, n.content_hash, true, n.updated_at
                FROM incoming n LEFT JOIN items i USING (item_id)
                WHERE i.item_id IS NULL OR {_CHANGED}
                ON CONFLICT (item_id) DO UPDATE SET
                    title = excluded.title, description = excluded.description,
                    category = excluded.category, brand = excluded.brand,
                    price = excluded.price, in_stock = excluded.in_stock,
                    content_hash = excluded.content_hash, active = true,
                    updated_at = excluded.updated_at""")
        failpoint("ingest.upserted")
        con.execute("INSERT INTO ingest_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [run_id, str(source), n, 0 if failed else accepted.height, rejected.height,
                     "failed" if failed else "ok", now])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    if n == 0:
        raise CatalogueError(f"catalogue {source} has no rows")
    if failed and share <= max_reject_share:
        raise CatalogueError(
            f"catalogue {source} would delist {delisted} of the {listed} listed items "
            f"({delisted / listed:.1%}), above the limit of {max_delist_share:.0%}: a truncated "
            f"export? Nothing was changed (run {run_id}). To delist that many on purpose, raise "
            "INSTANTREC_MAX_DELIST_SHARE for this run.")
    if failed:
        raise CatalogueError(
            f"catalogue {source}: {rejected.height} of {n} rows rejected ({share:.1%}), above the "
            f"limit of {max_reject_share:.1%}; reasons {reasons}; see table rejects, run {run_id}"
        )
    report = IngestReport(run_id, str(source), n, accepted.height, rejected.height,
                          int(new), int(changed), int(delisted), reasons)
    if rejected.height:
        log.warning("ingest %s: %d rows rejected: %s", run_id, rejected.height, reasons)
    log.info("ingest %s: %s", run_id, report)
    return report
