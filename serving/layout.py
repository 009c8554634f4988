"""Where everything lives under an instantrec home, and the names the DAGs share, defined once.

A home (``INSTANTREC_HOME``, default ``./artefacts``) holds::

    warehouse.duckdb        items, item vectors, rejects, BM25 analysis cache
    work/                   embedding shard files between the embed and index steps
    releases/               release bundles, ``.staging/`` and the ``CURRENT`` pointer
    rankers/                ranker checkpoints and the ``LATEST`` pointer
    encoders/               fine-tuned encoders and the ``CHAMPION`` pointer
    events/events.db        the embedded durable event log (SQLite)
    events/forgotten        keyed hashes of forgotten users and their sessions, one a line
    secrets/user_id_key     the user-id hashing key, when none is configured
    cache/embeddings.duckdb the offline evaluation's and benchmarks' embedding cache
    cache/bundles/          offline evaluation's bundles of judged catalogues
    mlflow/                 the embedded MLflow store (mlflow.db, artifacts/)
    bench/                  benchmark homes

This module imports nothing heavy, so DAG files may import it at parse time.
"""

from __future__ import annotations

from pathlib import Path

# The Airflow assets: (name, uri). catalogue_refresh emits the release asset when a new release
# went live, encoder_finetune the encoder asset when a new encoder was promoted.
RELEASE_ASSET = ("instantrec_release", "instantrec://releases/current")
ENCODER_ASSET = ("instantrec_encoder", "instantrec://encoders/champion")


def warehouse_path(home: Path) -> Path:
    return home / "warehouse.duckdb"


def work_dir(home: Path) -> Path:
    return home / "work"


def releases_dir(home: Path) -> Path:
    return home / "releases"


def rankers_dir(home: Path) -> Path:
    return home / "rankers"


def encoders_dir(home: Path) -> Path:
    return home / "encoders"


def events_path(home: Path) -> Path:
    return home / "events" / "events.db"


def forgotten_path(home: Path) -> Path:
    """Keyed hashes of the users and sessions ``forget`` removed, for other processes (serving
    replicas, the nearline updater) to clear too; see :mod:`serving.forgotten`."""
    return home / "events" / "forgotten"


def user_key_path(home: Path) -> Path:
    return home / "secrets" / "user_id_key"


def embedding_cache(home: Path) -> Path:
    return home / "cache" / "embeddings.duckdb"


def bundle_cache(home: Path) -> Path:
    """Release-style bundles of judged catalogues that offline evaluation retrieves from."""
    return home / "cache" / "bundles"


def mlflow_dir(home: Path) -> Path:
    return home / "mlflow"


def bench_dir(home: Path) -> Path:
    return home / "bench"
