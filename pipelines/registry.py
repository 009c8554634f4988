"""MLflow: log a release's evaluation run and register it as a pyfunc model version.

The alias ``champion`` moves only when the release passed its gate and is the live one, so
``mlflow.pyfunc.load_model("models:/instantrec@champion")`` always serves a release that did,
and the one shops are served. Registering and moving aliases hold :func:`registry_lock`.

Every pyfunc the pipelines register (the release here, the ranker in ``retrain``, the encoder
in ``finetune``) goes through :func:`log_pyfunc`: it is logged as models from code
(``pipelines/pyfunc_models.py``) with the ``serving`` package as its ``code_paths`` and the
pinned requirements :func:`pyfunc_requirements` derives from the installed ``instantrec``
distribution, so it loads in a fresh environment built from its own ``requirements.txt``,
without this repository or an ``instantrec`` install.
"""

from __future__ import annotations

import ast
import functools
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any, Literal

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import serving
from pipelines.lockfile import waiting_lock
from serving import layout
from serving.failpoints import failpoint
from serving.manifest import Manifest, read_manifest
from serving.release import read_pointer
from serving.schema import ITEM_ID
from serving.settings import Settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
# One experiment per kind of model, all in the same store.
EXPERIMENTS = {"release": "instantrec-catalogue", "ranker": "instantrec-ranker",
               "encoder": "instantrec-encoder"}
EXPERIMENT = EXPERIMENTS["release"]
DISTRIBUTION = "instantrec"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_models.py")
SERVING_DIR = Path(serving.__file__).parent
PIPELINES_DIR = Path(__file__).parent
# What pipelines/pyfunc_models.py itself imports beside serving's requirements.
PYFUNC_WRAPPER = ("mlflow", "pandas")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "query"), ColSpec("long", "k", required=False)]),
    outputs=Schema([ColSpec("long", "request"), ColSpec("string", "query"),
                    ColSpec("long", "rank"), ColSpec("string", ITEM_ID),
                    ColSpec("string", "title"), ColSpec("double", "score")]),
)
INPUT_EXAMPLE = pd.DataFrame({"query": ["cordless drill", "running shoes"], "k": [5, 3]})

MODEL_DESCRIPTION = """\
instantrec search recommendations: one version per published catalogue release.

A version is an MLflow pyfunc that carries its release bundle (Annoy index, item vectors, \
item table, BM25 index, manifest) and the `serving` code that answers queries with it. \
Input: a DataFrame with `query` (string) and optional `k` (results per query, default 10). \
Output: one row per result with `request` (input row), `query`, `rank` (from 1), `item_id`, \
`title`, `score`.

The alias `champion` names the newest release that passed its evaluation gate; a release \
that failed is registered for inspection but never becomes champion. Version tags carry the \
release id, catalogue size, encoder and revision, index recall and the gate's figures.

Load: `mlflow.pyfunc.load_model("models:/{name}@champion").predict(pd.DataFrame({{"query": \
["cordless drill"], "k": [5]}}))`, or `mlflow models predict -m models:/{name}@champion \
--env-manager local` in an environment built from the version's `requirements.txt` (its \
own code travels in `code/`; no instantrec install is needed). Shop applications `import \
serving` and follow the release pointer instead."""


