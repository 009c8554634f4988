from __future__ import annotations

import json

import duckdb
import polars as pl
import pytest

from pipelines.catalogue.ingest import ingest_catalogue
from serving.errors import CatalogueError
from tests.conftest import write_rows

GOOD = [
    {"id": "A1", "title": "Cordless Drill 20V", "description": "Drill.", "category": "Tools",
     "brand": "DeWalt", "price": "99.00", "in_stock": "true"},
    {"id": "A2", "title": "Cast Iron Skillet 12 in.", "description": "", "category": "Kitchen",
     "brand": "Lodge", "price": "$34.90", "in_stock": "no"},
    {"id": "A3", "title": "Yoga Mat", "description": "<b>6 mm</b> thick", "category": "Sports",
     "brand": "", "price": "", "in_stock": ""},
]


def rows_of(db, sql):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_ingest_normalises_and_upserts(tmp_path):
    db = tmp_path / "w.duckdb"
    report = ingest_catalogue(write_rows(tmp_path / "c.csv", GOOD), db)
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (3, 3, 0)
    assert report.items_new == 3
    rows = rows_of(db, "SELECT item_id, description, brand, price, in_stock FROM items ORDER BY 1")
    assert rows == [("A1", "Drill.", "DeWalt", 99.0, True), ("A2", None, "Lodge", 34.9, False),
                    ("A3", "6 mm thick", None, None, True)]


def test_bad_rows_are_rejected_with_reasons_and_kept(tmp_path):
    bad = GOOD + [
        {**GOOD[0], "id": ""},
        {**GOOD[0], "id": "B2", "title": "  "},
        {**GOOD[0], "id": "B3", "price": "twelve"},
        {**GOOD[0], "id": "B4", "price": "-3"},
        {**GOOD[0], "id": "B5", "in_stock": "maybe"},
        {**GOOD[0], "id": "DUP", "title": "first"},
        {**GOOD[0], "id": "DUP", "title": "second"},
    ]
    db = tmp_path / "w.duckdb"
    report = ingest_catalogue(write_rows(tmp_path / "c.csv", bad), db, max_reject_share=0.8)
    assert report.rows_rejected == 7 and report.rows_accepted == 3
    rejects = rows_of(db, "SELECT row_number, reason, raw FROM rejects ORDER BY row_number")
    reasons = {r[0]: r[1] for r in rejects}
    assert reasons[4] == "missing id"
    assert reasons[5] == "missing title"
    assert reasons[6] == "price 'twelve' is not a number"
    assert reasons[7] == "price '-3' is not a finite non-negative number"
    assert reasons[8] == "in_stock 'maybe' is not true/false"
    assert reasons[9] == reasons[10] == "duplicate id 'DUP' (2 rows share it)"
    # nothing is lost: the raw row is kept beside the reason
    assert json.loads(rejects[2][2])["price"] == "twelve"
    assert rows_of(db, "SELECT count(*) FROM items")[0][0] == 3


def test_ingest_fails_above_the_reject_limit_but_keeps_the_rejects(tmp_path):
    bad = GOOD + [{**GOOD[0], "id": "", "title": ""}] * 2
    db = tmp_path / "w.duckdb"
    with pytest.raises(CatalogueError, match=r"2 of 5 rows rejected \(40.0%\)"):
        ingest_catalogue(write_rows(tmp_path / "c.csv", bad), db, max_reject_share=0.1)
    assert rows_of(db, "SELECT count(*) FROM rejects")[0][0] == 2
    assert rows_of(db, "SELECT count(*) FROM items")[0][0] == 0
    assert rows_of(db, "SELECT status FROM ingest_runs")[0][0] == "failed"


def test_missing_columns_and_files_are_named(tmp_path):
    with pytest.raises(CatalogueError, match="no 'title' column"):
        ingest_catalogue(write_rows(tmp_path / "c.csv", [{"id": "1", "name": "x"}]),
                         tmp_path / "w.duckdb")
    with pytest.raises(CatalogueError, match="no id column"):
        ingest_catalogue(write_rows(tmp_path / "d.csv", [{"title": "x"}]), tmp_path / "w.duckdb")
    with pytest.raises(CatalogueError, match="does not exist"):
        ingest_catalogue(tmp_path / "nope.csv", tmp_path / "w.duckdb")


