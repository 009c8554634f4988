from __future__ import annotations

import re

import pytest

from serving.errors import QueryError
from serving.text import clean_text, item_text, normalise_query


def test_query_is_case_folded_and_whitespace_collapsed():
    assert normalise_query("  Cordless   DRILL\t20V ") == "cordless drill 20v"


def test_query_keeps_sizes_fractions_and_model_numbers():
    assert normalise_query("3/4 in. Copper Pipe 1-Gal DCD771C2") == "3/4 in. copper pipe 1-gal dcd771c2"


def test_query_folds_unicode_variants():
    # full-width letters (NFKC), typographic quotes and dashes
    assert normalise_query("\uff34\uff36 \u201cSmart\u201d 55\u2013inch") == 'tv "smart" 55-inch'


@pytest.mark.parametrize("bad, message", [
    ("", "empty"),
    ("   \t ", "empty"),
    ("x" * 257, "257 characters"),
    ("drill\x07", "U+0007 at position 5"),
    ("zero\u200bwidth", "U+200B"),
    (None, "must be a string"),
    (42, "must be a string"),
    ("drill\ud800", "lone surrogate U+D800 at position 5"),  # json.loads('"\\ud800"')
])
def test_bad_queries_are_rejected_with_the_reason(bad, message):
    with pytest.raises(QueryError, match=re.escape(message)):
        normalise_query(bad)


def test_query_length_limit_is_configurable():
    assert normalise_query("a" * 10, max_chars=10) == "a" * 10
    with pytest.raises(QueryError):
        normalise_query("a" * 11, max_chars=10)


def test_clean_text_strips_html_and_control_characters_but_keeps_case():
    assert clean_text("<p>Heavy&nbsp;Duty\x00 <b>Drill</b></p>\n") == "Heavy Duty Drill"


def test_item_text_puts_title_first_and_skips_missing_parts():
    assert item_text("Drill", "DeWalt", None, "") == "Drill. Brand: DeWalt"
    assert item_text("Drill", None, "Tools", "Cordless.") == "Drill. Category: Tools. Cordless."
