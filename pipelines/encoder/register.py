"""Registering a fine-tuned encoder in MLflow and promoting it (alias ``champion`` and the pointer
file ``<home>/encoders/CHAMPION``)."""

import logging
from typing import Any

from pipelines.encoder.heldout import gate
from pipelines.encoder.train import POINTER
from pipelines.offline.metrics import MIN_NDCG_GAIN
from serving.layout import encoders_dir
from serving.manifest import write_json_atomic
from serving.settings import Settings

log = logging.getLogger(__name__)


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
