"""Batch retrain of the learned ranker on all the feedback in the event log, with a champion gate.

First the relevance model (:mod:`serving.relevance`) is fitted, on judgments or on
position-debiased feedback (:func:`fit_relevance`, :func:`feedback_relevance`), behind its own
cross-fitted nDCG@10 gate; the online terms are then retrained on top of it as below.

The nearline updater takes one online step per example as events arrive. This retrain reads
the same log from the beginning, turns it into exactly the examples the updater would learn
from (a fresh updater with a sink instead of steps), and trains a ranker with the same loss,
regulariser and AdaGrad steps, but several shuffled passes over everything instead of one pass
in arrival order.

Gate: the last ``holdout`` share of distinct event offsets (the most recent feedback) is held
out; a candidate trained on the rest is compared with the current champion (the live
checkpoint) on it. The candidate wins when its weighted held-out log-loss is lower by at least
:data:`MIN_LOG_LOSS_GAIN`. Log-loss and not pairwise accuracy decides, because it is what both models
were trained to minimise and it uses every example, not only clicks with skipped items above.

What is published is not that candidate but the same recipe (same epochs, same seed) trained
on *all* examples: a checkpoint says "every event up to ``offset`` is in here", and the
nearline updater continues after that offset, so a model that never saw the held-out events
would lose them for good. The held-out score measures the recipe; the published model is the
recipe applied to all the data.

Known bias: the champion has usually been trained on the held-out events already (the nearline
updater applied them online, and a previous retrain saw everything up to its offset), so the
gate favours the incumbent. That errs on the safe side: a candidate is promoted only when it is
clearly better.

Every retrain (with enough feedback) is registered in MLflow as a version of
``<model_name>-ranker``; the alias ``champion`` moves only when the candidate won, and only then
is the checkpoint published for serving and the nearline updater.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from pipelines.learning.nearline import NearlineUpdater
from pipelines.learning.replay import PROPENSITY_ETA, Example, FeedbackTally, replay_examples
from pipelines.offline.judged import Judgments
from pipelines.offline.metrics import MIN_NDCG_GAIN
from pipelines.offline.splits import hash_fold
from pipelines.registry import log_pyfunc, promote_version, register_version
from serving.backends import open_event_log
from serving.checkpoint import load_latest, read_latest
from serving.encoder import Encoder
from serving.manifest import sha256_file
from serving.ranker import Ranker, RankerConfig, query_key
from serving.recommender import release_encoder
from serving.release import Bundle, current_bundle_dir, load_bundle
from serving.relevance import COL_BM25_REL, COL_COS, RelevanceModel
from serving.retrieval import LexicalCache, QueryRelevance
from serving.schema import ITEM_ID
from serving.settings import Settings
from serving.text import normalise_query

log = logging.getLogger(__name__)

MIN_EXAMPLES = 20
MIN_LOG_LOSS_GAIN = 1e-4     # held-out log-loss (nats per unit weight) the candidate must win by


# -- data -------------------------------------------------------------------------------------


def _collect(settings: Settings, encoder: Encoder | None) -> NearlineUpdater:
    """A fresh updater that has read the whole log into its sink, learning nothing."""
    updater = NearlineUpdater(settings, encoder, restore=False, collect=True)
    try:
        updater.replay_all()
    except BaseException:
        updater.close()
        raise
    return updater


def collect_examples(settings: Settings, encoder: Encoder | None = None,
                     ) -> tuple[list[Example], int, dict[str, int]]:
    """Every labelled example in the event log, derived for the live release as the nearline
    updater derives them (:func:`pipelines.learning.replay.replay_examples`).

    Returns the examples in log order, the last offset read (0 for an empty log) and the
    counters (impressions, positives, negatives, drops by reason).
    """
    bundle = load_bundle(current_bundle_dir(settings.releases_dir))
    encoder = encoder or release_encoder(bundle, settings, backend="torch")
    event_log = open_event_log(settings)
    try:
        examples, offset, counters, _ = replay_examples(event_log, bundle, encoder, settings)
    finally:
        event_log.close()
    return examples, offset, dict(counters)


def split_by_offset(examples: Sequence[Example], holdout: float,
                    ) -> tuple[list[Example], list[Example]]:
    """Split in time: the last ``holdout`` share (0 < holdout < 1, rounded up to whole events)
    of distinct event offsets is held out. Examples of one event never straddle the split."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be between 0 and 1 (exclusive), got {holdout}")
    offsets = sorted({e.offset for e in examples})
    if not offsets:
        return [], []
    n_held = math.ceil(holdout * len(offsets))
    if n_held >= len(offsets):
        return [], list(examples)
    cut = offsets[-n_held]
    return ([e for e in examples if e.offset < cut], [e for e in examples if e.offset >= cut])


