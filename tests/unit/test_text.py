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


# Emoji sequences: the zero-width joiner (U+200D) and the tag characters are format
# characters, refused elsewhere, but inside an emoji they are what the shopper's phone sent.
FAMILY = "\U0001F469\u200d\U0001F469\u200d\U0001F467"         # woman ZWJ woman ZWJ girl
RAINBOW_FLAG = "\U0001F3F3\ufe0f\u200d\U0001F308"             # white flag VS16 ZWJ rainbow
KEYCAP_ONE = "1\ufe0f\u20e3"
THUMBS_UP_MEDIUM = "\U0001F44D\U0001F3FD"                      # skin tone modifier
TECHNOLOGIST = "\U0001F9D1\U0001F3FD\u200d\U0001F4BB"          # modifier, then ZWJ
HEAD_SHAKING = "\U0001F642\u200d\u2194\ufe0f"                  # Unicode 15.1
SCOTLAND = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"
TEXT_STYLE = "\u2708\ufe0e"                                    # VS15: text presentation


@pytest.mark.parametrize("query", [
    f"{FAMILY} gift", f"{RAINBOW_FLAG} flag", KEYCAP_ONE, f"{THUMBS_UP_MEDIUM} mug",
    f"{TECHNOLOGIST} desk", HEAD_SHAKING, f"{SCOTLAND} scarf", f"{TEXT_STYLE} poster",
    f"Mug {FAMILY}{RAINBOW_FLAG}",
])
def test_emoji_sequences_are_queries_kept_as_typed(query):
    text = normalise_query(query)
    assert text == query.casefold()          # nothing dropped: the joiners and tags included
    assert normalise_query(text) == text     # idempotent


@pytest.mark.parametrize("bad, message", [
    ("a\u200db", "U+200D at position 1"),                       # joins no emoji
    ("\U0001F469\u200d gift", "U+200D at position 1"),         # joins an emoji to a space
    ("\u200d\U0001F469", "U+200D at position 0"),
    # U+2122 (TM) is an emoji that NFKC turns into "tm": a joiner after it would join letters
    ("\u2122\u200d\U0001F469", "U+200D at position 1"),
    ("x\U000E0067\U000E007F", "U+E0067 at position 1"),         # tags after no flag
    ("\U0001F3F4\U000E0067\U000E0062", "U+E0067 at position 1"),  # no cancel tag
    ("drill\u202egnp.exe", "U+202E at position 5"),             # bidi override
    ("a\u2066b", "U+2066"), ("a\u200fb", "U+200F"),             # bidi isolate, RLM
    ("a\x85b", "U+0085"), ("a\x1bb", "U+001B"),                 # C1 and C0 controls
    (f"{FAMILY}\u200b", "U+200B"),                              # zero-width space
])
def test_format_characters_outside_emoji_are_still_refused(bad, message):
    with pytest.raises(QueryError, match=re.escape(message)):
        normalise_query(bad)
