"""Domain exceptions, one hierarchy for the whole system.

Every error says what was wrong and where, so an operator (or a shop application) can act on it
without reading a traceback.
"""

from __future__ import annotations


class InstantrecError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInputError(InstantrecError, ValueError):
    """A caller passed something that cannot be served or stored.

    ``field`` names the input at fault where one does (``"k"``, ``"filters.max_price"``,
    ``"events[3].position"``), so a service can point a client at it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class QueryError(InvalidInputError):
    """The query text is empty, too long, or contains characters we refuse."""


class FilterError(InvalidInputError):
    """A filter names an unknown field or carries a value of the wrong kind."""


class CatalogueError(InstantrecError):
    """The catalogue source cannot be read, or too many of its rows are invalid."""


class ReleaseError(InstantrecError):
    """A release bundle or the release pointer is missing, incomplete or corrupt."""


class EncoderError(InstantrecError):
    """The text encoder cannot be loaded or does not match what a release was built with."""


class ConfigurationError(InstantrecError):
    """The settings cannot work together (the message names the setting to change)."""


class StorageError(InstantrecError):
    """A write to disk failed (disk full, I/O error, failed fsync): nothing was published, and
    what was live before stays live. The message names the file and the operating system's
    reason."""


class UpdaterLockedError(InstantrecError):
    """Another nearline updater already consumes this home's event log."""


class WarehouseBusyError(InstantrecError):
    """Another build holds the warehouse (the message names the holder's pid and command)."""


class MeasurementError(InstantrecError):
    """A benchmark could not measure the figure it exists to measure (it says why)."""


def short_repr(value: object, limit: int = 40) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (a 400-digit integer
    would fill the message; one past Python's 4,300 digits cannot even be printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