# -- training and evaluation ------------------------------------------------------------------


def train_ranker(examples: Sequence[Example], release_id: str, dim: int, n_items: int,
                 epochs: int = 5, seed: int = 0, config: RankerConfig | None = None,
                 relevance: RelevanceModel | None = None,
                 lookup: QueryRelevance | None = None) -> Ranker:
    """A ranker trained from the zero-shot start with ``epochs`` passes over ``examples``.

    Each pass visits every example once in an order shuffled by ``seed`` and takes the online
    AdaGrad step (:meth:`Ranker.step`), so loss, regulariser and step sizes are the nearline
    updater's. ``dim`` is the encoder dimension, ``n_items`` the release's item count. With a
    ``relevance`` model (and the ``lookup`` that scores an example's query with it) the
    ranker carries it, and the online terms learn on top of its scores.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    ranker = Ranker.initial(release_id, dim, n_items, config)
    ranker.relevance = relevance
    rels = _relevances(ranker, examples, lookup)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for i in rng.permutation(len(examples)):
            e = examples[i]
            ranker.step(e.q, e.x, e.s, e.row, e.label, e.weight, e.lex, e.qkey, rels[i])
    return ranker


def _relevances(ranker: Ranker, examples: Sequence[Example],
                lookup: QueryRelevance | None) -> list[float | None]:
    """Each example's relevance score under ``ranker``'s relevance model (None without)."""
    model = ranker.relevance
    if model is None:
        return [None] * len(examples)
    if lookup is None:
        raise ValueError("a ranker with a relevance model needs a QueryRelevance lookup")
    return [lookup(model, e.query, e.row) if e.query else None for e in examples]


def _logit(ranker: Ranker, e: Example, rel: float | None) -> float:
    z, _ = ranker.logits(e.q, np.asarray(e.x, dtype=np.float64)[None, :], e.s,
                         np.array([e.row]), np.array([e.lex]), e.qkey,
                         None if rel is None else np.array([rel]))
    return float(z[0])


def evaluate_ranker(ranker: Ranker, examples: Sequence[Example],
                    lookup: QueryRelevance | None = None) -> dict[str, Any]:
    """Held-out quality of ``ranker`` on ``examples``.

    ``log_loss``: binary cross-entropy averaged with the example weights (sum w*loss / sum w),
    in nats. ``pairwise_accuracy``: over every (positive, negative) pair from the same event
    offset (a click and the results skipped above it), the share where the positive scores
    higher, ties counting half; None when there are no such pairs. ``pairs`` and
    ``examples`` are the counts behind them.
    """
    if not examples:
        return {"log_loss": None, "pairwise_accuracy": None, "pairs": 0, "examples": 0}
    rels = _relevances(ranker, examples, lookup)
    z = np.array([_logit(ranker, e, r) for e, r in zip(examples, rels, strict=True)])
    y = np.array([e.label for e in examples], dtype=np.float64)
    w = np.array([e.weight for e in examples], dtype=np.float64)
    losses = np.logaddexp(0.0, z) - y * z      # BCE from the logit, exact for large |z|
    groups: dict[int, tuple[list[float], list[float]]] = {}
    for e, zi in zip(examples, z, strict=True):
        pos, neg = groups.setdefault(e.offset, ([], []))
        (pos if e.label > 0.5 else neg).append(float(zi))
    wins = 0.0
    pairs = 0
    for pos, neg in groups.values():
        if not pos or not neg:
            continue
        p = np.asarray(pos)[:, None]
        n = np.asarray(neg)[None, :]
        wins += float(np.sum(p > n) + 0.5 * np.sum(p == n))
        pairs += p.size * n.size
    return {"log_loss": float(np.sum(w * losses) / np.sum(w)),
            "pairwise_accuracy": wins / pairs if pairs else None,
            "pairs": pairs, "examples": len(examples)}


def _champion(settings: Settings, bundle: Bundle) -> tuple[Ranker, int]:
    """The live ranker for ``bundle`` and its checkpoint seq; the zero-shot start (seq 0) when
    there is no checkpoint for this release, as serving would use."""
    latest = load_latest(settings.home)
    if latest is not None:
        ref, ranker = latest
        if ref.release_id == bundle.release_id and len(ranker.item_bias) == len(bundle.items):
            return ranker, ref.seq
    return Ranker.initial(bundle.release_id, bundle.manifest.encoder.dim, len(bundle.items)), 0


# -- MLflow -----------------------------------------------------------------------------------


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(Array(DataType.double), "query_vector"),
                   ColSpec(Array(DataType.double), "item_vector"),
                   ColSpec("long", "row"),
                   ColSpec(Array(DataType.double), "session_vector", required=False),
                   ColSpec("double", "lexical", required=False),
                   ColSpec("string", "query", required=False),
                   ColSpec("double", "relevance", required=False)]),
    outputs=Schema([ColSpec("double", "logit"), ColSpec("double", "score")]),
)


def ranker_input_example(ranker: Ranker) -> pd.DataFrame:
    """Two candidate rows the ranker pyfunc accepts: unit query and item vectors of the
    release's dimension, the release's first two rows, one with the optional inputs."""
    dim = ranker.U.shape[0]
    unit = np.full(dim, 1.0 / np.sqrt(dim))
    rows = min(2, len(ranker.item_bias))
    return pd.DataFrame({"query_vector": [unit] * rows, "item_vector": [unit] * rows,
                         "row": list(range(rows)), "lexical": [1.0, 0.5][:rows],
                         "query": ["cordless drill"] * rows})


def ranker_model_name(settings: Settings) -> str:
    return f"{settings.model_name}-ranker"


def _metrics(prefix: str, m: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in m.items() if v is not None}


def _register(settings: Settings, ranker: Ranker, params: dict[str, Any],
              metrics: dict[str, float], tags: dict[str, str]) -> tuple[int, str]:
    """Log a run with the checkpoint and register it as a pyfunc version; returns
    (version, run id). A version registered earlier for the same ``tags`` is reused."""
    with tempfile.TemporaryDirectory(prefix="ranker-") as tmp:
        path = Path(tmp) / f"ckpt-{int(tags['offset']):012d}.npz"

        def log_run() -> ModelInfo:
            ranker.save(path)
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
            mlflow.set_tags(tags)
            mlflow.log_artifact(str(path), artifact_path="checkpoint")
            return log_pyfunc("ranker", "ranker", {"checkpoint": str(path)}, SIGNATURE,
                              ranker_model_name(settings),
                              input_example=ranker_input_example(ranker), scope="import")

        registered = register_version(settings, "ranker", ranker_model_name(settings), tags,
                                      f"ranker-{tags['release_id']}-{tags['offset']}", log_run)
    return registered.version, registered.run_id


# -- the retrain ------------------------------------------------------------------------------


def retrain_ranker(settings: Settings, holdout: float = 0.2, epochs: int = 5,
                   encoder: Encoder | None = None) -> dict[str, Any]:
    """Retrain the ranker on the whole event log; promote it if it beats the champion.

    ``holdout`` is the share of the most recent events held out for the gate, ``epochs`` the
    passes over the data. Returns a small JSON-able summary: ``promoted``, and either a
    ``reason`` (too little feedback, nothing new) or the candidate's and champion's held-out
    metrics, the registered ``version`` and the checkpoint ``offset``.

    Safe to retry: the same log and champion reuse the version registered before, and a
    retrain checkpoint already live at the log's end is not retrained.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be between 0 and 1 (exclusive), got {holdout}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    updater = _collect(settings, encoder)
    try:
        return _retrain(settings, updater, holdout, epochs)
    finally:
        updater.close()


