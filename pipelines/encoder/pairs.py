"""Positive (query, item) pairs for fine-tuning the encoder, and the split of queries into training
and held-out ones (see :mod:`pipelines.encoder.finetune` for the whole method)."""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.offline.splits import hash_unit
from serving.schema import ITEM_ID
from serving.session import EVENT_WEIGHTS
from serving.settings import Settings
from serving.text import normalise_query

log = logging.getLogger(__name__)

JUDGED_WEIGHT = 2.0        # a human "relevant" counts like an add-to-cart
MAX_PAIR_WEIGHT = 5.0      # many clicks on one pair should not drown the rest of the batch


def is_heldout(query: str, holdout: float, fold: int = 0) -> bool:
    """Whether the normalised ``query`` is held out: its bucket lies in fold ``fold`` of width
    ``holdout`` (0 < holdout < 1)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be between 0 and 1 (exclusive), got {holdout}")
    if not 0 <= fold or (fold + 1) * holdout > 1.0 + 1e-9:
        raise ValueError(f"fold {fold} does not fit {holdout:g}-wide folds in [0, 1)")
    u = hash_unit(query)  # the normalised query's place in [0, 1)
    return fold * holdout <= u < (fold + 1) * holdout


def event_pairs(settings: Settings) -> pl.DataFrame:
    """Positive (query, item) pairs from the feedback log, with their item text from the
    warehouse: columns query, item_id, item_text, weight, source. Empty when there is no log
    or no warehouse."""
    from serving.backends import open_event_log
    from serving.eventlog import iter_all

    empty = _pairs_frame([], [], [], [], [])
    if settings.events_backend == "sqlite" and not settings.events_path.is_file():
        return empty
    if not settings.warehouse_path.is_file():
        return empty
    weights: dict[tuple[str, str], float] = {}
    event_log = open_event_log(settings)
    try:
        for logged in iter_all(event_log):
            e = logged.event
            w = EVENT_WEIGHTS.get(e.type)
            if w is None or not e.query:
                continue
            key = (e.query, e.item_id)
            weights[key] = min(weights.get(key, 0.0) + w, MAX_PAIR_WEIGHT)
    finally:
        event_log.close()
    if not weights:
        return empty
    from pipelines.catalogue.embed import active_item_texts

    text_of = dict(zip(*active_item_texts(settings.warehouse_path), strict=True))
    rows = [(q, i, text_of[i], w) for (q, i), w in weights.items() if i in text_of]
    if len(rows) < len(weights):
        log.info("%d event pairs name items no longer in the catalogue; skipped",
                 len(weights) - len(rows))
    return _pairs_frame([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                        [r[3] for r in rows], ["events"] * len(rows))


def judged_pairs(products: pl.DataFrame, judgments: Any) -> pl.DataFrame:
    """Positive pairs from judged data (``products`` from :func:`pipelines.offline.judged.
    load_products`, ``judgments`` a :class:`pipelines.offline.judged.Judgments`)."""
    from pipelines.offline.evaluation import product_texts

    text_of = dict(zip(products[ITEM_ID].to_list(), product_texts(products), strict=True))
    rel = judgments.frame.filter(pl.col("relevance") >= judgments.relevant_threshold)
    rows = [(normalise_query(q, 10_000), i, text_of[i]) for q, i in
            rel.select("query", ITEM_ID).iter_rows() if i in text_of]
    return _pairs_frame([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                        [JUDGED_WEIGHT] * len(rows), ["judged"] * len(rows))


def _pairs_frame(queries: list[str], items: list[str], texts: list[str], weights: list[float],
                 sources: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"query": queries, ITEM_ID: items, "item_text": texts,
                         "weight": weights, "source": sources},
                        schema={"query": pl.String, ITEM_ID: pl.String,
                                "item_text": pl.String, "weight": pl.Float64,
                                "source": pl.String})


def split_pairs(pairs: pl.DataFrame, holdout: float, fold: int = 0) -> pl.DataFrame:
    """``pairs`` with a boolean ``heldout`` column from :func:`is_heldout` of each query."""
    held = [is_heldout(q, holdout, fold) for q in pairs["query"].to_list()]
    return pairs.with_columns(pl.Series("heldout", held, dtype=pl.Boolean))


def collect_pairs(settings: Settings, products: Path | None = None,
                  judgments: Path | None = None, holdout: float = 0.2,
                  fold: int = 0) -> dict[str, Any]:
    """Gather event and judged pairs, split them by query and write them to
    ``<home>/work/finetune/pairs-<digest>.parquet``; returns the path and counts.

    ``products``/``judgments``: judged data files (both or neither).
    """
    if (products is None) != (judgments is None):
        raise ValueError("give both --products and --judgments, or neither")
    parts = [event_pairs(settings)]
    if products is not None and judgments is not None:
        from pipelines.offline.judged import load_judgments, load_products

        parts.append(judged_pairs(load_products(Path(products)), load_judgments(Path(judgments))))
    pairs = split_pairs(pl.concat(parts), holdout, fold).sort("source", "query", ITEM_ID)
    digest = hashlib.sha256()
    for row in pairs.select("query", ITEM_ID, "item_text", "weight", "heldout").iter_rows():
        digest.update(json.dumps(row).encode())
    pairs_id = digest.hexdigest()[:16]
    out_dir = settings.work_dir / "finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"pairs-{pairs_id}.parquet"
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pairs.write_parquet(tmp)
        os.replace(tmp, path)
    train = pairs.filter(~pl.col("heldout"))
    held = pairs.filter(pl.col("heldout"))
    summary = {
        "pairs_path": str(path), "pairs_id": pairs_id, "holdout": holdout, "fold": fold,
        "products": str(products) if products else None,
        "judgments": str(judgments) if judgments else None,
        "pairs": pairs.height, "train_pairs": train.height, "heldout_pairs": held.height,
        "train_queries": train["query"].n_unique(), "heldout_queries": held["query"].n_unique(),
        "event_pairs": parts[0].height,
        "judged_pairs": parts[1].height if len(parts) > 1 else 0,
    }
    log.info("pairs: %s", summary)
    return summary