@dataclass(frozen=True)
class RegisterResult:
    release_id: str
    run_id: str
    model_name: str
    version: int
    champion: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def use_store(settings: Settings) -> None:
    """Point MLflow's tracking and registry at the settings' store (its SQLite directory
    created); process environment is left as it is."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True,
                                                                          exist_ok=True)


def configure_mlflow(settings: Settings, experiment_name: str = EXPERIMENT) -> str:
    """Point MLflow at the settings' tracking/registry store; returns the id of
    ``experiment_name``, created with its artefacts beside the database by default."""
    use_store(settings)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not settings.mlflow_tracking_uri:  # embedded default: artefacts beside the database
        settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
        location = settings.mlflow_artifact_root.as_uri()
    return mlflow.create_experiment(experiment_name, artifact_location=location)


# -- one way to register a version and one to promote it ---------------------------------------


@dataclass(frozen=True)
class Registered:
    """A model version: the one just registered (or finished: created by an earlier attempt
    that died before tagging it), or (``reused``) the one an earlier attempt with the same key
    tags registered completely."""

    version: int
    run_id: str
    reused: bool


def find_version(client: mlflow.MlflowClient, name: str, tags: dict[str, str]) -> Any:
    """The version of ``name`` carrying all of ``tags`` (a retried task's), or None."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        return None
    where = " and ".join(f"tag.{k} = '{v}'" for k, v in tags.items())
    found = client.search_model_versions(filter_string=f"name = '{name}' and {where}")
    return found[0] if found else None


REGISTRY_LOCK = "registry.lock"   # under <home>/mlflow: one registering process at a time
LOCK_TIMEOUT_S = 1800.0


@contextmanager
def registry_lock(settings: Settings) -> Iterator[None]:
    """Hold the home's registry lock (``<home>/mlflow/registry.lock``, a blocking ``flock``;
    re-entrant within a process). Registering a version (look up, log, tag) and moving an
    alias happen under it: two processes registering the same key at once would each find
    nothing and register it twice, and alias moves are last-writer-wins. It serialises the
    processes that share the home's file system, not hosts with homes of their own that
    share one tracking server. The kernel drops it when its holder dies."""
    with waiting_lock(layout.mlflow_dir(settings.home) / REGISTRY_LOCK, LOCK_TIMEOUT_S,
                      "the model registry lock"):
        yield


def register_version(settings: Settings, kind: Literal["release", "ranker", "encoder"],
                     name: str, key_tags: dict[str, str], run_name: str,
                     log_run: Callable[[], ModelInfo],
                     version_tags: dict[str, str] | None = None,
                     description: Callable[[int], str] | None = None) -> Registered:
    """Register one version of ``name`` in ``kind``'s experiment, at most once per ``key_tags``.

    The version already registered with ``key_tags`` is reused (a retried task); otherwise a
    run named ``run_name`` and tagged with ``key_tags`` is started, ``log_run()`` logs into it
    (params, metrics, artefacts and the pyfunc, via :func:`log_pyfunc`, returning its
    ``ModelInfo``), and the new version is tagged with ``key_tags`` and ``version_tags`` and
    given ``description(version)``.

    Safe to retry after a kill at any instant, and to run in several processes at once (under
    :func:`registry_lock`): a version whose attempt died before tagging it is found by its
    run's tags and finished (tagged, described, its run marked finished); a run that died
    before registering anything is marked killed.
    """
    with registry_lock(settings):
        experiment_id = configure_mlflow(settings, EXPERIMENTS[kind])
        client = mlflow.MlflowClient()
        existing = find_version(client, name, key_tags)
        if existing is not None:
            log.info("reusing %s v%s registered for %s", name, existing.version, key_tags)
            return Registered(int(existing.version), str(existing.run_id), True)
        untagged = _untagged_version(client, experiment_id, name, key_tags)
        if untagged is not None:
            version, run_id = untagged
            log.info("finishing %s v%d, registered for %s by an attempt that died before "
                     "tagging it", name, version, key_tags)
        else:
            with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                  tags=key_tags) as run:
                info = log_run()
                run_id = run.info.run_id
                failpoint("registry.registered")
            version = int(info.registered_model_version)
        for key, value in {**key_tags, **(version_tags or {})}.items():
            client.set_model_version_tag(name, str(version), key, value)
        if description is not None:
            client.update_model_version(name, str(version), description=description(version))
        return Registered(version, run_id, False)


def _untagged_version(client: mlflow.MlflowClient, experiment_id: str, name: str,
                      key_tags: dict[str, str]) -> tuple[int, str] | None:
    """The version of ``name`` logged by a run tagged ``key_tags`` whose attempt died before
    tagging the version (that run is marked finished), or None; runs of ``key_tags`` still
    marked running without a version are marked killed (under the registry lock, no live
    process is logging them)."""
    where = " and ".join(f"tags.{k} = '{v}'" for k, v in key_tags.items())
    runs = client.search_runs([experiment_id], filter_string=where)
    found = None
    for run in runs:
        versions = client.search_model_versions(
            filter_string=f"name = '{name}' and run_id = '{run.info.run_id}'")
        if versions and found is None:
            found = (int(versions[0].version), run.info.run_id)
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "FINISHED")
        elif not versions and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
    return found


def promote_version(settings: Settings, name: str, version: int, alias: str = CHAMPION) -> None:
    """Move ``alias`` (``champion``) of ``name`` to ``version`` (under :func:`registry_lock`)."""
    with registry_lock(settings):
        use_store(settings)
        mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


# -- the pyfunc's environment -----------------------------------------------------------------


@functools.cache
def _providers() -> Mapping[str, list[str]]:
    """Top-level module -> the installed distributions that provide it. Reading every
    distribution's file list takes seconds, and the environment does not change under a
    running process: read once per process."""
    return packages_distributions()


def imported_distributions(package_dir: Path, module_level_only: bool = False) -> set[str]:
    """Canonical names of the installed distributions whose modules the ``.py`` files under
    ``package_dir`` import by absolute name: every import, or with ``module_level_only`` those
    run when the modules are imported (not those inside functions or ``if TYPE_CHECKING``)."""
    providers = _providers()
    modules: set[str] = set()
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body if module_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {canonicalize_name(d) for m in modules for d in providers.get(m, ())}


