"""instantrec serving: ``from serving import Recommender``.

Loads the latest release and ranker checkpoints and answers requests. Never imports Airflow
or ``pipelines``; MLflow only when a replica follows the registry's ``champion``
(``release_source=mlflow``, :mod:`serving.release_sync`). The names below are imported on
first use, so that light modules (``serving.layout``, ``serving.errors``) can be imported,
e.g. by DAG files at parse time, without loading the recommender and its libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.errors import (
        CatalogueError,
        EncoderError,
        FilterError,
        InstantrecError,
        InvalidInputError,
        QueryError,
        ReleaseError,
    )
    from serving.recommender import Recommendation, Recommender
    from serving.retrieval import Filters
    from serving.settings import Settings, load_settings

_HOMES = {
    "serving.errors": ["CatalogueError", "EncoderError", "FilterError", "InstantrecError",
                       "InvalidInputError", "QueryError", "ReleaseError"],
    "serving.recommender": ["Recommendation", "Recommender"],
    "serving.retrieval": ["Filters"],
    "serving.settings": ["Settings", "load_settings"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "CatalogueError", "EncoderError", "FilterError", "Filters", "InstantrecError",
    "InvalidInputError", "QueryError", "Recommendation", "Recommender", "ReleaseError",
    "Settings", "load_settings",
]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
