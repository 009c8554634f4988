"""Domain exceptions, one hierarchy for the whole system.

Every error says what was wrong and where, so an operator (or a shop application) can act on it
without reading a traceback.
"""

from __future__ import annotations


class InstantrecError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInputError(InstantrecError, ValueError):
    """A caller passed something that cannot be served or stored."""


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


class MeasurementError(InstantrecError):
    """A benchmark could not measure the figure it exists to measure (it says why)."""