def pinned(name: str) -> str:
    """``name==<installed version>``, without a local label (``torch 2.13.0+cpu`` ->
    ``torch==2.13.0``: installable from PyPI, and the build index decides CPU or CUDA)."""
    return f"{name}=={Version(pkg_version(name)).public}"


def pyfunc_requirements(scope: Literal["serving", "import"] = "serving") -> list[str]:
    """Pinned pip requirements of a pyfunc whose code is ``serving/`` plus
    ``pipelines/pyfunc_models.py``, derived from the installed ``instantrec`` distribution.

    ``"serving"``: its base requirements except those only ``pipelines/`` imports (serving
    imports the rest, some lazily, or needs them without importing them by name, as
    ``onnxruntime.quantization`` needs ``onnx``). ``"import"``: only the ones serving's
    modules import when they are imported, for a model whose prediction needs no more (the
    ranker: numpy arithmetic). Both add ``mlflow`` and ``pandas`` (the pyfunc wrapper).
    """
    try:
        declared = [Requirement(r) for r in requires(DISTRIBUTION) or ()]
    except PackageNotFoundError as exc:
        raise PackageNotFoundError(
            f"the {DISTRIBUTION} distribution is not installed (pip install -e .): its "
            "requirements are the registered models' requirements") from exc
    base = [r for r in declared if r.marker is None or r.marker.evaluate({"extra": ""})]
    if scope == "serving":
        pipelines_only = (imported_distributions(PIPELINES_DIR)
                          - imported_distributions(SERVING_DIR))
        keep = [r.name for r in base if canonicalize_name(r.name) not in pipelines_only]
    else:
        needed = imported_distributions(SERVING_DIR, module_level_only=True)
        keep = [r.name for r in base if canonicalize_name(r.name) in needed]
    return [pinned(n) for n in (*keep, *PYFUNC_WRAPPER)]


def log_pyfunc(name: str, model: Literal["release", "ranker", "encoder"],
               artifacts: dict[str, str], signature: ModelSignature,
               registered_model_name: str, input_example: pd.DataFrame | None = None,
               scope: Literal["serving", "import"] = "serving") -> ModelInfo:
    """Log ``pipelines/pyfunc_models.py``'s ``model`` into the active run as artefact ``name``
    (models from code, ``serving/`` as code_paths, :func:`pyfunc_requirements` of ``scope``)
    and register it as a new version of ``registered_model_name``.

    With an ``input_example``, MLflow loads the model once and predicts it to check the
    example can be served (a failure is logged as a warning).
    """
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(PYFUNC_CODE), model_config={"model": model},
        code_paths=[str(SERVING_DIR)], artifacts=artifacts, signature=signature,
        input_example=input_example, pip_requirements=pyfunc_requirements(scope),
        registered_model_name=registered_model_name,
    )


# -- what a release version says about itself -----------------------------------------------


def metric_name(key: str) -> str:
    """An evaluation key as an MLflow metric/tag name (``judged_ndcg@10`` ->
    ``judged_ndcg_at_10``): MLflow allows letters, digits, ``_ - . : /`` and spaces only."""
    return re.sub(r"[^\w\-.:/ ]", "_", key.replace("@", "_at_"))


def release_metrics(manifest: Manifest) -> dict[str, float]:
    """The release's evaluation figures as MLflow metrics: index recall@10 and item count
    (from the manifest when it has no evaluation), golden and judged figures when the gate
    computed them, and ``gate_passed`` (1 or 0)."""
    evaluation = manifest.evaluation or {}
    metrics = {"index_recall_at_10": float(manifest.index.recall_at_10),
               "item_count": float(manifest.item_count)}
    metrics.update({metric_name(k): float(v) for k, v in evaluation.get("metrics", {}).items()
                    if v is not None})
    metrics["gate_passed"] = float(bool(manifest.gate and manifest.gate.get("passed")))
    return metrics


def release_tags(manifest: Manifest) -> dict[str, str]:
    """Model version tags: release id, catalogue size and digest, encoder and revision, index
    parameters and recall, whether it is a delta release, every evaluation metric and the
    gate's verdict, failures and thresholds."""
    gate = manifest.gate or {}
    tags = {"release_id": manifest.release_id, "item_count": str(manifest.item_count),
            "catalogue_digest": manifest.catalogue_digest,
            "encoder": manifest.encoder.name, "encoder_revision": manifest.encoder.revision,
            "encoder_dim": str(manifest.encoder.dim),
            "index_n_trees": str(manifest.index.n_trees),
            "index_search_k": str(manifest.index.search_k),
            "base_release": manifest.index.base_release or "none",
            "gate_passed": str(bool(gate.get("passed"))).lower(),
            "gate_failures": ("; ".join(gate.get("failures", ())) or "none") if gate
            else "not evaluated"}
    for key, value in release_metrics(manifest).items():
        if key not in ("item_count", "gate_passed"):
            tags[key] = f"{value:.4f}"
    for key, value in (gate.get("thresholds") or {}).items():
        tags[metric_name(f"gate_{key}")] = str(value)
    return tags


