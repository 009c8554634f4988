"""Cost of a scheduled refresh with 1 per cent of the catalogue changed, against a full build.

The scenario runs the real pipeline steps (``pipelines.steps``: ingest, embed, index,
evaluate, publish; the MLflow registration is left out, it costs the same either way) on a
real catalogue in a private home: a full build from an empty home, then a new snapshot in
which a share of items have a new title, a few items are new and a few are delisted, and the
same steps again. Only the new and changed items may be re-embedded (their content hash
changed), and with few changes the refresh keeps the live Annoy file beside an exactly
searched delta (``annoy_rebuilt`` false); the figure that matters is refresh seconds /
full-build seconds. The encoder is
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

from serving.schema import ITEM_ID
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

    from pipelines.offline.judged import load_products
    from pipelines.steps import DEMO_CATALOGUE

    if source == "demo":
        frame = pl.read_csv(DEMO_CATALOGUE, infer_schema_length=0)
    else:
        path = CATALOGUES.get(str(source), Path(source))
        frame = load_products(path).rename({ITEM_ID: "id"})
        # a catalogue needs a title; the judged files have a few empty ones
        frame = frame.filter(pl.col("title").str.strip_chars() != "")
    return frame.head(limit) if limit else frame


def snapshots(frame: Any, changed_share: float, added_share: float, delisted_share: float,
              seed: int = 0, refreshes: int = 1) -> tuple[list[Any], dict[str, int]]:
    """(snapshots, counts): a first snapshot and ``refreshes`` later ones, each made from the
    one before by retitling ``changed_share`` of its items, adding ``added_share`` new items
    (held back from the first snapshot) and delisting ``delisted_share``. Shares are fractions
    of the catalogue (0..1), each at least one item."""
    import numpy as np
    import polars as pl

    n = frame.height
    rng = np.random.default_rng(seed)
    count = {name: max(1, round(share * n)) if share > 0 else 0 for name, share in
             (("changed", changed_share), ("added", added_share), ("delisted", delisted_share))}
    held = count["added"] * refreshes
    perm = rng.permutation(n)
    current = frame.filter(~pl.int_range(pl.len()).is_in(perm[:held].tolist()))
    out = [current]
    for r in range(refreshes):
        batch = frame[perm[r * count["added"]:(r + 1) * count["added"]].tolist()]
        order = rng.permutation(current.height)
        delisted = order[:count["delisted"]]
        changed = order[count["delisted"]:count["delisted"] + count["changed"]]
        row = pl.int_range(pl.len())
        current = pl.concat([current.with_columns(
            pl.when(row.is_in(changed.tolist()))
            .then(pl.col("title") + pl.lit(f" (edition {r + 2})"))
            .otherwise(pl.col("title")).alias("title")
        ).filter(~row.is_in(delisted.tolist())), batch])
        out.append(current)
    return out, count


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
                 seed: int = 0, refreshes: int = 1) -> dict[str, Any]:
    """One full build and ``refreshes`` consecutive refreshes in a fresh home under ``work``."""
    series, count = snapshots(frame, changed_share, added_share, delisted_share, seed,
                              refreshes)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = settings.model_copy(update={"home": home})
    runs = []
    for i, snapshot in enumerate(series):
        snapshot.write_parquet(work / f"snapshot-{i}.parquet")
        runs.append(_timed_steps(env, work / f"snapshot-{i}.parquet", encoder))
    full, *later = runs
    return {"full": full, "refresh": later[0], "refreshes": later, "count": count,
            "items_first": series[0].height, "items_second": series[1].height,
            "index_full": _manifest_index(full["out"]["publish"]["path"]),
            "index_refresh": _manifest_index(later[0]["out"]["publish"]["path"]),
            "index_refreshes": [_manifest_index(r["out"]["publish"]["path"]) for r in later]}


def _manifest_index(release: str) -> dict[str, Any]:
    import json

    index = json.loads((Path(release) / "manifest.json").read_text())["index"]
    tuning = index.get("tuning") or []
    return {k: index[k] for k in ("n_trees", "search_k", "recall_at_10")} | {
        "tuning_points": len(tuning),
        "reused_live_setting": any("reused_from_items" in t for t in tuning),
        "annoy_rebuilt": index.get("base_release") is None,
        "delta_items": index.get("delta_items", 0),
        "dropped_items": index.get("dropped_items", 0)}


def bench_refresh(settings: Settings, source: str = "crowdflower", limit: int | None = None,
                  changed_share: float = 0.01, added_share: float = 0.001,
                  delisted_share: float = 0.001, repeats: int = 2,
                  encoder: Any | None = None, refreshes: int = 1) -> dict[str, Any]:
    """Median figures over ``repeats`` (full build, refresh) pairs; ``encoder`` None = load the
    configured one (its load time is reported apart). With ``refreshes`` > 1 each repeat runs
    that many consecutive refreshes, and ``series`` reports each one's cost and the mean over
    the cycle, which includes the refreshes that rebuild Annoy once the delta has grown."""
    from pipelines.steps import configured_encoder

    frame = catalogue_frame(source, limit)
    t0 = time.perf_counter()
    encoder = encoder or configured_encoder(settings)
    encoder_load_s = time.perf_counter() - t0
    runs = []
    work = Path(tempfile.mkdtemp(prefix="instantrec-bench-refresh-"))
    try:
        for r in range(repeats):
            runs.append(refresh_once(settings, frame, encoder, work / f"run-{r}", changed_share,
                                     added_share, delisted_share, seed=r,
                                     refreshes=refreshes))
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
    series = None
    if refreshes > 1:
        per_run = [[x["total"] / run["full"]["total"] for x in run["refreshes"]] for run in runs]
        series = {
            "refreshes": refreshes,
            "over_full": [round(statistics.median(col), 4) for col in zip(*per_run, strict=True)],
            "mean_over_full": round(statistics.median(
                [statistics.fmean(r) for r in per_run]), 4),
            "annoy_rebuilt": [[i + 1 for i, x in enumerate(run["index_refreshes"])
                               if x["annoy_rebuilt"]] for run in runs],
            "delta_items": [x["delta_items"] for x in last["index_refreshes"]],
        }
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
        "series": series,
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
    p.add_argument("--refreshes", type=int, default=1,
                   help="consecutive refreshes per repeat (the delta grows until Annoy is "
                        "rebuilt); reports each one's cost and the cycle's mean")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    return bench_refresh(settings, args.catalogue, args.limit, args.changed, args.added,
                         args.delisted, args.repeats, refreshes=args.refreshes)
