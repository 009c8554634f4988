"""Text normalisation shared by catalogue ingestion and query understanding."""

from __future__ import annotations

import html
import re
import unicodedata

# the third-party `regex` (a requirement of transformers): the standard library knows no emoji
# properties, and its Unicode tables lag the emoji shoppers' phones send
import regex

from serving.errors import QueryError

_WS = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]{0,200}>")
# Typographic variants that shoppers paste from product pages; folded to their ASCII forms.
_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                       "\u2013": "-", "\u2014": "-", "\u00d7": "x"})


_BREAKS = str.maketrans("\t\n\r", "   ")


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r"


# Format characters that are part of an emoji rather than hidden text: the zero-width joiner
# between two emoji (woman, ZWJ, girl; white flag, VS16, ZWJ, rainbow), and the tag characters
# after a flag (black flag, tags "gbsct", cancel tag: the flag of Scotland). An emoji here is an
# Extended_Pictographic character that NFKC and case folding leave alone (U+2122 becomes "tm",
# after which a joiner would join nothing, and a normalised query must normalise to itself).
_EMOJI = (r"[\p{Extended_Pictographic}--[\u203c\u2049\u2122\u2139\u24c2\u3297\u3299"
          r"\U0001F201\U0001F202\U0001F21A\U0001F22F\U0001F232-\U0001F23A\U0001F250\U0001F251]]")
_EMOJI_JOINER = regex.compile(_EMOJI + r"(?:\ufe0f|\p{Emoji_Modifier})?(\u200d)(?=" + _EMOJI + ")",
                              regex.V1)
_EMOJI_TAGS = regex.compile(_EMOJI + r"([\U000E0020-\U000E007E]+\U000E007F)", regex.V1)
_JOINERS = frozenset("\u200d") | frozenset(map(chr, range(0xE0020, 0xE0080)))


def _emoji_format_positions(text: str) -> set[int]:
    """Positions in ``text`` of the joiners and tag characters that belong to an emoji."""
    allowed = {m.start(1) for m in _EMOJI_JOINER.finditer(text)}
    for m in _EMOJI_TAGS.finditer(text):
        allowed.update(range(m.start(1), m.end(1)))
    return allowed


def _is_surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udfff"


def clean_text(value: str) -> str:
    """Unicode-normalise (NFKC), drop control characters and HTML, collapse white space.

    Case is kept: this is what the catalogue displays.
    """
    text = unicodedata.normalize("NFKC", value).translate(_FOLD)
    # tabs and line breaks become spaces (white space is collapsed below anyway); text with
    # nothing else unprintable, the common case, has no control character to drop
    text = html.unescape(_TAG.sub(" ", text)).translate(_BREAKS)
    if not text.isprintable():
        text = "".join(ch for ch in text if not _is_control(ch))
    return _WS.sub(" ", text).strip()


def normalise_query(query: object, max_chars: int = 256) -> str:
    """Validate a shopper's raw query and return its normalised form.

    Model numbers, sizes and fractions ("dcd771c2", "3/4 in.", "1-gal") are kept as typed;
    case is folded, since the encoder's vocabulary is uncased. Raises :class:`QueryError`
    naming the problem for non-strings, empty queries, over-long queries (``max_chars``
    characters before normalisation) and control characters: C0 and C1 controls and invisible
    format characters (zero-width space, bidi overrides and marks), except the zero-width
    joiners and tag characters inside an emoji sequence (a family "woman ZWJ woman ZWJ girl",
    the flag of Scotland); variation selectors, keycaps and skin tones are marks or symbols,
    never refused.
    """
    if not isinstance(query, str):
        raise QueryError(f"query must be a string, got {type(query).__name__}", "query")
    if len(query) > max_chars:
        raise QueryError(f"query is {len(query)} characters long; the limit is {max_chars}",
                         "query")
    emoji: set[int] | None = None
    for pos, ch in enumerate(query):
        if ch in _JOINERS:
            if emoji is None:
                emoji = _emoji_format_positions(query)
            if pos in emoji:
                continue
        if _is_control(ch) or "\ud800" <= ch <= "\udfff":
            # a lone surrogate (what JSON's "\ud800" decodes to) is no text: it cannot be
            # encoded, tokenised or stored
            raise QueryError(
                f"query contains {'a lone surrogate' if _is_surrogate(ch) else 'control character'}"
                f" U+{ord(ch):04X} at position {pos}", "query"
            )
    text = _WS.sub(" ", unicodedata.normalize("NFKC", query).translate(_FOLD)).strip()
    if not text:
        raise QueryError("query is empty", "query")
    return text.casefold()


def item_text(title: str, brand: str | None, category: str | None, description: str | None) -> str:
    """The text an item is embedded from: title first, since the token budget truncates."""
    parts = [title]
    if brand:
        parts.append(f"Brand: {brand}")
    if category:
        parts.append(f"Category: {category}")
    if description:
        parts.append(description)
    return ". ".join(parts)