def judged_examples(settings: Settings, updater: NearlineUpdater) -> list[Example]:
    """Examples from human judgments (``settings.judgments``), for the items of the live
    release: relevant pairs are positives, the rest negatives. They carry offset 0, so the
    time split always puts them in training and the gate is decided on feedback alone.
    With ``relevance_source`` "feedback" the judgments only gate; nothing trains on them."""
    if settings.judgments is None or settings.relevance_source == "feedback":
        return []
    from pipelines.offline.judged import load_judgments

    judgments = load_judgments(Path(settings.judgments))
    row_of, vectors = updater.row_of, updater.bundle.vectors
    out: list[Example] = []
    known = judgments.frame.filter(pl.col(ITEM_ID).is_in(list(row_of)))
    queries: dict[str, np.ndarray] = {}
    lexical = LexicalCache()
    for query, item, rel in known.select("query", ITEM_ID, "relevance").iter_rows():
        text = normalise_query(query, 10_000)
        if text not in queries:
            queries[text] = updater.encoder.encode_query(text).astype(np.float64)
        row = row_of[item]
        lex = lexical.relative(updater.bundle, text)
        out.append(Example(0, queries[text], np.asarray(vectors[row], np.float64), None, row,
                           1.0 if rel >= judgments.relevant_threshold else 0.0, 1.0,
                           float(lex[row]) if lex is not None else 0.0, query_key(text), text))
    log.info("%d judged examples from %s (%d pairs name items of this release)", len(out),
             settings.judgments, known.height)
    return out


