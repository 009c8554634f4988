"""Training the encoder on positive pairs with in-batch negatives, and which encoder a fine-tune
starts from and which one is the champion."""

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

from serving.encoder import default_encoder_path
from serving.layout import encoders_dir
from serving.settings import Settings

log = logging.getLogger(__name__)

POINTER = "CHAMPION"
SCALE = 20.0               # inverse temperature of the in-batch softmax
QUERY_MAX_TOKENS = 32
META = "finetune.meta"     # training summary saved beside the weights


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
    from serving.release import check_pointer_name

    name = check_pointer_name(json.loads(pointer.read_text())["encoder"], pointer, "encoder")
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
