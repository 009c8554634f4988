"""The catalogue pipeline's steps as called by both the CLI and the Airflow DAG.

Each function takes the settings and small, JSON-able arguments and returns a small,
JSON-able dict: exactly what an Airflow XCom should carry (paths, ids, counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.encoder import Encoder
from serving.settings import Settings

if TYPE_CHECKING:
    from pipelines.embed import EncoderLoader

DEMO_CATALOGUE = Path(__file__).parent / "demo" / "catalogue.csv"


def _encoder_path(settings: Settings) -> Path | None:
    """The configured encoder; without one, the promoted fine-tune (``<home>/encoders/CHAMPION``)
    if any; ``None`` is the packaged default."""
    from pipelines.finetune import champion_encoder_path

    return settings.encoder_path or champion_encoder_path(settings.home)


def _encoder(settings: Settings) -> Encoder:
    """The encoder of :func:`_encoder_path`, loaded."""
    return Encoder(_encoder_path(settings), max_length=settings.item_max_tokens,
                   precision=settings.embed_precision)


def _encoder_loader(settings: Settings) -> EncoderLoader:
    """The encoder of :func:`_encoder_path`, identified by its version but not loaded yet."""
    from pipelines.embed import EncoderLoader
    from serving.encoder import encoder_version

    return EncoderLoader(encoder_version(_encoder_path(settings), settings.item_max_tokens),
                         lambda: _encoder(settings))


def run_ingest(settings: Settings, catalogue: str | Path | None = None) -> dict[str, Any]:
    from pipelines.catalogue import ingest_catalogue

    source = Path(catalogue) if catalogue else DEMO_CATALOGUE
    report = ingest_catalogue(source, settings.warehouse_path, settings.max_reject_share)
    return report.to_dict()


def run_embed(settings: Settings, shard: int = 0, shards: int = 1,
              progress: bool = False, encoder: Encoder | None = None) -> dict[str, Any]:
    """Embed shard ``shard`` of ``shards``. Without ``encoder``, the configured one is loaded
    only if the shard has pending items. ``progress``: a progress bar instead of log lines."""
    from pipelines.embed import embed_items

    report = embed_items(settings.warehouse_path, settings.work_dir,
                         encoder or _encoder_loader(settings), shard, shards,
                         settings.embed_batch_size, progress=progress)
    return report.to_dict()


def run_index(settings: Settings, encoder: Encoder | None = None) -> dict[str, Any]:
    """Fold embedded shards into the warehouse, then stage a release bundle."""
    from pipelines.embed import store_vectors
    from pipelines.index import build_index

    encoder = encoder or _encoder(settings)
    stored = store_vectors(settings.warehouse_path, settings.work_dir, encoder.version)
    bundle = build_index(settings.warehouse_path, settings.releases_dir, encoder,
                         settings.index_seed, settings.index_recall_target)
    return {"bundle_dir": str(bundle), "vectors_stored": stored}


def run_evaluate(settings: Settings, bundle_dir: str | Path, golden: str | Path | None = None,
                 judgments: str | Path | None = None,
                 encoder: Encoder | None = None) -> dict[str, Any]:
    from pipelines.evaluate import evaluate_release

    golden = golden or settings.golden_queries
    judgments = judgments or settings.judgments
    result = evaluate_release(Path(bundle_dir), settings, encoder,
                              Path(golden) if golden else None,
                              Path(judgments) if judgments else None)
    return {"bundle_dir": str(bundle_dir), "metrics": result["metrics"], "gate": result["gate"]}


def run_publish(settings: Settings, bundle_dir: str | Path) -> dict[str, Any]:
    from pipelines.publish import publish_release

    return publish_release(Path(bundle_dir), settings.releases_dir).to_dict()


def run_register(settings: Settings, release_dir: str | Path) -> dict[str, Any]:
    from pipelines.registry import register_release

    return register_release(Path(release_dir), settings).to_dict()


def run_build(settings: Settings, catalogue: str | Path | None = None,
              golden: str | Path | None = None, register: bool = True,
              progress: bool = False, encoder: Encoder | None = None) -> dict[str, Any]:
    """The whole catalogue refresh in one process, as the DAG runs it step by step.

    With the demo catalogue and no golden file given, the demo golden queries gate it.
    """
    from pipelines.evaluate import DEMO_GOLDEN

    if golden is None and catalogue is None and settings.golden_queries is None:
        golden = DEMO_GOLDEN
    encoder = encoder or _encoder(settings)
    out: dict[str, Any] = {"ingest": run_ingest(settings, catalogue)}
    out["embed"] = run_embed(settings, progress=progress, encoder=encoder)
    out["index"] = run_index(settings, encoder)
    out["evaluate"] = run_evaluate(settings, out["index"]["bundle_dir"], golden, encoder=encoder)
    out["publish"] = run_publish(settings, out["index"]["bundle_dir"])
    if register:
        out["register"] = run_register(settings, out["publish"]["path"])
    return out


def run_retrain(settings: Settings, holdout: float = 0.2, epochs: int = 5,
                encoder: Encoder | None = None) -> dict[str, Any]:
    """Retrain the ranker on the whole event log; publish and register it as champion only if
    it beats the live one on the most recent ``holdout`` share of events."""
    from pipelines.retrain import retrain_ranker

    return retrain_ranker(settings, holdout=holdout, epochs=epochs, encoder=encoder)


def run_finetune(settings: Settings, products: str | Path | None = None,
                 judgments: str | Path | None = None, holdout: float = 0.2, fold: int = 0,
                 max_steps: int | None = 200, epochs: int = 1, promote: bool = True,
                 min_gain: float | None = None, hybrid: bool = False,
                 eval_max_items: int | None = None, threads: int = 2) -> dict[str, Any]:
    """Fine-tune the encoder on feedback (and judged) pairs of the training queries; register
    it, and promote it only if it beats the incumbent on the held-out queries."""
    from pipelines.finetune import MIN_GAIN, TrainConfig, finetune_encoder

    cfg = TrainConfig(max_steps=max_steps, epochs=epochs, item_max_tokens=settings.item_max_tokens,
                      threads=threads)
    return finetune_encoder(settings, Path(products) if products else None,
                            Path(judgments) if judgments else None, holdout, fold, cfg, promote,
                            MIN_GAIN if min_gain is None else min_gain, hybrid,
                            max_items=eval_max_items)
