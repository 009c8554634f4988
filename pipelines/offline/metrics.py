"""Ranking metrics for one query at a time.

nDCG comes from scikit-learn (linear gain, log2 discount). Recall and reciprocal rank are one
line each; known-answer tests pin all three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import ndcg_score

# The smallest judged nDCG@10 gain that counts as a win in any gate (the relevance model's over
# the zero-shot fusion, a fine-tuned encoder's over the incumbent): below it is fold noise.
MIN_NDCG_GAIN = 0.002


def ndcg_at_k(ranking: Sequence[str], gains: Mapping[str, float], k: int = 10) -> float:
    """nDCG@k of ``ranking`` (best first); ``gains`` maps judged items to gain >= 0.

    Unjudged items have gain 0. The ideal ordering is taken over every judged item, retrieved
    or not, so missing a relevant item costs. Returns 0.0 when no item has positive gain.
    """
    ideal_total = sum(g for g in gains.values() if g > 0)
    if ideal_total <= 0:
        return 0.0
    shown = list(dict.fromkeys(ranking))
    missing = [item for item in gains if item not in set(shown)]
    y_true = [gains.get(item, 0.0) for item in shown] + [gains[item] for item in missing]
    # Retrieved items score by rank; judged items that were not retrieved rank after all of
    # them (they are only there so the ideal DCG sees them). Pad to k so ties cannot reach
    # into the top k.
    n_shown = len(shown)
    y_score = list(range(n_shown + k, k, -1)) + [-1.0] * len(missing)
    pad = max(0, k - n_shown)
    y_true += [0.0] * pad
    y_score += [0.0] * pad
    if len(y_true) < 2:  # scikit-learn needs two documents; one relevant item ranked first
        return 1.0 if shown and gains.get(shown[0], 0) > 0 else 0.0
    return float(ndcg_score(np.asarray([y_true]), np.asarray([y_score]), k=k))


def recall_at_k(ranking: Sequence[str], relevant: set[str], k: int = 100) -> float:
    """Share of ``relevant`` items found in the top ``k``; 0.0 if nothing is relevant."""
    if not relevant:
        return 0.0
    return len(relevant & set(ranking[:k])) / len(relevant)


def reciprocal_rank(ranking: Sequence[str], relevant: set[str]) -> float:
    """1 / rank of the first relevant item, 0.0 if none is retrieved."""
    for rank, item in enumerate(ranking, start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0
