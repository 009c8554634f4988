"""Text normalisation shared by catalogue ingestion and query understanding."""

from __future__ import annotations

import html
import re
import unicodedata

from serving.errors import QueryError

_WS = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]{0,200}>")
# Typographic variants that shoppers paste from product pages; folded to their ASCII forms.
_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                       "\u2013": "-", "\u2014": "-", "\u00d7": "x"})


_BREAKS = str.maketrans("\t\n\r", "   ")


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r"


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
    characters before normalisation) and control characters.
    """
    if not isinstance(query, str):
        raise QueryError(f"query must be a string, got {type(query).__name__}", "query")
    if len(query) > max_chars:
        raise QueryError(f"query is {len(query)} characters long; the limit is {max_chars}",
                         "query")
    for pos, ch in enumerate(query):
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