def test_price_change_keeps_content_hash_and_missing_items_are_delisted(tmp_path):
    db = tmp_path / "w.duckdb"
    ingest_catalogue(write_rows(tmp_path / "c1.csv", GOOD), db)
    before = dict(rows_of(db, "SELECT item_id, content_hash FROM items"))
    changed = [{**GOOD[0], "price": "79.00"}, {**GOOD[1], "title": "Cast Iron Skillet 10 in."}]
    report = ingest_catalogue(write_rows(tmp_path / "c2.csv", changed), db, max_delist_share=0.5)
    assert (report.items_new, report.items_changed, report.items_delisted) == (0, 2, 1)
    after = dict(rows_of(db, "SELECT item_id, content_hash FROM items"))
    assert after["A1"] == before["A1"]  # price only: no re-embedding needed
    assert after["A2"] != before["A2"]  # title changed: must be re-embedded
    assert rows_of(db, "SELECT item_id FROM items WHERE NOT active") == [("A3",)]


def test_a_truncated_snapshot_is_refused_and_changes_nothing(tmp_path):
    db = tmp_path / "w.duckdb"
    ingest_catalogue(write_rows(tmp_path / "c1.csv", GOOD), db)
    before = rows_of(db, "SELECT * FROM items ORDER BY item_id")
    # the first row alone, a changed price in it: 2 of 3 listed items would go
    truncated = write_rows(tmp_path / "c2.csv", [{**GOOD[0], "price": "1.00"}])
    with pytest.raises(CatalogueError, match=r"would delist 2 of the 3 listed items \(66.7%\)"):
        ingest_catalogue(truncated, db)
    assert rows_of(db, "SELECT * FROM items ORDER BY item_id") == before
    assert rows_of(db, "SELECT status FROM ingest_runs ORDER BY finished_at DESC LIMIT 1") == [
        ("failed",)]
    report = ingest_catalogue(truncated, db, max_delist_share=1.0)  # on purpose
    assert report.items_delisted == 2


@pytest.mark.parametrize("header, meant", [
    ("In_Stock", "in_stock"), ("price ", "price"), ("Price", "price"),
    ("descripton", "description"), ("in-stock", "in_stock"),
])
def test_a_near_miss_header_is_an_error_naming_the_column(tmp_path, header, meant):
    rows = [{("title" if k == "title" else header if k == meant else k): v
             for k, v in r.items()} for r in GOOD]
    with pytest.raises(CatalogueError, match=f"column {header!r} is not a known column; "
                                             f"did you mean {meant!r}"):
        ingest_catalogue(write_rows(tmp_path / "c.csv", rows), tmp_path / "w.duckdb")


def test_double_carriage_return_line_ends_are_named(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"id,title,price,in_stock\r\r\nA1,Drill,10.00,false\r\r\n")
    with pytest.raises(CatalogueError, match="check the file's line ends"):
        ingest_catalogue(path, tmp_path / "w.duckdb")


def test_unknown_columns_are_ignored_with_a_warning(tmp_path, caplog):
    rows = [{**r, "colour": "red"} for r in GOOD]
    report = ingest_catalogue(write_rows(tmp_path / "c.csv", rows), tmp_path / "w.duckdb")
    assert report.rows_accepted == 3 and "ignoring unknown columns ['colour']" in caplog.text


def test_parquet_catalogue_with_product_uid_column(tmp_path):
    import polars as pl

    path = tmp_path / "p.parquet"
    pl.DataFrame({"product_uid": [1, 2], "title": ["Drill", "Saw"]}).write_parquet(path)
    report = ingest_catalogue(path, tmp_path / "w.duckdb")
    assert report.rows_accepted == 2
    assert rows_of(tmp_path / "w.duckdb", "SELECT item_id FROM items ORDER BY 1") == [("1",), ("2",)]


def test_clean_series_equals_clean_text_on_every_value():
    import random

    from pipelines.catalogue.ingest import clean_series
    from serving.text import clean_text

    rng = random.Random(0)
    alphabet = list("abcXYZ019 -/.\"'") + [" ", "  ", "<b>", "&amp;", "\t", "\n", "\x00",
                                              "\u200b", "\u2019", "\uff21", "é", "\u00a0"]
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
              for _ in range(20_000)] + [None, "", " ", "plain title", "Drill 18V, 1/2 in."]
    series = pl.Series("v", values, dtype=pl.String)
    expected = [None if v is None else clean_text(v) for v in values]
    assert clean_series(series).to_list() == expected
