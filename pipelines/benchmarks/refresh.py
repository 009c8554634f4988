"""Cost of a scheduled refresh with 1 per cent of the catalogue changed, against a full build.

The scenario runs the real pipeline steps (``pipelines.steps``: ingest, embed, index,
evaluate, publish; the MLflow registration is left out, it costs the same either way) on a
real catalogue in a private home: a full build from an empty home, then a new snapshot in
which a share of items have a new title, a few items are new and a few are delisted, and the
same steps again. Only the new and changed items may be re-embedded (their content hash
changed); the figure that matters is refresh seconds / full-build seconds. The encoder is
loaded once, before either timing, as a long-lived worker would hold it.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.settings import Settings

log = logging.getLogger(__name__)

CATALOGUES = {
    "crowdflower": Path(__file__).resolve().parents[3] / "shared" / "data" / "crowdflower"
    / "products.parquet",
    "homedepot": Path(__file__).resolve().parents[3] / "shared" / "data" / "homedepot"
    / "products.parquet",
}
STEPS = ("ingest", "embed", "index", "evaluate", "publish")


def catalogue_frame(source: str | Path, limit: int | None = None) -> Any:
    """A catalogue (id, title, description) from a judged products file or a catalogue file.

    ``source`` is ``crowdflower``, ``homedepot``, ``demo`` or a path; ``limit`` keeps the first
    that many items.
    """
    import polars as pl

    from pipelines.judged import load_products
    from pipelines.steps import DEMO_CATALOGUE

    if source == "demo":
        frame = pl.read_csv(DEMO_CATALOGUE, infer_schema_length=0)
    else:
        path = CATALOGUES.get(str(source), Path(source))
        frame = load_products(path).rename({"item_id": "id"})
        # a catalogue needs a title; the judged files have a few empty ones
        frame = frame.filter(pl.col("title").str.strip_chars() != "")
    return frame.head(limit) if limit else frame


def snapshots(frame: Any, changed_share: float, added_share: float, delisted_share: float,
              seed: int = 0) -> tuple[Any, Any, dict[str, int]]:
    """(first snapshot, second snapshot, counts): the second has ``changed_share`` of the items
    retitled, ``added_share`` new items (held back from the first) and ``delisted_share``
    items gone. Shares are fractions of the catalogue (0..1), each at least one item."""
    import numpy as np
    import polars as pl

    n = frame.height
    rng = np.random.default_rng(seed)
    count = {name: max(1, round(share * n)) if share > 0 else 0 for name, share in
             (("changed", changed_share), ("added", added_share), ("delisted", delisted_share))}
    perm = rng.permutation(n)
    added = perm[:count["added"]]
    delisted = perm[count["added"]:count["added"] + count["delisted"]]
    changed = perm[count["added"] + count["delisted"]:
                   count["added"] + count["delisted"] + count["changed"]]
    row = pl.int_range(pl.len())
    first = frame.filter(~row.is_in(added.tolist()))
    second = frame.with_columns(
        pl.when(row.is_in(changed.tolist()))
        .then(pl.col("title") + pl.lit(" (new edition)"))
        .otherwise(pl.col("title")).alias("title")
    ).filter(~row.is_in(delisted.tolist()))
    return first, second, count


def _timed_steps(settings: Settings, catalogue: Path, encoder: Any) -> dict[str, Any]:
    from pipelines.steps import run_embed, run_evaluate, run_index, run_ingest, run_publish

    seconds: dict[str, float] = {}
    out: dict[str, Any] = {}

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out[name] = fn()
        seconds[name] = time.perf_counter() - t0
        return out[name]

    step("ingest", lambda: run_ingest(settings, catalogue))
    step("embed", lambda: run_embed(settings, encoder=encoder))
    bundle = step("index", lambda: run_index(settings, encoder))["bundle_dir"]
    step("evaluate", lambda: run_evaluate(settings, bundle, encoder=encoder))
    step("publish", lambda: run_publish(settings, bundle))
    return {"seconds": seconds, "total": sum(seconds.values()), "out": out}


def refresh_once(settings: Settings, frame: Any, encoder: Any, work: Path,
                 changed_share: float, added_share: float, delisted_share: float,
                 seed: int = 0) -> dict[str, Any]:
    """One full build and one refresh in a fresh home under ``work``."""
    first, second, count = snapshots(frame, changed_share, added_share, delisted_share, seed)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = settings.model_copy(update={"home": home})
    first.write_parquet(work / "snapshot-1.parquet")
    second.write_parquet(work / "snapshot-2.parquet")
    full = _timed_steps(env, work / "snapshot-1.parquet", encoder)
    refresh = _timed_steps(env, work / "snapshot-2.parquet", encoder)
    index_full = _manifest_index(full["out"]["publish"]["path"])
    index_refresh = _manifest_index(refresh["out"]["publish"]["path"])
    return {"full": full, "refresh": refresh, "count": count, "items_first": first.height,
            "items_second": second.height, "index_full": index_full,
            "index_refresh": index_refresh}


def _manifest_index(release: str) -> dict[str, Any]:
    import json

    index = json.loads((Path(release) / "manifest.json").read_text())["index"]
    tuning = index.get("tuning") or []
    return {k: index[k] for k in ("n_trees", "search_k", "recall_at_10")} | {
        "tuning_points": len(tuning),
        "reused_live_setting": any("reused_from_items" in t for t in tuning)}


def bench_refresh(settings: Settings, source: str = "crowdflower", limit: int | None = None,
                  changed_share: float = 0.01, added_share: float = 0.001,
                  delisted_share: float = 0.001, repeats: int = 2,
                  encoder: Any | None = None) -> dict[str, Any]:
    """Median figures over ``repeats`` (full build, refresh) pairs; ``encoder`` None = load the
    configured one (its load time is reported apart)."""
    from pipelines.steps import _encoder

    frame = catalogue_frame(source, limit)
    t0 = time.perf_counter()
    encoder = encoder or _encoder(settings)
    encoder_load_s = time.perf_counter() - t0
    runs = []
    work = Path(tempfile.mkdtemp(prefix="instantrec-bench-refresh-"))
    try:
        for r in range(repeats):
            runs.append(refresh_once(settings, frame, encoder, work / f"run-{r}", changed_share,
                                     added_share, delisted_share, seed=r))
            log.info("refresh bench repeat %d: full %s, refresh %s, re-embedded %d", r,
                     runs[-1]["full"]["seconds"], runs[-1]["refresh"]["seconds"],
                     runs[-1]["refresh"]["out"]["embed"]["embedded"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    full_s = [run["full"]["total"] for run in runs]
    refresh_s = [run["refresh"]["total"] for run in runs]
    ratios = [run["refresh"]["total"] / run["full"]["total"] for run in runs]
    last = runs[-1]
    return {
        "catalogue": str(source), "items": last["items_second"],
        "changed": last["count"]["changed"], "added": last["count"]["added"],
        "delisted": last["count"]["delisted"],
        "re_embedded": [run["refresh"]["out"]["embed"]["embedded"] for run in runs],
        "embedded_full": [run["full"]["out"]["embed"]["embedded"] for run in runs],
        "full_s": med(full_s), "refresh_s": med(refresh_s),
        "refresh_over_full": round(statistics.median(ratios), 4),
        "ratios": [round(x, 4) for x in ratios],
        "full_steps_s": {s: med([run["full"]["seconds"][s] for run in runs]) for s in STEPS},
        "refresh_steps_s": {s: med([run["refresh"]["seconds"][s] for run in runs]) for s in STEPS},
        "index_full": last["index_full"], "index_refresh": last["index_refresh"],
        "encoder_load_s": round(encoder_load_s, 2), "repeats": repeats,
        "timing": "median over repeats; each repeat = full build in an empty home, then refresh",
    }


def add_arguments(p: Any) -> None:
    p.add_argument("--catalogue", default="crowdflower",
                   help="crowdflower (9,913 items), homedepot (54,667), demo, or a file path")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items")
    p.add_argument("--changed", type=float, default=0.01, help="share of items retitled")
    p.add_argument("--added", type=float, default=0.001, help="share of items new in the refresh")
    p.add_argument("--delisted", type=float, default=0.001, help="share of items delisted")
    p.add_argument("--repeats", type=int, default=2, help="full build + refresh pairs")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    return bench_refresh(settings, args.catalogue, args.limit, args.changed, args.added,
                         args.delisted, args.repeats)