MIN_RELEVANCE_QUERIES = 5
RELEVANCE_FOLDS = 5  # 80% of the queries train each fold: at 2, CrowdFlower's 37 were too few


def relevance_data(judgments: Judgments, lookup: QueryRelevance,
                   ) -> dict[int, tuple[list[int], np.ndarray, np.ndarray, str]]:
    """Per judged query id: the candidates serving retrieves for it from the live release,
    their relevance features, their judged gains (0 when unjudged) and the normalised text."""
    gains = judgments.gains()
    ids = lookup.bundle.items.item_ids
    out = {}
    for qid, query in judgments.queries().iter_rows():
        text = normalise_query(query, 10_000)
        rows, X = lookup.features(text)
        if rows:
            judged = gains.get(qid, {})
            out[qid] = (rows, X, np.array([judged.get(ids[r], 0.0) for r in rows]), text)
    return out


MIN_LISTS_PER_QUERY = 5  # a query's click estimate needs this many result pages seen
SHRINK_EXPOSURE = 1.0    # prior weight, in examined impressions, of the query's mean rate


def feedback_relevance(tally: FeedbackTally, lookup: QueryRelevance,
                       ) -> dict[str, tuple[list[int], np.ndarray, np.ndarray, str]]:
    """Per normalised query with at least :data:`MIN_LISTS_PER_QUERY` result pages shown: the
    items shoppers were shown, their relevance features (computed among serving's
    candidates for the query) and a position-debiased estimate of each one's relevance.

    Shoppers examine top results more than lower ones (position-based model: an item at rank
    p is examined with propensity p ** -PROPENSITY_ETA, Joachims et al. 2017). Each item's
    estimate is its weighted positives over its exposure (:class:`FeedbackTally`, kept by the
    updater that replayed the log, so duplicates and abusive traffic are already dropped):
    the positives it would get per page if it were always examined, shrunk toward the
    query's mean rate by :data:`SHRINK_EXPOSURE`. Items never shown carry no estimate and are
    left out; the model extrapolates to them from their features."""
    ids = lookup.bundle.items.item_ids
    out = {}
    for text, sessions in tally.pages.items():
        if len(sessions) < MIN_LISTS_PER_QUERY:
            continue
        shown = tally.exposure[text]
        rows, X = lookup.features(text, [r for r in (lookup.row_of.get(i) for i in shown)
                                         if r is not None])
        keep = [j for j, r in enumerate(rows) if ids[r] in shown]
        if not keep:
            continue
        per = tally.value.get(text, {})
        # shrunk toward the query's mean rate: an item shown twice at rank 10 and clicked
        # once is not the best item on the page
        mean = sum(per.values()) / sum(shown.values())
        gain = np.array([(per.get(ids[rows[j]], 0.0) + SHRINK_EXPOSURE * mean)
                         / (shown[ids[rows[j]]] + SHRINK_EXPOSURE) for j in keep])
        out[text] = ([rows[j] for j in keep], X[keep], gain, text)
    return out


