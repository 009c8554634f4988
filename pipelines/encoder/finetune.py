"""Encoder fine-tuning: in-batch negatives on positive (query, item) pairs, with a champion gate.

The whole run (:func:`finetune_encoder`); its parts are :mod:`pipelines.encoder.pairs`,
:mod:`~pipelines.encoder.train`, :mod:`~pipelines.encoder.heldout` and
:mod:`~pipelines.encoder.register`.

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
configured_encoder`), which re-embeds the whole catalogue (the encoder version changes), and serving
loads the encoder directory recorded in the release manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipelines.encoder.heldout import evaluate_encoders
from pipelines.encoder.pairs import collect_pairs
from pipelines.encoder.register import register_encoder
from pipelines.encoder.train import TrainConfig, train_encoder
from pipelines.offline.metrics import MIN_NDCG_GAIN
from serving.settings import Settings

log = logging.getLogger(__name__)


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
