"""Release evaluation and the promotion gate.

A staged release is loaded through serving itself (the same code path shops use) and scored
on: the index recall measured at build time, golden queries with expected products, and
judged queries when a judgments file is configured. The gate decides whether the release may
go live and become the registry's ``champion``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.offline.judged import load_judgments, score_rankings
from serving.encoder import Encoder
from serving.errors import InvalidInputError
from serving.manifest import write_json_atomic
from serving.recommender import Recommender
from serving.settings import Settings

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
DEMO_GOLDEN = Path(__file__).parents[1] / "demo" / "golden_queries.json"


@dataclass(frozen=True)
class GateThresholds:
    min_index_recall: float = 0.95
    min_golden_recall: float = 0.9
    min_judged_ndcg: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> GateThresholds:
        return cls(settings.index_recall_target, settings.gate_min_golden_recall,
                   settings.gate_min_judged_ndcg)


def load_golden(path: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"golden queries {path} cannot be read: {exc}") from exc
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("query"), str) and isinstance(e.get("expected"), list)
        for e in entries
    ):
        raise InvalidInputError(f"golden queries {path}: expected a list of "
                                "{'query': str, 'expected': [item ids]} objects")
    return entries


def golden_recall(rec: Recommender, golden: list[dict[str, Any]], k: int = 10) -> dict[str, Any]:
    """Share of expected items found in each golden query's top ``k``."""
    known = set(rec.bundle.items.item_ids.tolist())
    missing = sorted({i for e in golden for i in e["expected"] if i not in known})
    if missing:
        raise InvalidInputError(f"golden queries expect items not in the release: {missing[:10]}")
    per_query = []
    for entry in golden:
        top = [r.item_id for r in rec.recommend(entry["query"], k=k)]
        found = [i for i in entry["expected"] if i in top]
        per_query.append({"query": entry["query"], "recall": len(found) / len(entry["expected"]),
                          "missed": [i for i in entry["expected"] if i not in top]})
    mean = sum(q["recall"] for q in per_query) / len(per_query) if per_query else 1.0
    return {"recall_at_10": mean, "n_queries": len(per_query), "per_query": per_query}


def judged_retrieval(rec: Recommender, judgments_path: Path) -> dict[str, Any]:
    """Full-catalogue retrieval metrics of the release on judged queries."""
    judgments = load_judgments(judgments_path)
    rankings = {}
    for qid, query in judgments.queries().iter_rows():
        rankings[qid] = [r.item_id for r in rec.recommend(query[:rec.settings.max_query_chars],
                                                          k=100)]
    means, _ = score_rankings(rankings, judgments, "retrieval")
    return {**means, "n_queries": len(rankings)}


def evaluate_release(bundle_dir: Path, settings: Settings, encoder: Encoder | None = None,
                     golden_path: Path | None = None,
                     judgments_path: Path | None = None) -> dict[str, Any]:
    """Evaluate the bundle at ``bundle_dir``, write ``evaluation.json`` beside it, return it.

    The result has ``metrics`` (flat, for MLflow), ``details`` and ``gate``
    (``passed`` plus the reasons it failed).
    """
    rec = Recommender.from_bundle(bundle_dir, settings=settings, encoder=encoder, warm=False)
    if rec.manifest.evaluation is not None:  # already published: its verdict is final
        return rec.manifest.evaluation
    thresholds = GateThresholds.from_settings(settings)
    manifest = rec.manifest
    metrics: dict[str, float] = {"index_recall_at_10": manifest.index.recall_at_10,
                                 "item_count": float(manifest.item_count)}
    details: dict[str, Any] = {}
    failures: list[str] = []
    if manifest.index.recall_at_10 < thresholds.min_index_recall:
        failures.append(f"index recall@10 {manifest.index.recall_at_10:.3f} < "
                        f"{thresholds.min_index_recall}")
    if golden_path is not None:
        golden = golden_recall(rec, load_golden(golden_path))
        metrics["golden_recall_at_10"] = golden["recall_at_10"]
        details["golden"] = golden
        if golden["recall_at_10"] < thresholds.min_golden_recall:
            failures.append(f"golden recall@10 {golden['recall_at_10']:.3f} < "
                            f"{thresholds.min_golden_recall}")
    if judgments_path is not None:
        judged = judged_retrieval(rec, judgments_path)
        metrics.update({f"judged_{k}": v for k, v in judged.items() if k != "n_queries"})
        details["judged"] = judged
        if judged["ndcg@10"] < thresholds.min_judged_ndcg:
            failures.append(f"judged nDCG@10 {judged['ndcg@10']:.3f} < "
                            f"{thresholds.min_judged_ndcg}")
    result = {"release_id": manifest.release_id, "metrics": metrics, "details": details,
              "gate": {"passed": not failures, "failures": failures,
                       "thresholds": thresholds.__dict__}}
    write_json_atomic(bundle_dir / EVALUATION_FILE, result)
    log.info("release %s evaluated: %s; gate %s", manifest.release_id, metrics,
             "passed" if not failures else f"failed: {failures}")
    return result