def fit_relevance(settings: Settings, lookup: QueryRelevance,
                  tally: FeedbackTally | None = None,
                  ) -> tuple[RelevanceModel | None, dict[str, Any]]:
    """The relevance model, if it passes its gate.

    Trained (``settings.relevance_source``) on ``settings.judgments`` (human labels) or on
    the position-debiased feedback in ``tally`` (:func:`feedback_relevance`), against the live
    release's candidates. Gate: cross-fitted over :data:`RELEVANCE_FOLDS` folds of the queries
    (by a hash of their normalised text), the model's nDCG@10 on the held-out fold must beat
    the zero-shot fusion's on the same candidates by :data:`MIN_NDCG_GAIN`. The gains
    are the judgments' whenever there are judgments (a model trained on feedback is then
    judged on the judged queries, all candidates), else the feedback estimates of the shown
    items (which favour the ranking that chose what was shown). Returns (model or None,
    report)."""
    from pipelines.offline.judged import load_judgments
    from pipelines.offline.metrics import ndcg_at_k

    ids = lookup.bundle.items.item_ids
    source = settings.relevance_source
    if source == "auto":
        source = "judgments" if settings.judgments is not None else "feedback"
    report: dict[str, Any] = {"source": source}
    judged = None
    if settings.judgments is not None:
        path = Path(settings.judgments)
        judged = relevance_data(load_judgments(path), lookup)
        report.update({"judgments": str(path), "judgments_sha256": sha256_file(path)[:16]})
    if source == "judgments":
        data = judged
    elif tally is not None:
        data = feedback_relevance(tally, lookup)
        report["propensity_eta"] = PROPENSITY_ETA
    else:
        data = None
    if data is None:
        return None, {}
    gate = judged if judged is not None else data
    report.update({"queries": len(data), "gate": "judgments" if judged is not None
                   else "feedback", "gate_queries": len(gate)})
    if len(data) < MIN_RELEVANCE_QUERIES:
        return None, {**report, "promoted": False, "reason": "too few queries"}

    def ndcg(rows: list[int], gain: np.ndarray, score: np.ndarray) -> float:
        ranking = [ids[rows[j]] for j in np.argsort(-score, kind="stable")[:100]]
        return ndcg_at_k(ranking, {ids[r]: float(g) for r, g in zip(rows, gain, strict=True)
                                   if g > 0}, 10)

    cfg = RankerConfig()
    cv: list[float] = []
    zero: list[float] = []
    for fold in range(RELEVANCE_FOLDS):
        train = [d for d in data.values() if hash_fold(d[3], RELEVANCE_FOLDS) != fold]
        if not train:
            continue
        model = RelevanceModel.fit([d[1] for d in train], [d[2] for d in train])
        for rows, X, gain, text in gate.values():
            if hash_fold(text, RELEVANCE_FOLDS) == fold and gain.any():
                cv.append(ndcg(rows, gain, model.score(X)))
                # the zero-shot ranker: w_dense * cosine + w_lexical * relative BM25
                zero.append(ndcg(rows, gain, cfg.init_w_dense * X[:, COL_COS]
                                 + cfg.init_w_lexical * X[:, COL_BM25_REL]))
    cv_m = {"ndcg@10": float(np.mean(cv)) if cv else 0.0, "queries": len(cv)}
    zero_m = {"ndcg@10": float(np.mean(zero)) if zero else 0.0, "queries": len(zero)}
    promoted = bool(cv) and cv_m["ndcg@10"] >= zero_m["ndcg@10"] + MIN_NDCG_GAIN
    report.update({"cross_fitted": cv_m, "zero_shot": zero_m, "promoted": promoted})
    log.info("relevance model on %d queries (%s; gate on %s): cross-fitted nDCG@10 %.4f vs "
             "zero-shot %.4f -> %s", len(data), source, report["gate"], cv_m["ndcg@10"],
             zero_m["ndcg@10"], "use it" if promoted else "keep the live one")
    if not promoted:
        return None, report
    model = RelevanceModel.fit([d[1] for d in data.values()], [d[2] for d in data.values()],
                               **{k: v for k, v in report.items()
                                  if k in ("source", "judgments", "judgments_sha256")})
    return model, report


