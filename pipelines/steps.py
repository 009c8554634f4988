"""The catalogue pipeline's steps as called by both the CLI and the Airflow DAG.

Each function takes the settings and small, JSON-able arguments and returns a small,
JSON-able dict: exactly what an Airflow XCom should carry (paths, ids, counts).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from serving.encoder import Encoder
from serving.settings import Settings

if TYPE_CHECKING:
    from pipelines.catalogue.embed import EncoderLoader

log = logging.getLogger(__name__)

DEMO_CATALOGUE = Path(__file__).parent / "demo" / "catalogue.csv"


# What the steps that build their result here return (the others return the to_dict() of a
# typed report: IngestReport, EmbedReport, PublishResult, RegisterResult).
class IndexOut(TypedDict):
    bundle_dir: str
    vectors_stored: int


class EvaluateOut(TypedDict):
    bundle_dir: str
    metrics: dict[str, float]
    gate: dict[str, Any]


class RetrainOut(TypedDict):
    promoted: bool
    version: int | None
    offset: NotRequired[int]


def configured_encoder_path(settings: Settings) -> Path | None:
    """The configured encoder; without one, the promoted fine-tune (``<home>/encoders/CHAMPION``)
    if any; ``None`` is the packaged default."""
    from pipelines.encoder.train import champion_encoder_path

    return settings.encoder_path or champion_encoder_path(settings.home)


def configured_encoder(settings: Settings) -> Encoder:
    """The encoder of :func:`configured_encoder_path`, loaded."""
    return Encoder(configured_encoder_path(settings), max_length=settings.item_max_tokens,
                   precision=settings.embed_precision)


def configured_encoder_loader(settings: Settings) -> EncoderLoader:
    """The encoder of :func:`configured_encoder_path`, identified by its version but not loaded yet."""
    from pipelines.catalogue.embed import EncoderLoader
    from serving.encoder import encoder_version

    return EncoderLoader(encoder_version(configured_encoder_path(settings), settings.item_max_tokens),
                         lambda: configured_encoder(settings))


def run_ingest(settings: Settings, catalogue: str | Path | None = None) -> dict[str, Any]:
    from pipelines.catalogue.ingest import ingest_catalogue

    source = Path(catalogue) if catalogue else DEMO_CATALOGUE
    report = ingest_catalogue(source, settings.warehouse_path, settings.max_reject_share,
                              max_delist_share=settings.max_delist_share)
    return report.to_dict()


def run_embed(settings: Settings, shard: int = 0, shards: int = 1,
              progress: bool = False, encoder: Encoder | None = None) -> dict[str, Any]:
    """Embed shard ``shard`` of ``shards``. Without ``encoder``, the configured one is loaded
    only if the shard has pending items. ``progress``: a progress bar instead of log lines."""
    from pipelines.catalogue.embed import embed_items

    report = embed_items(settings.warehouse_path, settings.work_dir,
                         encoder or configured_encoder_loader(settings), shard, shards,
                         settings.embed_batch_size, progress=progress)
    return report.to_dict()


def run_index(settings: Settings, encoder: Encoder | None = None) -> IndexOut:
    """Fold embedded shards into the warehouse, then stage a release bundle."""
    from pipelines.catalogue.embed import store_vectors
    from pipelines.catalogue.index import build_index

    encoder = encoder or configured_encoder(settings)
    stored = store_vectors(settings.warehouse_path, settings.work_dir, encoder.version)
    bundle = build_index(settings.warehouse_path, settings.releases_dir, encoder,
                         settings.index_seed, settings.index_recall_target)
    return IndexOut(bundle_dir=str(bundle), vectors_stored=stored)


def run_evaluate(settings: Settings, bundle_dir: str | Path, golden: str | Path | None = None,
                 judgments: str | Path | None = None, encoder: Encoder | None = None,
                 demo: bool = False) -> EvaluateOut:
    """Evaluate a staged bundle and decide its gate. ``demo``: the bundle holds the demo
    catalogue, so without golden queries given or configured the demo's own gate it."""
    from pipelines.catalogue.gate import DEMO_GOLDEN, evaluate_release

    golden = golden or settings.golden_queries or (DEMO_GOLDEN if demo else None)
    judgments = judgments or settings.judgments
    result = evaluate_release(Path(bundle_dir), settings, encoder,
                              Path(golden) if golden else None,
                              Path(judgments) if judgments else None)
    return EvaluateOut(bundle_dir=str(bundle_dir), metrics=result["metrics"],
                          gate=result["gate"])


def run_publish(settings: Settings, bundle_dir: str | Path) -> dict[str, Any]:
    from pipelines.catalogue.publish import publish_release

    return publish_release(Path(bundle_dir), settings.releases_dir).to_dict()


def run_register(settings: Settings, release_dir: str | Path) -> dict[str, Any]:
    from pipelines.registry import register_release

    return register_release(Path(release_dir), settings).to_dict()


