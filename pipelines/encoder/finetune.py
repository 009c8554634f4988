"""Encoder fine-tuning: in-batch negatives on positive (query, item) pairs, with a champion gate.

Positive pairs come from two places:

* the feedback event log: ``click`` (weight 1), ``add_to_cart`` (2) and ``purchase`` (3) on a
  query; a pair's weight is the sum over its events, capped at :data:`MAX_PAIR_WEIGHT`, and the
  item's text is the warehouse text its vector is computed from (:func:`serving.text.item_text`);
* judged data, when given: judged pairs with relevance >= the judgments' relevant threshold
  (weight :data:`JUDGED_WEIGHT`), item text = :func:`pipelines.offline.evaluation.product_texts`.

Queries, not pairs, are split: a query is held out when a stable hash of its normalised text
(sha256, first 8 bytes as a fraction u in [0, 1)) falls in ``[fold * holdout, (fold + 1) *
holdout)``. The split is deterministic and the same for events and judgments, no query is on
both sides, and ``fold = 0 .. 1/holdout - 1`` gives disjoint folds for k-fold estimates. Only
the training queries' pairs are trained on; the held-out queries score the result.

Training is the multiple-negatives ranking loss: for a batch of B (query, item) pairs, the
cross-entropy of each query over the B items' scaled cosines (scale :data:`SCALE`), the other
items of the batch being its negatives. A batch never holds the same query or the same item
twice (either would turn a positive into a negative). Mean pooling and L2 normalisation as in
:class:`serving.encoder.Encoder`; AdamW with linear warm-up and decay, gradient clipping, a
seed. Training always starts from the configured base encoder (not from an earlier
fine-tune), since the pairs accumulate and each run sees all of them.

Evaluation, on held-out queries only: full-catalogue dense retrieval (nDCG@10, recall@100,
MRR, :func:`pipelines.offline.judged.score_rankings` with the ``retrieval`` protocol), the incumbent
encoder (the current champion, else the base) against the candidate, each with the catalogue
embedded by itself. On judged data the catalogue is the judged products file; on events it
is the warehouse's active items, with the held-out event pairs as judgments.

Every fine-tune is registered in MLflow as a version of ``<model_name>-encoder``; it is
promoted (alias ``champion`` and the pointer file ``<home>/encoders/CHAMPION``) only when
held-out nDCG@10 improves by at least ``min_gain`` and recall@100 drops by no more than
``min_gain``. The batch pipeline then embeds with the champion (see :func:`pipelines.steps.
_encoder`), which re-embeds the whole catalogue (the encoder version changes), and serving
loads the encoder directory recorded in the release manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.offline.metrics import MIN_NDCG_GAIN
from pipelines.offline.splits import hash_unit
from serving.encoder import Encoder, default_encoder_path
from serving.layout import embedding_cache, encoders_dir
from serving.manifest import write_json_atomic
from serving.session import EVENT_WEIGHTS
from serving.settings import Settings
from serving.text import normalise_query

log = logging.getLogger(__name__)

POINTER = "CHAMPION"
JUDGED_WEIGHT = 2.0        # a human "relevant" counts like an add-to-cart
MAX_PAIR_WEIGHT = 5.0      # many clicks on one pair should not drown the rest of the batch
SCALE = 20.0               # inverse temperature of the in-batch softmax
QUERY_MAX_TOKENS = 32
EVAL_DEPTH = 100
META = "finetune.meta"     # training summary saved beside the weights


# -- pairs and the query split ----------------------------------------------------------------


def query_bucket(query: str) -> float:
    """Stable position of a normalised query in [0, 1): sha256, first 8 bytes."""
    return hash_unit(query)


def is_heldout(query: str, holdout: float, fold: int = 0) -> bool:
    """Whether the normalised ``query`` is held out: its bucket lies in fold ``fold`` of width
    ``holdout`` (0 < holdout < 1)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be between 0 and 1 (exclusive), got {holdout}")
    if not 0 <= fold or (fold + 1) * holdout > 1.0 + 1e-9:
        raise ValueError(f"fold {fold} does not fit {holdout:g}-wide folds in [0, 1)")
    u = query_bucket(query)
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

    text_of = dict(zip(products["item_id"].to_list(), product_texts(products), strict=True))
    rel = judgments.frame.filter(pl.col("relevance") >= judgments.relevant_threshold)
    rows = [(normalise_query(q, 10_000), i, text_of[i]) for q, i in
            rel.select("query", "item_id").iter_rows() if i in text_of]
    return _pairs_frame([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                        [JUDGED_WEIGHT] * len(rows), ["judged"] * len(rows))


def _pairs_frame(queries: list[str], items: list[str], texts: list[str], weights: list[float],
                 sources: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"query": queries, "item_id": items, "item_text": texts,
                         "weight": weights, "source": sources},
                        schema={"query": pl.String, "item_id": pl.String,
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
    pairs = split_pairs(pl.concat(parts), holdout, fold).sort("source", "query", "item_id")
    digest = hashlib.sha256()
    for row in pairs.select("query", "item_id", "item_text", "weight", "heldout").iter_rows():
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


# -- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """``max_steps`` caps the optimiser steps (None = ``epochs`` full passes); ``warmup`` is
    the share of steps with a linearly rising learning rate, after which it decays linearly to
    0; ``query_max_tokens``/``item_max_tokens`` are the token budgets of each side; ``threads``
    the torch threads (1 is much faster than 2 when other jobs keep the cores busy: the
    threads of a parallel region wait for each other)."""

    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = 200
    lr: float = 2e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    scale: float = SCALE
    seed: int = 0
    query_max_tokens: int = QUERY_MAX_TOKENS
    item_max_tokens: int = 128
    threads: int = 2


def make_batches(queries: Sequence[str], items: Sequence[str], batch_size: int,
                 rng: np.random.Generator) -> list[list[int]]:
    """One epoch of batches over pair indices, in a shuffled order, none holding the same
    query or item twice. A pair that would repeat one waits for the next batch; batches left
    smaller than half ``batch_size`` at the end (few distinct queries remain) are dropped."""
    pending = deque(int(i) for i in rng.permutation(len(queries)))
    batches: list[list[int]] = []
    while pending:
        batch: list[int] = []
        seen_q: set[str] = set()
        seen_i: set[str] = set()
        waiting: list[int] = []
        while pending and len(batch) < batch_size:
            i = pending.popleft()
            if queries[i] in seen_q or items[i] in seen_i:
                waiting.append(i)
                continue
            batch.append(i)
            seen_q.add(queries[i])
            seen_i.add(items[i])
        pending.extendleft(reversed(waiting))
        if len(batch) < max(2, batch_size // 2):
            break  # what remains repeats a handful of queries: no useful negatives
        batches.append(batch)
    return batches


def embed_batch(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> Any:
    """Mean-pooled, L2-normalised embeddings (B, dim) of ``texts``, with gradients."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def in_batch_loss(q: Any, d: Any, weights: Any | None = None, scale: float = SCALE) -> Any:
    """Multiple-negatives ranking loss: row i of ``q`` (B, dim) must pick item i of ``d``
    (B, dim) among the batch's items; cross-entropy over scaled cosines, averaged with the
    pair ``weights`` (B,) when given. Both inputs are unit vectors."""
    import torch

    logits = scale * q @ d.T
    target = torch.arange(len(q), device=logits.device)
    losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()


def pairs_loss(model: Any, tokenizer: Any, queries: list[str], items: list[str],
               weights: list[float] | None, cfg: TrainConfig) -> Any:
    """The in-batch loss of one batch of pairs under ``model`` (in its current mode)."""
    import torch

    q = embed_batch(model, tokenizer, queries, cfg.query_max_tokens)
    d = embed_batch(model, tokenizer, items, cfg.item_max_tokens)
    w = torch.tensor(weights, dtype=q.dtype) if weights is not None else None
    return in_batch_loss(q, d, w, cfg.scale)


def train_model(model: Any, tokenizer: Any, queries: Sequence[str], items: Sequence[str],
                weights: Sequence[float], cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune ``model`` in place on the pairs (queries[i], items[i]) with weights[i];
    returns steps, epochs started, pairs per epoch, seconds and the loss curve (every step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(model, tokenizer, queries, items, weights, cfg)
    finally:
        # the thread count is process-wide: leave the caller's as it was (a serving or
        # nearline process in the same interpreter must keep its numerics bit for bit)
        torch.set_num_threads(threads)


def _train(model: Any, tokenizer: Any, queries: Sequence[str], items: Sequence[str],
           weights: Sequence[float], cfg: TrainConfig) -> dict[str, Any]:
    import torch

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    per_epoch = make_batches(queries, items, cfg.batch_size, rng)
    if not per_epoch:
        raise ValueError(f"too few distinct training pairs ({len(queries)}) for one batch")
    total = cfg.epochs * len(per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    step, epoch = 0, 0
    batches = per_epoch
    while step < total:
        if epoch > 0:
            batches = make_batches(queries, items, cfg.batch_size, rng)
        epoch += 1
        for batch in batches:
            if step >= total:
                break
            loss = pairs_loss(model, tokenizer, [queries[i] for i in batch],
                              [items[i] for i in batch], [weights[i] for i in batch], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 20 == 0 or step == total:
                log.info("step %d/%d loss %.4f (%.1fs)", step, total,
                         float(np.mean(losses[-20:])), time.perf_counter() - start)
    model.eval()
    return {"steps": step, "epochs_started": epoch, "batches_per_epoch": len(per_epoch),
            "pairs_per_epoch": sum(len(b) for b in per_epoch),
            "seconds": round(time.perf_counter() - start, 1), "losses": losses}


def base_encoder_path(settings: Settings) -> Path:
    """The encoder fine-tunes start from: the configured one, else the packaged default."""
    return Path(settings.encoder_path) if settings.encoder_path else default_encoder_path()


def champion_encoder_path(home: Path) -> Path | None:
    """The promoted encoder directory named by ``<home>/encoders/CHAMPION``, or None."""
    pointer = encoders_dir(home) / POINTER
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["encoder"]
    path = encoders_dir(home) / name
    if not path.is_dir():
        from serving.errors import EncoderError

        raise EncoderError(f"{pointer} names encoder {name}, but {path} does not exist")
    return path


def incumbent_encoder_path(settings: Settings) -> Path | None:
    """The encoder the batch pipeline embeds with now: configured, else champion, else None
    (the packaged default: passed as None so its version, hence cached vectors, match)."""
    if settings.encoder_path:
        return Path(settings.encoder_path)
    return champion_encoder_path(settings.home)


def train_encoder(settings: Settings, pairs_path: str | Path,
                  cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Fine-tune the base encoder on the training pairs of ``pairs_path`` and save it to
    ``<home>/encoders/<encoder_id>/`` (atomically: a temporary directory, then ``os.replace``).

    The id is a digest of the base encoder, the pairs and the config, so a retried task finds
    the directory already there and does not train again.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from serving.encoder import weights_digest

    cfg = cfg or TrainConfig(item_max_tokens=settings.item_max_tokens)
    pairs = pl.read_parquet(pairs_path).filter(~pl.col("heldout"))
    if pairs.height < 2:
        raise ValueError(f"not enough training pairs in {pairs_path}: {pairs.height}")
    base = base_encoder_path(settings)
    base_rev = weights_digest(str(base))[:16]
    recipe = {k: v for k, v in asdict(cfg).items() if k != "threads"}
    key = json.dumps({"base": base_rev, "pairs": Path(pairs_path).stem, **recipe}, sort_keys=True)
    encoder_id = "ft-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    root = encoders_dir(settings.home)
    final = root / encoder_id
    meta_path = final / META
    out = {"encoder_id": encoder_id, "encoder_dir": str(final), "base": str(base),
           "base_revision": base_rev, "config": asdict(cfg), "train_pairs": pairs.height,
           "train_queries": pairs["query"].n_unique()}
    if meta_path.is_file():
        log.info("encoder %s already trained; reusing it", encoder_id)
        return {**json.loads(meta_path.read_text()),
                "revision": weights_digest(str(final))[:16], "reused": True}
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModel.from_pretrained(str(base))
    stats = train_model(model, tokenizer, pairs["query"].to_list(), pairs["item_text"].to_list(),
                        pairs["weight"].to_list(), cfg)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{encoder_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    losses = stats.pop("losses")
    out.update(stats, first_loss=losses[0], last_loss=float(np.mean(losses[-10:])))
    # Not *.json: the encoder's revision digests the *.json files, and this is no weight.
    (tmp / META).write_text(json.dumps(out, indent=2, sort_keys=True))
    os.replace(tmp, final)
    out["revision"] = weights_digest(str(final))[:16]
    log.info("trained encoder %s in %.0fs (%d steps): loss %.3f -> %.3f", encoder_id,
             out["seconds"], out["steps"], out["first_loss"], out["last_loss"])
    return {**out, "reused": False}


# -- evaluation -------------------------------------------------------------------------------


def dense_rankings(encoder: Encoder, item_vecs: np.ndarray, ids: list[str],
                   queries: pl.DataFrame, depth: int = EVAL_DEPTH) -> dict[int, list[str]]:
    """query_id -> the ``depth`` nearest item ids by cosine; ``queries`` has query_id, query."""
    texts = [normalise_query(q, 10_000) for q in queries["query"].to_list()]
    qvecs = encoder.encode(texts)
    depth = min(depth, len(ids))
    out: dict[int, list[str]] = {}
    qids = queries["query_id"].to_list()
    for start in range(0, len(qids), 256):
        scores = qvecs[start:start + 256] @ item_vecs.T
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        for j, row in enumerate(top):
            order = row[np.argsort(-scores[j, row], kind="stable")]
            out[qids[start + j]] = [ids[r] for r in order]
    return out


def _eval_sets(settings: Settings, pairs: pl.DataFrame, products: str | None,
               judgments: str | None) -> list[tuple[str, pl.DataFrame, list[str], Any]]:
    """(name, catalogue, catalogue texts, held-out judgments) for each available set."""
    from pipelines.offline.evaluation import product_texts
    from pipelines.offline.judged import Judgments, load_judgments, load_products

    sets = []
    held = pairs.filter(pl.col("heldout"))
    if products and judgments:
        prods = load_products(Path(products))
        judg = load_judgments(Path(judgments))
        keep = set(held.filter(pl.col("source") == "judged")["query"].to_list())
        frame = judg.frame.filter(pl.col("query").map_elements(
            lambda q: normalise_query(q, 10_000) in keep, return_dtype=pl.Boolean))
        sets.append(("judged", prods, product_texts(prods),
                     Judgments(frame, judg.min_label, judg.relevant_threshold)))
    ev = held.filter(pl.col("source") == "events")
    if ev.height and settings.warehouse_path.is_file():
        from pipelines.catalogue.embed import active_item_texts

        item_ids, texts = active_item_texts(settings.warehouse_path)
        qid = {q: i for i, q in enumerate(sorted(set(ev["query"].to_list())))}
        frame = ev.select(pl.col("query").replace_strict(qid, return_dtype=pl.Int64)
                          .alias("query_id"), "query", "item_id",
                          pl.col("weight").alias("relevance"))
        sets.append(("events", pl.DataFrame({"item_id": item_ids}), texts,
                     Judgments(frame, 0.0, float(ev["weight"].min()))))
    return sets


def evaluate_encoders(settings: Settings, pairs_path: str | Path, encoder_dir: str | Path,
                      products: str | None = None, judgments: str | None = None,
                      cache_path: Path | None = None, hybrid: bool = False,
                      max_items: int | None = None) -> dict[str, Any]:
    """Held-out dense retrieval of the incumbent encoder and the candidate in ``encoder_dir``.

    Returns per evaluation set (``judged``, ``events``) the number of held-out queries and
    the ``incumbent`` and ``candidate`` metrics, and ``gate_set``: the set the gate decides on
    (judged when there is one: it has graded labels for every shown item). With ``hybrid``
    the judged set is also scored with the learned BM25 + dense fusion of ``instantrec eval``.
    Catalogue vectors are read from and added to the DuckDB cache ``cache_path`` (default
    ``<home>/cache/embeddings.duckdb``), keyed by encoder version and text hash.

    ``max_items`` (None = the whole catalogue) caps a catalogue for a cheaper estimate: every
    item judged for a held-out query stays, plus a fixed hash-chosen sample of the others.
    Both encoders see the same catalogue, but retrieval is easier than on the full one.
    """
    from pipelines.offline.evaluation import embed_cached, method_rankings
    from pipelines.offline.judged import score_rankings

    cache_path = cache_path or embedding_cache(settings.home)
    pairs = pl.read_parquet(pairs_path)
    sets = _eval_sets(settings, pairs, products, judgments)
    incumbent = Encoder(incumbent_encoder_path(settings), max_length=settings.item_max_tokens)
    candidate = Encoder(Path(encoder_dir), max_length=settings.item_max_tokens)
    out: dict[str, Any] = {"incumbent": incumbent.version, "candidate": candidate.version,
                           "sets": {}}
    for name, catalogue, texts, judg in sets:
        full = catalogue.height
        if max_items is not None and catalogue.height > max_items:
            catalogue, texts = _sample_catalogue(catalogue, texts, judg, max_items)
        ids = catalogue["item_id"].to_list()
        queries = judg.queries()
        result: dict[str, Any] = {"queries": queries.height, "catalogue": len(ids),
                                  "full_catalogue": full}
        for role, enc in (("incumbent", incumbent), ("candidate", candidate)):
            start = time.perf_counter()
            vecs = embed_cached(enc, texts, cache_path, progress=False)
            embed_s = time.perf_counter() - start
            means, per_query = score_rankings(dense_rankings(enc, vecs, ids, queries), judg,
                                              "retrieval")
            result[role] = {**means, "embed_seconds": round(embed_s, 1)}
            result["scored_queries"] = len(per_query)
            if hybrid and name == "judged":
                # exact search: the encoders are compared, not an index built for either
                ranked = method_rankings(enc, catalogue, judg, "retrieval", cache_path,
                                         retrieval="exact")
                result[role]["hybrid"] = score_rankings(ranked["hybrid"], judg, "retrieval")[0]
        result["gain"] = {m: result["candidate"][m] - result["incumbent"][m]
                          for m in ("ndcg@10", "recall@100", "mrr")}
        out["sets"][name] = result
        log.info("held-out %s (%d queries): nDCG@10 %.4f -> %.4f, recall@100 %.4f -> %.4f",
                 name, result["scored_queries"], result["incumbent"]["ndcg@10"],
                 result["candidate"]["ndcg@10"], result["incumbent"]["recall@100"],
                 result["candidate"]["recall@100"])
    out["gate_set"] = next(iter(out["sets"]), None)
    return out


def _sample_catalogue(catalogue: pl.DataFrame, texts: list[str], judg: Any,
                      max_items: int) -> tuple[pl.DataFrame, list[str]]:
    judged = set(judg.frame["item_id"].to_list())
    ids = catalogue["item_id"].to_list()
    others = sorted((hashlib.sha256(i.encode()).hexdigest(), r) for r, i in enumerate(ids)
                    if i not in judged)
    kept = [r for r, i in enumerate(ids) if i in judged]
    keep = sorted(kept + [r for _, r in others[:max(0, max_items - len(kept))]])
    return catalogue[keep], [texts[r] for r in keep]


def gate(evaluation: dict[str, Any], min_gain: float = MIN_NDCG_GAIN,
         max_recall_drop: float | None = None) -> dict[str, Any]:
    """Promote iff held-out nDCG@10 gains >= ``min_gain`` and recall@100 loses no more than
    ``max_recall_drop`` (default: ``min_gain``) on the gate set; no held-out queries means no
    promotion."""
    max_drop = min_gain if max_recall_drop is None else max_recall_drop
    name = evaluation.get("gate_set")
    if name is None or not evaluation["sets"][name].get("scored_queries"):
        return {"passed": False, "reason": "no held-out queries to evaluate on",
                "min_gain": min_gain}
    g = evaluation["sets"][name]["gain"]
    passed = g["ndcg@10"] >= min_gain and g["recall@100"] >= -max_drop
    return {"passed": passed, "set": name, "ndcg_gain": g["ndcg@10"],
            "recall_gain": g["recall@100"], "min_gain": min_gain, "max_recall_drop": max_drop}


# -- MLflow and promotion ---------------------------------------------------------------------


def encoder_model_name(settings: Settings) -> str:
    return f"{settings.model_name}-encoder"


def register_encoder(settings: Settings, trained: dict[str, Any], evaluation: dict[str, Any],
                     pairs: dict[str, Any], promote: bool = True,
                     min_gain: float = MIN_NDCG_GAIN,
                     max_recall_drop: float | None = None) -> dict[str, Any]:
    """Log the run (params, held-out metrics), register the encoder directory as a version of
    ``<model_name>-encoder`` and, when the gate passed and ``promote``, move the ``champion``
    alias and ``<home>/encoders/CHAMPION`` to it. A version registered before for the same
    encoder id (a retried task) is reused."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    from pipelines.registry import log_pyfunc, promote_version, register_version

    decision = gate(evaluation, min_gain, max_recall_drop)
    name = encoder_model_name(settings)
    encoder_id = trained["encoder_id"]

    def log_run() -> ModelInfo:
        metrics: dict[str, float] = {}
        for set_name, res in evaluation["sets"].items():
            for role in ("incumbent", "candidate"):
                for m in ("ndcg@10", "recall@100", "mrr"):
                    metrics[f"{set_name}_{role}_{m.replace('@', '_at_')}"] = float(res[role][m])
            metrics[f"{set_name}_heldout_queries"] = float(res["scored_queries"])
        metrics.update(train_first_loss=trained["first_loss"], train_last_loss=trained["last_loss"],
                       train_seconds=trained["seconds"])
        cfg = trained["config"]
        params = {**{k: v for k, v in cfg.items()}, "steps": trained["steps"],
                  "train_pairs": trained["train_pairs"], "train_queries": trained["train_queries"],
                  "heldout_queries": pairs["heldout_queries"], "holdout": pairs["holdout"],
                  "fold": pairs["fold"], "event_pairs": pairs["event_pairs"],
                  "judged_pairs": pairs["judged_pairs"], "base": trained["base"],
                  "base_revision": trained["base_revision"], "min_gain": min_gain,
                  "incumbent": evaluation["incumbent"]}
        signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                                   outputs=Schema([ColSpec(Array(DataType.double), "vector")]))
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags)
        mlflow.log_dict(evaluation, "evaluation.json")
        return log_pyfunc("encoder", "encoder", {"encoder": trained["encoder_dir"]},
                          signature, name, input_example=pd.DataFrame(
                              {"text": ["cordless drill", "running shoes"]}))

    tags = {"encoder_id": encoder_id, "revision": trained["revision"],
            "gate_passed": str(decision["passed"]).lower(), "pairs_id": pairs["pairs_id"]}
    registered = register_version(settings, "encoder", name, {"encoder_id": encoder_id},
                                  encoder_id, log_run, version_tags=tags)
    version, run_id = registered.version, registered.run_id
    promoted = bool(decision["passed"] and promote)
    if promoted:
        promote_version(settings, name, version)
        write_json_atomic(encoders_dir(settings.home) / POINTER,
                          {"encoder": encoder_id, "revision": trained["revision"],
                           "model_name": name, "version": version})
        log.info("encoder %s promoted as %s v%d", encoder_id, name, version)
        if settings.encoder_path:
            log.warning("INSTANTREC_ENCODER_PATH is set: the pipeline keeps using %s, not the "
                        "promoted champion", settings.encoder_path)
    return {"model_name": name, "version": version, "run_id": run_id, "gate": decision,
            "promoted": promoted, "encoder_id": encoder_id, "encoder_dir": trained["encoder_dir"],
            "revision": trained["revision"]}


def finetune_encoder(settings: Settings, products: Path | None = None,
                     judgments: Path | None = None, holdout: float = 0.2, fold: int = 0,
                     cfg: TrainConfig | None = None, promote: bool = True,
                     min_gain: float = MIN_NDCG_GAIN, hybrid: bool = False,
                     cache_path: Path | None = None,
                     max_items: int | None = None) -> dict[str, Any]:
    """The whole fine-tune in one process: pairs -> train -> evaluate -> register/promote.

    Returns the pairs summary, training summary, held-out evaluation and registry outcome.
    """
    import torch

    cfg = cfg or TrainConfig(item_max_tokens=settings.item_max_tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # for evaluation's embedding too, not only training
    try:
        return _finetune(settings, products, judgments, holdout, fold, cfg, promote, min_gain,
                         hybrid, cache_path, max_items)
    finally:
        torch.set_num_threads(threads)  # process-wide: leave the caller's setting as it was


def _finetune(settings: Settings, products: Path | None, judgments: Path | None, holdout: float,
              fold: int, cfg: TrainConfig, promote: bool, min_gain: float, hybrid: bool,
              cache_path: Path | None, max_items: int | None) -> dict[str, Any]:
    pairs = collect_pairs(settings, products, judgments, holdout, fold)
    if pairs["train_pairs"] < 2:
        return {"promoted": False, "reason": f"not enough training pairs: {pairs['train_pairs']}",
                "pairs": pairs}
    trained = train_encoder(settings, pairs["pairs_path"], cfg)
    evaluation = evaluate_encoders(settings, pairs["pairs_path"], trained["encoder_dir"],
                                   pairs["products"], pairs["judgments"], cache_path, hybrid,
                                   max_items)
    registered = register_encoder(settings, trained, evaluation, pairs, promote, min_gain)
    return {"promoted": registered["promoted"], "pairs": pairs, "train": trained,
            "evaluation": evaluation, "register": registered}