def release_description(manifest: Manifest, name: str, version: int) -> str:
    """The model version's description: what the release is and how to load it."""
    gate = manifest.gate or {}
    verdict = ("passed its gate" if gate.get("passed") else
               f"failed its gate ({'; '.join(gate.get('failures', ())) or 'not evaluated'})")
    figures = ", ".join(f"{k} {v:.4f}" for k, v in release_metrics(manifest).items()
                        if k not in ("item_count", "gate_passed"))
    kind = (f"a delta release on {manifest.index.base_release} "
            f"({manifest.index.delta_items} items searched exactly)"
            if manifest.index.base_release else "a full release")
    return (f"Release {manifest.release_id}: {manifest.item_count} items (catalogue "
            f"{manifest.catalogue_digest[:12]}), {kind}, encoder {manifest.encoder.name} rev "
            f"{manifest.encoder.revision} ({manifest.encoder.dim}-d), Annoy "
            f"{manifest.index.n_trees} trees / search_k {manifest.index.search_k}; {figures}; "
            f"{verdict}. Built {manifest.created_at}.\n\n"
            f"Load: `mlflow.pyfunc.load_model(\"models:/{name}/{version}\")`; predict a "
            "DataFrame with `query` and optional `k`; one row per result (request, query, rank, "
            "item_id, title, score). Environment: this version's requirements.txt.")


# -- registration -----------------------------------------------------------------------------


def register_release(release_dir: Path, settings: Settings) -> RegisterResult:
    """Log ``release_dir`` (a published bundle) to MLflow and register a model version, with
    the release's figures as run metrics and version tags, and descriptions.

    Idempotent per release: a release already registered is not registered again, but the
    alias still follows the gate. ``champion`` moves to a release that passed its gate only
    while it is the live one (the pointer of the releases directory it sits in names it, or
    that directory has no pointer): a run that registers its release after an overlapping
    run published a newer one must not move the alias back (alias moves are last-writer-wins;
    ``pipelines.steps.run_register`` holds the publish lock, so no publish moves the pointer
    between this check and the alias).
    """
    manifest = read_manifest(release_dir)
    name = settings.model_name
    gate = manifest.gate or {}

    def log_run() -> ModelInfo:
        artifacts = {"release": str(release_dir)}
        if manifest.encoder.path is not None:  # a fine-tuned encoder travels with its release
            artifacts["encoder"] = manifest.encoder.path
        mlflow.log_params({
            "release_id": manifest.release_id, "encoder": manifest.encoder.name,
            "encoder_revision": manifest.encoder.revision, "dim": manifest.encoder.dim,
            "n_trees": manifest.index.n_trees, "search_k": manifest.index.search_k,
            "index_seed": manifest.index.seed, "item_count": manifest.item_count,
            **{metric_name(f"gate_{k}"): v for k, v in (gate.get("thresholds") or {}).items()},
        })
        mlflow.log_metrics(release_metrics(manifest))
        mlflow.log_dict(manifest.model_dump(mode="json"), "manifest.json")
        mlflow.set_tags({"release_id": manifest.release_id,
                         "gate_passed": str(bool(gate.get("passed")))})
        return log_pyfunc("release", "release", artifacts, SIGNATURE, name,
                          input_example=INPUT_EXAMPLE)

    registered = register_version(
        settings, "release", name, {"release_id": manifest.release_id},
        f"release-{manifest.release_id}", log_run, version_tags=release_tags(manifest),
        description=lambda version: release_description(manifest, name, version))
    if not registered.reused:
        mlflow.MlflowClient().update_registered_model(
            name, description=MODEL_DESCRIPTION.format(name=name))
    pointer = read_pointer(release_dir.parent)
    live = pointer is None or pointer.release_id == manifest.release_id
    champion = bool(gate.get("passed")) and live
    if champion:
        promote_version(settings, name, registered.version)
    elif gate.get("passed"):
        log.warning("release %s passed its gate but is no longer live (%s is): %s stays where "
                    "it is", manifest.release_id, pointer.release_id if pointer else None,
                    CHAMPION)
    log.info("release %s registered as %s v%d%s", manifest.release_id, name,
             registered.version, " (champion)" if champion else "")
    return RegisterResult(manifest.release_id, registered.run_id, name, registered.version,
                          champion)
