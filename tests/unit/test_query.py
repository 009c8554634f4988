from __future__ import annotations

import pytest
import Stemmer

from serving.lexical import LEGACY_TOKEN_PATTERN, LexicalIndex
from serving.query import (
    ALL_STEPS,
    DEFAULT_STEPS,
    Vocabulary,
    correct_spelling,
    normalise_units,
    parse_steps,
    split_compounds,
    split_dimensions,
    understand_query,
)


@pytest.mark.parametrize("raw, expected", [
    ("1-gal bucket", "1 gallon bucket"),
    ("1 gal. paint", "1 gallon paint"),
    ("1gallon", "1 gallon"),
    ("5 gallons", "5 gallon"),
    ("3/4 in. copper pipe", "3/4 inch copper pipe"),
    ('3/4" pipe', "3/4 inch pipe"),
    ("1-1/2 in. pvc", "1-1/2 inch pvc"),
    ("36 inches wide", "36 inch wide"),
    ("42 in bathroom vanity", "42 inch bathroom vanity"),
    ("8 ft. ladder", "8 foot ladder"),
    ("12 feet", "12 foot"),
    ("16' by 12' door", "16 foot by 12 foot door"),
    # a fractional foot is not a size anyone writes: the mark means inches there
    ("3/4' plywood", "3/4 inch plywood"),
    ("80 lb. bag", "80 pound bag"),
    ("50lbs", "50 pound"),
    ("16 oz. can", "16 ounce can"),
    ("5 fl. oz.", "5 fluid ounce"),
    ("500 sq. ft.", "500 square foot"),
    ("5.3 cu. ft. washer", "5.3 cubic foot washer"),
    ("20v dewalt", "20 volt dewalt"),
    ("7.2volt battery", "7.2 volt battery"),
    ("18-volt drill", "18 volt drill"),
    ("12v 20w", "12 volt 20 watt"),
    ("2 pole 30a breaker", "2 pole 30 amp breaker"),
    ("3,250-watt generator", "3250 watt generator"),
    ("14-gauge wire", "14 gauge wire"),
    ("2tb drive", "2 tb drive"),
    ("8mm", "8 mm"),
    ("3-piece set", "3 piece set"),
])
def test_units_are_spelled_one_way(raw, expected):
    assert normalise_units(raw) == expected


@pytest.mark.parametrize("kept", [
    "dcd771c2", "cr123a battery", "#470a-1 paint", "bb-134a", "3m tape", "40t12cw",
    "le chateau 7081m-yel", "gallon bucket", "1/2 hp", "120-277v",
])
def test_units_leave_model_numbers_codes_and_bare_words_alone(kept):
    assert normalise_units(kept) == kept


def test_a_spaced_single_letter_is_a_label_not_a_unit():
    assert normalise_units("36 in. w x 80 in. h") == "36 inch w x 80 inch h"
    assert normalise_units("60w 12-v") == "60 watt 12 volt"


@pytest.mark.parametrize("text", ["1 gallon", "3/4 inch", "5 square foot", "20 volt 4 amp",
                                  "1-1/2 inch", "6 fluid ounce"])
def test_units_are_idempotent(text):
    assert normalise_units(text) == text
    assert normalise_units(normalise_units("1-gal. 3/4 in. 20v")) == "1 gallon 3/4 inch 20 volt"


@pytest.mark.parametrize("raw, expected", [
    ("2x4 lumber", "2 x 4 lumber"),
    ("10x30x1 filter", "10 x 30 x 1 filter"),
    ("14*32 window", "14 x 32 window"),
    ("3/4x4x8", "3/4 x 4 x 8"),
    ("gen5x drill", "gen5x drill"),
    ("x-large", "x-large"),
])
def test_dimensions(raw, expected):
    assert split_dimensions(raw) == expected


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    counts = {"refrigerator": 10, "vanity": 5, "dainty": 1, "hammer": 8, "drill": 7,
              "dewalt": 6, "dcd771c": 2, "harley": 3, "davidson": 3, "closetmaid": 4,
              "closet": 9, "hand": 12, "saw": 11, "handsaw": 2, "furnace": 5, "fur": 4,
              "nance": 4, "kobo": 1, "the": 30}
    return Vocabulary(counts, stem=Stemmer.Stemmer("english").stemWords)


@pytest.mark.parametrize("typed, corrected", [
    ("refrigirator", "refrigerator"),   # one substitution
    ("refrgeratr", "refrigerator"),     # two edits allowed from 6 letters on
    ("hammmer", "hammer"),              # one insertion
    ("hamer", "hammer"),                # one deletion, 5 letters
    ("dril", "drill"),                  # 4 letters: one edit
    ("vainty", "vanity"),               # a transposition is one edit; "dainty" is as close
                                        # but in fewer documents
])
def test_spelling_corrects_unknown_words_to_the_closest_frequent_catalogue_word(
        vocabulary, typed, corrected):
    assert vocabulary.correction(typed) == corrected


