"""The catalogue pipeline's steps as called by both the CLI and the Airflow DAG.

Each function takes the settings and small, JSON-able arguments and returns a small,
JSON-able dict: exactly what an Airflow XCom should carry (paths, ids, counts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from serving.encoder import Encoder
from serving.failpoints import failpoint
from serving.settings import Settings

if TYPE_CHECKING:
    from pipelines.catalogue.embed import EncoderLoader

log = logging.getLogger(__name__)

DEMO_CATALOGUE = Path(__file__).parent / "demo" / "catalogue.csv"
BUILD_STAGING = "build"   # run_build's copy of the warehouse: <warehouse>.build


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


def run_ingest(settings: Settings, catalogue: str | Path | None = None,
               staging: str | None = None) -> dict[str, Any]:
    """Ingest ``catalogue`` (default: the demo). ``staging`` names a copy of the warehouse to
    ingest into instead (see :mod:`pipelines.catalogue.warehouse`): the result's ``warehouse``
    is the path the later steps of the run work on, and :func:`run_publish` commits it only
    if the release passes its gate. A refused catalogue leaves the warehouse as it was, with
    the rejected rows recorded."""
    from pipelines.catalogue.ingest import ingest_catalogue
    from pipelines.catalogue.warehouse import (
        build_lock,
        discard_warehouse,
        stage_warehouse,
        staged_path,
    )

    failpoint("step.ingest.begin")
    source = Path(catalogue) if catalogue else DEMO_CATALOGUE
    live = settings.warehouse_path
    with build_lock(live):
        target = stage_warehouse(live, staged_path(live, staging)) if staging else live
        try:
            report = ingest_catalogue(source, target, settings.max_reject_share,
                                      max_delist_share=settings.max_delist_share)
        except Exception:
            if target != live:
                discard_warehouse(live, target, "failed")
            raise
    failpoint("step.ingest.end")
    return {**report.to_dict(), "warehouse": str(target)}


def run_warehouse(settings: Settings, warehouse: str | Path | None) -> Path:
    """The warehouse a step works on: ``warehouse`` (a run's copy, see :func:`run_ingest`),
    else the home's. Raises :class:`CatalogueError` when the copy is gone."""
    from serving.errors import CatalogueError

    if not warehouse:
        return settings.warehouse_path
    path = Path(warehouse)
    if path != settings.warehouse_path and not path.exists():
        raise CatalogueError(f"this run's copy of the warehouse {path} is gone (committed or "
                             "discarded by its publish step, or by a later run's ingest): run "
                             "the refresh again from ingest")
    return path


def yield_cpu(settings: Settings) -> int:
    """Lower this process's CPU priority to ``settings.embed_nice`` (a batch embedding beside
    serving should not take a core from a request); never raises it back. With
    ``settings.embed_threads``, also cap torch's threads at that (several embedding processes
    on one host, each with every core, oversubscribe it). Called by the processes that are
    batch jobs as a whole (the DAG's embed task, ``instantrec build`` and ``embed``), never
    inside a process that serves or measures serving. Returns the niceness now."""
    current = os.nice(0)
    if settings.embed_nice > current:
        current = os.nice(settings.embed_nice - current)
    if settings.embed_threads:
        import torch

        torch.set_num_threads(settings.embed_threads)
    return current


def run_embed(settings: Settings, shard: int = 0, shards: int = 1,
              progress: bool = False, encoder: Encoder | None = None,
              warehouse: str | Path | None = None) -> dict[str, Any]:
    """Embed shard ``shard`` of ``shards`` of ``warehouse`` (default: the home's; a run's
    copy, see :func:`run_ingest`). Without ``encoder``, the configured one is loaded only if
    the shard has pending items. ``progress``: a progress bar instead of log lines. Reads the
    warehouse only, so shards run side by side without the build lock."""
    from pipelines.catalogue.embed import embed_items

    failpoint("step.embed.begin")
    report = embed_items(run_warehouse(settings, warehouse),
                         settings.work_dir, encoder or configured_encoder_loader(settings),
                         shard, shards, settings.embed_batch_size, progress=progress)
    failpoint("step.embed.end")
    return report.to_dict()


def run_index(settings: Settings, encoder: Encoder | None = None,
              warehouse: str | Path | None = None) -> IndexOut:
    """Fold embedded shards into ``warehouse`` (default: the home's; a run's copy, see
    :func:`run_ingest`), then stage a release bundle."""
    from pipelines.catalogue.embed import store_vectors
    from pipelines.catalogue.index import build_index
    from pipelines.catalogue.warehouse import build_lock

    failpoint("step.index.begin")
    target = run_warehouse(settings, warehouse)
    encoder = encoder or configured_encoder(settings)
    with build_lock(settings.warehouse_path):
        stored = store_vectors(target, settings.work_dir, encoder.version)
        failpoint("index.stored")
        bundle = build_index(target, settings.releases_dir, encoder, settings.index_seed,
                             settings.index_recall_target)
    failpoint("step.index.end")
    return IndexOut(bundle_dir=str(bundle), vectors_stored=stored)


def run_evaluate(settings: Settings, bundle_dir: str | Path, golden: str | Path | None = None,
                 judgments: str | Path | None = None, encoder: Encoder | None = None,
                 demo: bool = False) -> EvaluateOut:
    """Evaluate a staged bundle and decide its gate. ``demo``: the bundle holds the demo
    catalogue, so without golden queries given or configured the demo's own gate it."""
    from pipelines.catalogue.gate import DEMO_GOLDEN, evaluate_release

    failpoint("step.evaluate.begin")
    golden = golden or settings.golden_queries or (DEMO_GOLDEN if demo else None)
    judgments = judgments or settings.judgments
    result = evaluate_release(Path(bundle_dir), settings, encoder,
                              Path(golden) if golden else None,
                              Path(judgments) if judgments else None)
    failpoint("step.evaluate.end")
    return EvaluateOut(bundle_dir=str(bundle_dir), metrics=result["metrics"],
                          gate=result["gate"])


PUBLISH_LOCK = ".publish.lock"   # under releases/: one publish or register at a time
PUBLISH_LOCK_TIMEOUT_S = 1800.0


@contextmanager
def publish_lock(settings: Settings) -> Iterator[None]:
    """Hold the home's publish lock (``releases/.publish.lock``, a blocking ``flock``), which
    :func:`run_publish` and :func:`run_register` hold throughout: of two overlapping runs, the
    second waits for the first and then finds its work done (the same release), or moves the
    pointer and then the ``champion`` alias after it (a newer one). Without it, a second
    publish of one staged bundle could find it half moved (and fail, or take the warehouse
    lock from the first), and a release registered after a newer one went live could move
    ``champion`` between the pointer check and the alias. The kernel drops it when its holder
    dies."""
    from pipelines.lockfile import waiting_lock

    with waiting_lock(settings.releases_dir / PUBLISH_LOCK, PUBLISH_LOCK_TIMEOUT_S,
                      "the publish lock"):
        yield


def run_publish(settings: Settings, bundle_dir: str | Path,
                warehouse: str | Path | None = None) -> dict[str, Any]:
    """Publish the evaluated bundle; with ``warehouse`` (the run's copy, see
    :func:`run_ingest`), then replace the home's warehouse with it if the release passed its
    gate, or discard it (keeping its record of bad input) if not: the result's ``warehouse``
    says ``committed`` or ``rolled back``. With ``settings.release_store``, a release that is
    live here is then pushed to that store (files, manifest, then its pointer; a retry pushes
    what a killed attempt did not): the result's ``store`` says what the push did. Holds
    :func:`publish_lock`."""
    from pipelines.catalogue.publish import publish_release, push_release
    from pipelines.catalogue.warehouse import build_lock, commit_warehouse, discard_warehouse

    failpoint("step.publish.begin")
    with publish_lock(settings):
        out = publish_release(Path(bundle_dir), settings.releases_dir).to_dict()
        live = settings.warehouse_path
        if warehouse is not None and Path(warehouse) != live:
            with build_lock(live):
                if out["gate_passed"]:
                    commit_warehouse(live, Path(warehouse))
                    out["warehouse"] = "committed"
                else:
                    discard_warehouse(live, Path(warehouse),
                                      f"rolled back: release {out['release_id']} failed its gate")
                    out["warehouse"] = "rolled back"
        if settings.release_store and out["live"]:
            from serving.objectstore import open_store

            out["store"] = push_release(open_store(settings.release_store),
                                        settings.releases_dir, out["release_id"]).to_dict()
        if out["went_live"]:
            from serving.retention import prune_after_live

            out["pruned"] = prune_after_live(settings.releases_dir, settings.keep_releases,
                                             settings.home)
    failpoint("step.publish.end")
    return out


def run_register(settings: Settings, release_dir: str | Path) -> dict[str, Any]:
    """Register a published release in MLflow (once per release); ``champion`` follows it if
    it passed its gate and is live. Holds :func:`publish_lock`, so that no publish moves the
    pointer while the alias is decided."""
    from pipelines.registry import register_release

    failpoint("step.register.begin")
    with publish_lock(settings):
        out = register_release(Path(release_dir), settings).to_dict()
    failpoint("step.register.end")
    return out


def run_build(settings: Settings, catalogue: str | Path | None = None,
              golden: str | Path | None = None, register: bool = True,
              progress: bool = False, encoder: Encoder | None = None) -> dict[str, Any]:
    """The whole catalogue refresh in one process, as the DAG runs it step by step, holding
    the build lock throughout. The steps change a copy of the warehouse, which replaces it
    only once the release passed its gate: a failed gate, or a failure anywhere, leaves the
    warehouse as it was (see :mod:`pipelines.catalogue.warehouse`).

    With the demo catalogue and no golden file given or configured, the demo golden queries
    gate it.
    """
    from pipelines.catalogue.warehouse import build_lock, discard_warehouse

    live = settings.warehouse_path
    with build_lock(live):  # before loading the encoder: a second build is refused at once
        encoder = encoder or configured_encoder(settings)
        out: dict[str, Any] = {"ingest": run_ingest(settings, catalogue, staging=BUILD_STAGING)}
        staged = Path(out["ingest"]["warehouse"])
        try:
            out["embed"] = run_embed(settings, progress=progress, encoder=encoder,
                                     warehouse=staged)
            out["index"] = run_index(settings, encoder, warehouse=staged)
            out["evaluate"] = run_evaluate(settings, out["index"]["bundle_dir"], golden,
                                           encoder=encoder, demo=catalogue is None)
            out["publish"] = run_publish(settings, out["index"]["bundle_dir"], warehouse=staged)
        except BaseException as exc:
            try:
                discard_warehouse(live, staged, f"rolled back: {type(exc).__name__}")
            except Exception:  # noqa: BLE001 - the build's own error is the one to report
                log.exception("could not discard the build's copy of the warehouse %s", staged)
            raise
    if register:
        out["register"] = run_register(settings, out["publish"]["path"])
    return out


def run_retrain(settings: Settings, holdout: float = 0.2, epochs: int = 5,
                encoder: Encoder | None = None) -> dict[str, Any]:
    """Retrain the ranker on the whole event log; publish and register it as champion only if
    it beats the live one on the most recent ``holdout`` share of events."""
    from pipelines.learning.retrain import retrain_ranker

    failpoint("step.retrain.begin")
    out = retrain_ranker(settings, holdout=holdout, epochs=epochs, encoder=encoder)
    failpoint("step.retrain.end")
    return out


def report_retrain(settings: Settings, result: dict[str, Any]) -> RetrainOut:
    """Log a retrain's outcome (``result`` of :func:`run_retrain`) and check that a promotion
    took effect: the live ranker pointer is at the promoted checkpoint or past it.

    Raises :class:`serving.errors.ReleaseError` when the pointer went backwards."""
    from serving.checkpoint import read_latest
    from serving.errors import ReleaseError

    failpoint("step.report.begin")
    if not result["promoted"]:
        if "reason" in result:
            log.info("ranker not retrained: %s", result["reason"])
        else:
            log.info("kept the champion: held-out log-loss candidate %.4f vs champion %.4f "
                     "(version %s registered, not promoted)", result["candidate"]["log_loss"],
                     result["champion"]["log_loss"], result["version"])
        failpoint("step.report.end")
        return RetrainOut(promoted=False, version=result.get("version"))
    latest = read_latest(settings.home)
    failpoint("report.checked")
    if latest is None or latest.seq < result["checkpoint_seq"]:
        raise ReleaseError(
            f"ranker version {result['version']} was promoted as checkpoint "
            f"{result['checkpoint_seq']}, but the live pointer is at "
            f"{latest.seq if latest else 'nothing'}: the ranker pointer went backwards")
    if result.get("already_live"):
        log.info("ranker version %s is live (checkpoint %d): %s", result["version"],
                 result["checkpoint_seq"], result["reason"])
    else:
        log.info("promoted ranker version %s: held-out log-loss %.4f (champion %.4f), "
                 "checkpoint %d at offset %d", result["version"],
                 result["candidate"]["log_loss"], result["champion"]["log_loss"],
                 result["checkpoint_seq"], result["offset"])
    failpoint("step.report.end")
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
