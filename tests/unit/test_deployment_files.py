"""The deployment files of infra/scaled/ that no container runs here (no Docker on the development
machines): what can be checked without one is checked. Every YAML document parses; every
``AIRFLOW__SECTION__KEY`` they set is an option of the installed Airflow; every
``INSTANTREC_*`` variable they set (or leave commented for the operator to turn on) is a
setting of ``serving.settings.Settings``, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

SCALED = Path(__file__).resolve().parents[2] / "infra" / "scaled"
FILES = ("airflow.env", "docker-compose.yaml", "k8s-serving.yaml")
# the variables that are not settings: image tags and the like, read by compose itself
NOT_SETTINGS = {"INSTANTREC_IMAGE_TAG"}


def _names(pattern: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name in FILES:
        for match in re.finditer(pattern, (SCALED / name).read_text()):
            found.setdefault(match.group(0), set()).add(name)
    return found


@pytest.mark.parametrize("name", ["docker-compose.yaml", "k8s-serving.yaml"])
def test_the_yaml_parses(name):
    documents = [d for d in yaml.safe_load_all((SCALED / name).read_text()) if d is not None]
    assert documents, name


def test_every_instantrec_variable_is_a_setting():
    from serving.settings import Settings

    fields = {f"INSTANTREC_{f.upper()}" for f in Settings.model_fields}
    used = _names(r"\bINSTANTREC_[A-Z0-9_]+")
    assert used, "no INSTANTREC_ variables found: the files moved?"
    unknown = {v: sorted(where) for v, where in used.items()
               if v not in fields and v not in NOT_SETTINGS}
    assert not unknown, f"not settings of serving.settings.Settings: {unknown}"


def test_every_airflow_option_exists():
    from airflow.configuration import conf

    described = conf.configuration_description  # Airflow's own options and its providers'
    used = _names(r"\bAIRFLOW__[A-Z0-9_]+__[A-Z0-9_]+")
    assert used
    unknown = {}
    for variable, where in used.items():
        section, key = variable.removeprefix("AIRFLOW__").lower().split("__", 1)
        options = described.get(section, {}).get("options", {})
        # ``<key>_CMD`` / ``<key>_SECRET``: the same option read from a command or a secret
        if not any(k in options for k in (key, key.removesuffix("_cmd"),
                                          key.removesuffix("_secret"))):
            unknown[variable] = sorted(where)
    assert not unknown, f"not options of the installed Airflow: {unknown}"