def test_the_spelling_index_is_built_on_first_use_or_when_warmed():
    lazy = Vocabulary({"cart": 9, "card": 2})
    assert lazy._speller is None and lazy.knows("cart")  # knowing words needs no index
    assert lazy.correction("carx") == "cart" and lazy._speller is not None
    warmed = Vocabulary({"cart": 9}).warm()
    assert warmed._speller is not None


def test_ties_go_to_the_word_in_more_documents():
    assert Vocabulary({"cart": 9, "card": 2}).correction("carx") == "cart"
    assert Vocabulary({"cart": 2, "card": 9}).correction("carx") == "card"


@pytest.mark.parametrize("kept", [
    "hmer",       # 4 letters, two edits from "hammer": too far for a short word
    "drl",        # under 4 letters: never corrected
    "dcd771c2",   # a model number, one edit from a catalogue token
    "1234",       # a number
    "drills",     # unknown as typed, but its stem is a catalogue stem
    "kobo",       # known, however rare
    "zzzzzz",     # nothing close
])
def test_spelling_leaves_model_numbers_numbers_short_and_known_words_alone(vocabulary, kept):
    assert vocabulary.correction(kept) is None


def test_correct_spelling_rewrites_only_the_unknown_words(vocabulary):
    assert (correct_spelling("dewalt dril dcd771c2 20 volt 3/4 the hamer", vocabulary)
            == "dewalt drill dcd771c2 20 volt 3/4 the hammer")


def test_compounds_split_and_join(vocabulary):
    assert split_compounds("harleydavidson", vocabulary) == "harley davidson"
    assert split_compounds("closet maid drawer", vocabulary) == "closetmaid drawer"
    # both halves known: the shopper's spacing is kept
    assert split_compounds("hand saw", vocabulary) == "hand saw"
    # a typo with a correction is not split into catalogue fragments
    assert split_compounds("furnance", vocabulary) == "furnance"


def test_understand_query_applies_steps_in_order(vocabulary):
    q = "1-gal refrigirator 2x4 harleydavidson"
    assert understand_query(q, (), vocabulary) == q
    assert understand_query(q, ["units"], vocabulary) == "1 gallon refrigirator 2x4 harleydavidson"
    assert (understand_query(q, ALL_STEPS, vocabulary)
            == "1 gallon refrigerator 2 x 4 harley davidson")
    # the encoder's query skips the lexical-only steps (dimensions)
    assert (understand_query(q, ALL_STEPS, vocabulary, channel="dense")
            == "1 gallon refrigerator 2x4 harley davidson")


def test_steps_are_parsed_and_validated():
    assert parse_steps("none") == ()
    assert parse_steps("") == ()
    assert parse_steps(None) == DEFAULT_STEPS
    assert parse_steps("spelling, units") == ("units", "spelling")  # applied in a fixed order
    with pytest.raises(ValueError, match="unknown query step"):
        parse_steps("units,stemming")
    with pytest.raises(ValueError, match="need the catalogue vocabulary"):
        understand_query("drill", ["spelling"])
    assert understand_query("20v drill", ["units"]) == "20 volt drill"


def test_lexical_tokens_keep_numbers_fractions_units_and_dimensions():
    ix = LexicalIndex.build(["Copper pipe", "Drill"])
    assert ix.tokens("3/4 in. Copper Pipes 1-Gal 7.2V 2x4") == [
        "3/4", "inch", "copper", "pipe", "1", "gallon", "7.2", "volt", "2", "4"]
    legacy = LexicalIndex.build(["Copper pipe", "Drill"], LEGACY_TOKEN_PATTERN, units=False,
                                dimensions=False)
    # bm25s' default pattern: one-character tokens and the parts of 3/4, 7.2 are lost
    assert legacy.tokens("3/4 in. Copper Pipes 1-Gal 7.2V 2x4") == [
        "copper", "pipe", "gal", "2v", "2x4"]


def test_item_and_query_units_meet_in_the_lexical_index():
    ix = LexicalIndex.build(["Behr 1-Gal. Paint", "Behr 5 gal. Paint", "2 in. x 4 in. Stud",
                             "Paint Brush"])
    assert ix.search("1 gallon paint", 4)[0].tolist() == [0, 1, 3]
    assert ix.search("5 gallons", 4)[0].tolist() == [1, 0]  # both say gallon; one says 5
    assert ix.search("2x4", 4)[0].tolist() == [2]


def test_lexical_words_are_document_frequencies_and_survive_save(tmp_path):
    ix = LexicalIndex.build(["Drill 20V drill", "the drill bit"])
    assert ix.words == {"drill": 2, "20": 1, "volt": 1, "the": 1, "bit": 1}
    ix.save(tmp_path)
    back = LexicalIndex.load(tmp_path)
    assert back.words == ix.words
    assert (back.token_pattern, back.units, back.dimensions) == (ix.token_pattern, True, True)
    assert back.tokens("20v drills") == ["20", "volt", "drill"]
