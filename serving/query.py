"""Query understanding: small rewrites of a normalised query before retrieval.

Each step is a plain function from text to text and can be switched on or off on its own;
:func:`understand_query` applies the enabled ones in a fixed order. Input is the output of
:func:`serving.text.normalise_query` (case-folded, white space collapsed).

- ``units``: sizes and units spelled one way (``1-gal``/``1 gal.``/``1gallon`` ->
  ``1 gallon``, ``3/4 in.``/``3/4"`` -> ``3/4 inch``, ``20v`` -> ``20 volt``). The lexical
  index applies the same rewrite to item text (see :mod:`serving.lexical`), so both sides
  agree.
- ``dimensions``: ``2x4``/``14*32`` -> ``2 x 4``/``14 x 32``, so each size is a term.
- ``compounds``: a word the catalogue does not know that is two catalogue words run
  together is split (``harleydavidson`` -> ``harley davidson``); two adjacent words whose
  concatenation is a catalogue word, one of them unknown, are joined.
- ``spelling``: a word the catalogue does not know is replaced by the closest catalogue
  word (edit distance 1 for words of 4-5 letters, 2 from 6 letters; ties go to the word in
  more documents). Numbers, model numbers (letters mixed with digits), words of fewer
  than 4 letters and known words are never touched.

``compounds`` and ``spelling`` need the catalogue's :class:`Vocabulary`, built once per
catalogue (a few seconds for 50k titles); a call then costs well under a millisecond per
unknown word, and nothing for known ones.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, Literal, get_args

from serving.errors import InvalidInputError

Step = Literal["units", "dimensions", "compounds", "spelling"]
Channel = Literal["lexical", "dense"]
#: Every step, in the order :func:`understand_query` applies them.
ALL_STEPS: tuple[Step, ...] = get_args(Step)
#: The steps that measurably improved retrieval on the development queries.
DEFAULT_STEPS: tuple[Step, ...] = ("units", "dimensions", "compounds", "spelling")
#: Steps for the lexical channel only: splitting "2x4" helps BM25 (done to item text too, see
#: :class:`serving.lexical.LexicalIndex`) but cost the encoder a little on the development
#: queries, so the dense channel's query skips them.
LEXICAL_ONLY_STEPS: frozenset[Step] = frozenset({"dimensions"})

MIN_CORRECTED_LENGTH = 4      # shorter words are too often abbreviations or brands
LONG_WORD_LENGTH = 6          # from this length two edits are allowed, below it one
MIN_SPLIT_PART = 3            # each half of a split compound has at least this many letters

# --- units -----------------------------------------------------------------------------

# A number as written in sizes: 3, 1.5, 3/4, 1-1/2.
_NUM = r"\d+(?:[./]\d+)*(?:-\d+/\d+)?"
# Not part of a model number or a paint code ("cr123a", "#470a", "bb-134a").
_START = r"(?<![\w.#/-])"

# canonical unit -> spellings (regex alternatives, longest first where prefixes overlap)
_WORD_UNITS: dict[str, str] = {
    "square foot": r"sq\.?\s*f(?:ee|oo)?t|square\s*f(?:ee|oo)t|sqft",
    "cubic foot": r"cu\.?\s*f(?:ee|oo)?t|cubic\s*f(?:ee|oo)t|cuft",
    "fluid ounce": r"fl\.?\s*oz|fluid\s*ounces?",
    "inch": r"inch(?:es)?|in",
    "foot": r"f(?:ee|oo)t|ft",
    "gallon": r"gallons?|gals?",
    "quart": r"quarts?|qts?",
    "pound": r"pounds?|lbs?",
    "ounce": r"ounces?|oz",
    "volt": r"volts?",
    "amp": r"amperes?|amps?",
    "watt": r"watts?",
    "yard": r"yards?|yds?",
    "gauge": r"gauge|ga",
    "mm": r"millimet(?:er|re)s?|mm",
    "cm": r"centimet(?:er|re)s?|cm",
    "btu": r"btus?",
    "piece": r"pieces?|pcs?",
    "pack": r"packs?|pk",
    "degree": r"degrees?|deg",
}
# Only glued to the number or after a hyphen ("20v", "15-a", "60w"): spaced, a single
# letter is as likely a word or a dimension label ("36 in. w x 80 in. h").
_LETTER_UNITS = {"v": "volt", "a": "amp", "w": "watt"}
# Glued abbreviations that keep their spelling but become a term of their own ("2tb").
_GLUED = ("gb", "tb", "mb", "hp", "cfm", "psi", "gpm", "gpf", "mph", "cc", "mah", "ah", "hz",
          "kw")

_WORD_UNIT_RE = re.compile(
    _START + rf"({_NUM})\s*-?\s*(?:"
    + "|".join(f"(?P<u{i}>{alts})" for i, alts in enumerate(_WORD_UNITS.values()))
    + r")\b\.?"
)
_WORD_UNIT_NAMES = {f"u{i}": name for i, name in enumerate(_WORD_UNITS)}
_LETTER_UNIT_RE = re.compile(_START + rf"({_NUM})-?([vaw])\b\.?")
_GLUED_RE = re.compile(_START + rf"({_NUM})-?({'|'.join(_GLUED)})\b")
# Inch and foot marks: '' and " are inches; ' is feet, except after a fraction ("3/4'"
# is three quarters of an inch: fractional feet are not a size anyone writes).
_MARK_RE = re.compile(_START + rf"({_NUM})\s*(''|\"|')")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SPACES_RE = re.compile(r"\s+")


def _word_unit(match: re.Match[str]) -> str:
    name = next(_WORD_UNIT_NAMES[k] for k, v in match.groupdict().items() if v is not None)
    return f"{match.group(1)} {name} "


def _mark_unit(match: re.Match[str]) -> str:
    number, mark = match.group(1), match.group(2)
    inch = mark != "'" or "/" in number
    return f"{number} {'inch' if inch else 'foot'} "


def normalise_units(text: str) -> str:
    """Spell every number-plus-unit one way: ``"1-gal."`` -> ``"1 gallon"``,
    ``'3/4"'`` -> ``"3/4 inch"``, ``"20v"`` -> ``"20 volt"``, ``"3,250-watt"`` ->
    ``"3250 watt"``. Idempotent; expects case-folded text."""
    text = _THOUSANDS_RE.sub("", text)
    text = _MARK_RE.sub(_mark_unit, text)
    text = _WORD_UNIT_RE.sub(_word_unit, text)
    text = _LETTER_UNIT_RE.sub(lambda m: f"{m.group(1)} {_LETTER_UNITS[m.group(2)]} ", text)
    text = _GLUED_RE.sub(r"\1 \2 ", text)
    return _SPACES_RE.sub(" ", text).strip()


# --- dimensions ------------------------------------------------------------------------

_DIM_RE = re.compile(rf"(?<![a-z])({_NUM})\s*[x*]\s*(?={_NUM})")


def split_dimensions(text: str) -> str:
    """``"2x4"`` -> ``"2 x 4"``, ``"10x30x1"`` -> ``"10 x 30 x 1"``, ``"14*32"`` ->
    ``"14 x 32"``; model numbers that merely contain an x ("gen5x") are kept."""
    prev = None
    while prev != text:  # overlapping chains ("10x30x1") need a second pass
        prev, text = text, _DIM_RE.sub(r"\1 x ", text)
    return text


# --- vocabulary, spelling, compounds ---------------------------------------------------

_WORD_RE = re.compile(r"\w+")


class Vocabulary:
    """The words of a catalogue with their document frequencies, indexed for spelling.

    ``frequencies`` maps each (case-folded) word to the number of items containing it.
    ``stem``, when given, lets a word count as known if its stem is a known stem ("drills"
    where the catalogue only says "drill"). The spelling index (the symmetric-delete index of
    :mod:`symspellpy`, a few seconds for ~20k words) is built on first use or by
    :meth:`warm`; lookups are then cheap. Safe to share between threads.
    """

    def __init__(self, frequencies: Mapping[str, int],
                 stem: Callable[[list[str]], list[str]] | None = None) -> None:
        self.frequencies = dict(frequencies)
        self._stem = stem
        self._stem_lock = threading.Lock()  # Snowball stemmers keep state between calls
        words = list(self.frequencies)
        self._stems = frozenset(stem(words)) if stem is not None else frozenset()
        self._speller: Any = None
        self._build_lock = threading.Lock()
        # Bounded memo: serving sees the same few misspellings over and over.
        self._memo = lru_cache(maxsize=8192)(self._correction)

    def warm(self) -> Vocabulary:
        """Build the spelling index now (serving does, before a release goes live)."""
        self._spelling()
        return self

    def _spelling(self) -> Any:
        if self._speller is None:
            with self._build_lock:
                if self._speller is None:
                    from symspellpy import SymSpell

                    speller = SymSpell(max_dictionary_edit_distance=2, prefix_length=7)
                    for word, count in self.frequencies.items():
                        if word.isalpha() and count > 0:
                            speller.create_dictionary_entry(word, count)
                    self._speller = speller
        return self._speller

    def knows(self, word: str) -> bool:
        """Whether ``word``, or its stem, occurs in the catalogue."""
        if word in self.frequencies:
            return True
        if self._stem is None:
            return False
        with self._stem_lock:
            stem = self._stem([word])[0]
        return stem in self._stems

    def count(self, word: str) -> int:
        return self.frequencies.get(word, 0)

    def _correction(self, word: str) -> str | None:
        from symspellpy import Verbosity

        if not correctable(word) or self.knows(word):
            return None
        distance = 2 if len(word) >= LONG_WORD_LENGTH else 1
        found = self._spelling().lookup(word, Verbosity.CLOSEST, max_edit_distance=distance)
        # CLOSEST: smallest distance first, then most documents
        return found[0].term if found else None

    def correction(self, word: str) -> str | None:
        """The catalogue word to use instead of ``word``, or None to keep it as typed."""
        return self._memo(word)

    def split(self, word: str) -> tuple[str, str] | None:
        """Two known words that ``word`` (unknown, letters only, and with no spelling
        correction: "furnance" is a typo of "furnace", not "fur nance") is made of; the
        split whose rarer half is in most documents wins."""
        if (not word.isalpha() or len(word) < 2 * MIN_SPLIT_PART or self.knows(word)
                or self.correction(word) is not None):
            return None
        best, best_count = None, 0
        for i in range(MIN_SPLIT_PART, len(word) - MIN_SPLIT_PART + 1):
            left, right = word[:i], word[i:]
            count = min(self.count(left), self.count(right))
            if count > best_count:
                best, best_count = (left, right), count
        return best


def correctable(word: str) -> bool:
    """Only plain words of at least :data:`MIN_CORRECTED_LENGTH` letters are ever corrected:
    numbers, sizes and model numbers (letters mixed with digits) are taken as typed."""
    return word.isalpha() and len(word) >= MIN_CORRECTED_LENGTH


def correct_spelling(text: str, vocabulary: Vocabulary) -> str:
    """Replace each unknown word of ``text`` by its closest catalogue word (see
    :meth:`Vocabulary.correction`); everything else is kept as typed."""

    def fix(match: re.Match[str]) -> str:
        return vocabulary.correction(match.group(0)) or match.group(0)

    return _WORD_RE.sub(fix, text)


def split_compounds(text: str, vocabulary: Vocabulary) -> str:
    """Split unknown words that are two catalogue words run together; join two adjacent
    words into one catalogue word when either of them is unknown (``"dewalt"`` for
    ``"de walt"`` in a catalogue that only writes "dewalt")."""
    tokens = text.split(" ")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if (tok.isalpha() and nxt.isalpha() and vocabulary.count(tok + nxt) > 1
                and not (vocabulary.knows(tok) and vocabulary.knows(nxt))):
            out.append(tok + nxt)
            i += 2
            continue
        parts = vocabulary.split(tok)
        out.extend(parts if parts else (tok,))
        i += 1
    return " ".join(out)


NEEDS_VOCABULARY: frozenset[Step] = frozenset({"compounds", "spelling"})


def parse_steps(value: str | Iterable[str] | None) -> tuple[Step, ...]:
    """Steps from a comma list or an iterable (``"none"`` or empty: no step; ``None``: the
    defaults), in the order they are applied. Raises :class:`InvalidInputError` (a
    ValueError) naming an unknown step."""
    if value is None:
        return DEFAULT_STEPS
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value)]
    names = [s for s in names if s and s != "none"]
    unknown = sorted(set(names) - set(ALL_STEPS))
    if unknown:
        raise InvalidInputError(f"unknown query step(s) {unknown}; known: {list(ALL_STEPS)}")
    return tuple(s for s in ALL_STEPS if s in names)


def understand_query(text: str, steps: Iterable[str] = DEFAULT_STEPS,
                     vocabulary: Vocabulary | None = None, channel: Channel = "lexical") -> str:
    """Apply the enabled ``steps`` to a normalised query, in the order of :data:`ALL_STEPS`.

    ``vocabulary`` is the catalogue's (required by ``compounds`` and ``spelling``: asking for
    them without one is a ValueError, not a silent no-op). ``channel="dense"`` leaves out the
    :data:`LEXICAL_ONLY_STEPS`: the text to give the encoder.
    """
    enabled = parse_steps(steps)
    if channel == "dense":
        enabled = tuple(s for s in enabled if s not in LEXICAL_ONLY_STEPS)
    if vocabulary is None and NEEDS_VOCABULARY & set(enabled):
        raise ValueError(f"query steps {sorted(NEEDS_VOCABULARY & set(enabled))} need the "
                         "catalogue vocabulary")
    for step in enabled:
        if step == "units":
            text = normalise_units(text)
        elif step == "dimensions":
            text = split_dimensions(text)
        elif step == "compounds":
            assert vocabulary is not None
            text = split_compounds(text, vocabulary)
        elif step == "spelling":
            assert vocabulary is not None
            text = correct_spelling(text, vocabulary)
    return _SPACES_RE.sub(" ", text).strip()
