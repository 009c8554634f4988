from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_CATALOGUE = REPO / "pipelines" / "demo" / "catalogue.csv"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's two workers run at one priority: an in-process DAG run's embed task would
# otherwise nice a whole test worker for the rest of its tests. (The niceness itself is
# tested in a child process, tests/unit/test_embed_progress.py.)
os.environ.setdefault("INSTANTREC_EMBED_NICE", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    # CI has ../shared beside the clone; its absence is a broken set-up, not a reason to skip.
    assert SHARED_DATA.is_dir(), f"judged data not found at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture
def tiny_homedepot(shared_data, tmp_path) -> Path:
    """The first 60 real Home Depot products, as a products file of their own."""
    import polars as pl

    products = tmp_path / "products.parquet"
    pl.read_parquet(shared_data / "homedepot" / "products.parquet").head(60).write_parquet(products)
    return products


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server on loopback (AOF, fsync always), one per test module, stopped by
    PID after it; tests keep apart by key prefix (``tests.redis_server.unique_prefix``)."""
    from tests.redis_server import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def encoder():
    from serving.encoder import Encoder

    return Encoder(max_length=128)


def make_settings(home: Path, **extra):
    from serving.settings import Settings

    return Settings(home=home, reload_interval_s=0.1, **extra)


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory, encoder) -> Path:
    """The demo catalogue built once, for real (no registry), shared read-only by tests."""
    from pipelines.steps import run_build

    home = tmp_path_factory.mktemp("demo-home")
    run_build(make_settings(home), register=False, encoder=encoder)
    return home


@pytest.fixture
def demo_copy(demo_home, tmp_path) -> Path:
    """A private copy of the built demo home, for tests that publish or corrupt releases."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    return home


def read_demo_rows() -> list[dict[str, str]]:
    with DEMO_CATALOGUE.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def click_stream(rec, query, target, n_sessions, start_id=0):
    """Feedback of ``n_sessions`` sessions (ids from ``start_id``) that see ``rec``'s current top
    10 for ``query`` and click ``target``, skipping the items shown above it."""
    shown = [r.item_id for r in rec.recommend(query, k=10)]
    pos = shown.index(target) + 1 if target in shown else 10
    events = []
    for s in range(start_id, start_id + n_sessions):
        for p, item in enumerate(shown[:pos], start=1):
            events.append({"event_id": f"i{s}-{p}", "session_id": f"sess{s}", "query": query,
                           "item_id": item if p < pos else target, "type": "impression",
                           "position": p})
        events.append({"event_id": f"c{s}", "session_id": f"sess{s}", "query": query,
                       "item_id": target, "type": "click", "position": pos})
    return events
