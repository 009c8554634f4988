"""What the three DAGs share, importable at parse time (nothing heavy is imported here)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.settings import Settings

OWNER = "instantrec"


def task_settings() -> Settings:
    """The settings a task runs with: ``INSTANTREC_*`` of the worker's environment."""
    from serving.settings import load_settings

    return load_settings()


def log_failure(context: dict[str, Any]) -> None:
    """on_failure_callback: one line in the task log naming what failed and why."""
    ti = context["ti"]
    logging.getLogger("instantrec.dags").error(
        "TASK FAILED dag=%s task=%s map_index=%s run_id=%s try=%s: %r", ti.dag_id, ti.task_id,
        ti.map_index, ti.run_id, ti.try_number, context.get("exception"))


def default_args(retries: int, retry_delay: timedelta) -> dict[str, Any]:
    """Every task's defaults: the owner, Airflow's retries and :func:`log_failure`."""
    return {"owner": OWNER, "retries": retries, "retry_delay": retry_delay,
            "on_failure_callback": log_failure}