def _retrain(settings: Settings, updater: NearlineUpdater, holdout: float,
             epochs: int) -> dict[str, Any]:
    examples: list[Example] = judged_examples(settings, updater) + (updater.sink or [])
    offset = updater.offset
    bundle = updater.bundle
    release_id = bundle.release_id
    base = {"release_id": release_id, "offset": offset, "n_examples": len(examples)}
    lookup = updater.relevance
    champion, champion_seq = _champion(settings, bundle)
    done = _live_retrain(settings, release_id, offset)
    if done is not None and not _new_judgments(settings, champion):
        return {**done, **base}
    fitted, rel_report = fit_relevance(settings, lookup, updater.tally)
    if rel_report:
        base["relevance"] = rel_report
    relevance = fitted or champion.relevance
    train, held = split_by_offset(examples, holdout) if examples else ([], [])
    if len(examples) < MIN_EXAMPLES or not train:
        reason = (f"not enough feedback: {len(examples)} examples" if len(examples) < MIN_EXAMPLES
                  else f"not enough feedback: {len(examples)} examples from too few events to "
                  f"hold {holdout:.0%} out")
        if fitted is None:
            log.info("not retraining: %s", reason)
            return {"promoted": False, "reason": reason, **base}
        # judgments alone: the live ranker with the new relevance model under it
        final = dataclasses.replace(champion, relevance=fitted, meta=champion.meta.copy())
        return _promote(settings, updater, final, champion_seq, base, reason=reason,
                        metrics=_relevance_metrics(rel_report), params={"epochs": 0})

    dim, n_items = bundle.manifest.encoder.dim, len(bundle.items)
    candidate = train_ranker(train, release_id, dim, n_items, epochs, relevance=relevance,
                             lookup=lookup)
    cand_m = evaluate_ranker(candidate, held, lookup)
    champ_m = evaluate_ranker(champion, held, lookup)
    gain = champ_m["log_loss"] - cand_m["log_loss"]
    # A relevance model that passed its own gate is a new base for every query; the log-loss
    # comparison cannot judge it fairly (the champion has already learned the held-out
    # events online), so it is reported, and the relevance gate decides.
    promoted = gain >= MIN_LOG_LOSS_GAIN or fitted is not None
    log.info("held-out log-loss: candidate %.4f, champion (seq %d) %.4f -> %s",
             cand_m["log_loss"], champion_seq, champ_m["log_loss"],
             "promote" if promoted else "keep the champion")

    final = train_ranker(examples, release_id, dim, n_items, epochs, relevance=relevance,
                         lookup=lookup)
    final.meta.retrain_examples = len(examples)
    out = {**base, "n_train": len(train), "n_holdout": len(held), "epochs": epochs,
           "holdout": holdout, "candidate": cand_m, "champion": {**champ_m, "seq": champion_seq},
           "log_loss_gain": gain,
           "promoted_by": ("relevance" if fitted is not None else "log_loss") if promoted else None}
    return _promote(settings, updater, final, champion_seq, out, promoted=promoted,
                    metrics={**_metrics("candidate", cand_m), **_metrics("champion", champ_m),
                             "log_loss_gain": gain, **_relevance_metrics(rel_report)},
                    params={"epochs": epochs, "holdout": holdout, "train_examples": len(train),
                            "holdout_examples": len(held), "min_gain": MIN_LOG_LOSS_GAIN})


