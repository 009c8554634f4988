"""instantrec serving: ``from serving import Recommender``.

Loads the latest release (and, later, ranker checkpoints) and answers requests. Never imports
Airflow, MLflow or ``pipelines``.
"""

from __future__ import annotations

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

__all__ = [
    "CatalogueError", "EncoderError", "FilterError", "Filters", "InstantrecError",
    "InvalidInputError", "QueryError", "Recommendation", "Recommender", "ReleaseError",
    "Settings", "load_settings",
]