def run_build(settings: Settings, catalogue: str | Path | None = None,
              golden: str | Path | None = None, register: bool = True,
              progress: bool = False, encoder: Encoder | None = None) -> dict[str, Any]:
    """The whole catalogue refresh in one process, as the DAG runs it step by step.

    With the demo catalogue and no golden file given or configured, the demo golden queries
    gate it.
    """
    encoder = encoder or configured_encoder(settings)
    out: dict[str, Any] = {"ingest": run_ingest(settings, catalogue)}
    out["embed"] = run_embed(settings, progress=progress, encoder=encoder)
    out["index"] = run_index(settings, encoder)
    out["evaluate"] = run_evaluate(settings, out["index"]["bundle_dir"], golden, encoder=encoder,
                                   demo=catalogue is None)
    out["publish"] = run_publish(settings, out["index"]["bundle_dir"])
    if register:
        out["register"] = run_register(settings, out["publish"]["path"])
    return out


def run_retrain(settings: Settings, holdout: float = 0.2, epochs: int = 5,
                encoder: Encoder | None = None) -> dict[str, Any]:
    """Retrain the ranker on the whole event log; publish and register it as champion only if
    it beats the live one on the most recent ``holdout`` share of events."""
    from pipelines.learning.retrain import retrain_ranker

    return retrain_ranker(settings, holdout=holdout, epochs=epochs, encoder=encoder)


def report_retrain(settings: Settings, result: dict[str, Any]) -> RetrainOut:
    """Log a retrain's outcome (``result`` of :func:`run_retrain`) and check that a promotion
    took effect: the live ranker pointer is at the promoted checkpoint or past it.

    Raises :class:`serving.errors.ReleaseError` when the pointer went backwards."""
    from serving.checkpoint import read_latest
    from serving.errors import ReleaseError

    if not result["promoted"]:
        if "reason" in result:
            log.info("ranker not retrained: %s", result["reason"])
        else:
            log.info("kept the champion: held-out log-loss candidate %.4f vs champion %.4f "
                     "(version %s registered, not promoted)", result["candidate"]["log_loss"],
                     result["champion"]["log_loss"], result["version"])
        return RetrainOut(promoted=False, version=result.get("version"))
    latest = read_latest(settings.home)
    if latest is None or latest.seq < result["checkpoint_seq"]:
        raise ReleaseError(
            f"ranker version {result['version']} was promoted as checkpoint "
            f"{result['checkpoint_seq']}, but the live pointer is at "
            f"{latest.seq if latest else 'nothing'}: the ranker pointer went backwards")
    log.info("promoted ranker version %s: held-out log-loss %.4f (champion %.4f), checkpoint %d "
             "at offset %d", result["version"], result["candidate"]["log_loss"],
             result["champion"]["log_loss"], result["checkpoint_seq"], result["offset"])
    return RetrainOut(promoted=True, version=result["version"], offset=result["offset"])


def run_collect_pairs(settings: Settings, products: str | Path | None = None,
                      judgments: str | Path | None = None,
                      holdout: float = 0.2) -> dict[str, Any]:
    """Positive (query, item) pairs from feedback (and judged data), split by query hash into
    training and held-out queries; returns the pairs file and counts."""
    from pipelines.encoder.pairs import collect_pairs

    return collect_pairs(settings, Path(products) if products else None,
                         Path(judgments) if judgments else None, holdout)


def run_train_encoder(settings: Settings, pairs_path: str | Path, max_steps: int | None = 200,
                      epochs: int = 1) -> dict[str, Any]:
    """Fine-tune the encoder on the training pairs of ``pairs_path``; returns its directory."""
    from pipelines.encoder.train import TrainConfig, train_encoder

    cfg = TrainConfig(max_steps=max_steps, epochs=epochs,
                      item_max_tokens=settings.item_max_tokens)
    return train_encoder(settings, pairs_path, cfg)


def run_evaluate_encoders(settings: Settings, pairs: dict[str, Any],
                          trained: dict[str, Any]) -> dict[str, Any]:
    """Held-out nDCG@10 of the candidate (``trained``) and the incumbent encoder."""
    from pipelines.encoder.heldout import evaluate_encoders

    return evaluate_encoders(settings, pairs["pairs_path"], trained["encoder_dir"],
                             pairs["products"], pairs["judgments"])


def run_register_encoder(settings: Settings, pairs: dict[str, Any], trained: dict[str, Any],
                         evaluation: dict[str, Any], promote: bool = True) -> dict[str, Any]:
    """Register the candidate encoder in MLflow; promote it only if it won on held-out
    queries (and ``promote``)."""
    from pipelines.encoder.register import register_encoder

    return register_encoder(settings, trained, evaluation, pairs, promote)


def run_finetune(settings: Settings, products: str | Path | None = None,
                 judgments: str | Path | None = None, holdout: float = 0.2, fold: int = 0,
                 max_steps: int | None = 200, epochs: int = 1, promote: bool = True,
                 min_gain: float | None = None, hybrid: bool = False,
                 eval_max_items: int | None = None, threads: int = 2) -> dict[str, Any]:
    """Fine-tune the encoder on feedback (and judged) pairs of the training queries; register
    it, and promote it only if it beats the incumbent on the held-out queries."""
    from pipelines.encoder.finetune import finetune_encoder
    from pipelines.encoder.train import TrainConfig
    from pipelines.offline.metrics import MIN_NDCG_GAIN

    cfg = TrainConfig(max_steps=max_steps, epochs=epochs, item_max_tokens=settings.item_max_tokens,
                      threads=threads)
    return finetune_encoder(settings, Path(products) if products else None,
                            Path(judgments) if judgments else None, holdout, fold, cfg, promote,
                            MIN_NDCG_GAIN if min_gain is None else min_gain, hybrid,
                            max_items=eval_max_items)