def _new_judgments(settings: Settings, ranker: Ranker) -> bool:
    """Whether ``settings.judgments`` differ from those the live relevance model saw."""
    if settings.judgments is None:
        return False
    seen = ranker.relevance.meta.get("judgments_sha256") if ranker.relevance else None
    return seen != sha256_file(Path(settings.judgments))[:16]


def _relevance_metrics(report: dict[str, Any]) -> dict[str, float]:
    if "cross_fitted" not in report:
        return {}
    return {k.replace("@", "_at_"): v for k, v in
            {**_metrics("relevance_cv", report["cross_fitted"]),
             **_metrics("relevance_zero_shot", report["zero_shot"])}.items()}


def _promote(settings: Settings, updater: NearlineUpdater, final: Ranker, champion_seq: int,
             out: dict[str, Any], metrics: dict[str, float], params: dict[str, Any],
             promoted: bool = True, reason: str | None = None) -> dict[str, Any]:
    """Register ``final`` as a version of the ranker model; if ``promoted``, publish it as the
    checkpoint at the log's end and move the ``champion`` alias."""
    offset, release_id = updater.offset, updater.bundle.release_id
    relevance = out.get("relevance", {})
    final.meta.offset = final.meta.retrain_offset = offset
    version, run_id = _register(
        settings, final,
        params={**params, "examples": out["n_examples"], "release_id": release_id,
                "offset": offset, "champion_seq": champion_seq},
        metrics=metrics,
        tags={"release_id": release_id, "offset": str(offset),
              "epochs": str(params.get("epochs", 0)), "holdout": str(params.get("holdout", "")),
              "champion_seq": str(champion_seq), "promoted": str(promoted).lower(),
              "judgments": str(relevance.get("judgments_sha256", "none"))},
    )
    result: dict[str, Any] = {"promoted": promoted, **out,
                              "model_name": ranker_model_name(settings), "version": version,
                              "run_id": run_id}
    if reason is not None:
        result["reason"] = f"{reason}; the relevance model alone was retrained"
    if promoted:
        final.meta.retrain_version = version
        # The collecting updater holds exactly the transient state (sessions, impressions,
        # replay window) and counters at ``offset``: its own publish() writes the warm-up
        # metadata a restarted updater needs to continue from this checkpoint.
        updater.publish(final)
        ref = read_latest(settings.home)
        result["checkpoint_seq"] = ref.seq if ref else None
        promote_version(settings, result["model_name"], version)
        log.info("published retrained ranker v%d at offset %d", version, offset)
    return result


def _live_retrain(settings: Settings, release_id: str, offset: int) -> dict[str, Any] | None:
    """If the live checkpoint is a retrain at exactly this offset, nothing new has arrived
    since: finish its promotion (a retry after a failure) and report it as promoted and
    ``already_live``; else None."""
    latest = load_latest(settings.home)
    if latest is None:
        return None
    ref, ranker = latest
    if (ref.release_id != release_id or ref.offset != offset
            or ranker.meta.retrain_offset != offset or ranker.meta.retrain_version is None):
        return None
    version = ranker.meta.retrain_version
    name = ranker_model_name(settings)
    promote_version(settings, name, version)
    # promoted: this retrain's outcome is live (an earlier try, or run, promoted it)
    return {"promoted": True, "already_live": True, "model_name": name, "version": version,
            "checkpoint_seq": ref.seq,
            "reason": f"no new feedback since the retrain registered as version {version}, "
                      "which is live"}
