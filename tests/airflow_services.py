"""Airflow for the integration tests, as operators run it (see :mod:`pipelines.airflow_services`
for the process and REST API handling they share with ``instantrec bench scaled``).

:class:`AirflowServices` is the embedded set-up: ``infra/local/airflow.sh`` starts the
api-server, the scheduler (LocalExecutor, ``--skip-serve-logs``) and the dag-processor on
127.0.0.1 with a private ``AIRFLOW_HOME`` (SQLite metadata) and ``INSTANTREC_HOME``.
:class:`ScaledAirflowServices` is the scaled-out one of ``infra/scaled/loopback.sh``.

Processes are stopped by their recorded PIDs; ``listening()`` reports every socket their
process trees listen on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.airflow_services import REPO, AirflowProcesses, LoopbackAirflow
from pipelines.service import free_port

SCRIPT = REPO / "infra" / "local" / "airflow.sh"
COMPONENTS = ("api-server", "scheduler", "dag-processor")


class AirflowServices(AirflowProcesses):
    """Airflow components of one private embedded installation under ``root``."""

    script = SCRIPT
    components = COMPONENTS

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.instantrec_home = self.root / "home"
        airflow_home = self.root / "airflow"
        port = port or free_port()
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW_BIN": str(Path(sys.executable).parent / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "INSTANTREC_HOME": str(self.instantrec_home),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        for key in ("INSTANTREC_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
            env.pop(key, None)  # the private home's embedded registry, not the caller's
        super().__init__(airflow_home, airflow_home / "run", port, env)


ScaledAirflowServices = LoopbackAirflow


@contextmanager
def airflow_services(root: Path) -> Iterator[AirflowServices]:
    """Started :class:`AirflowServices` under ``root``, stopped by PID on exit."""
    services = AirflowServices(root)
    try:
        services.start()
        yield services
    finally:
        left = services.stop(timeout=180)
        assert not left, f"Airflow processes still alive after stop: {left}"


@contextmanager
def scaled_airflow_services(root: Path, workers: int = 2, extra_env: dict[str, str] | None = None,
                            ) -> Iterator[ScaledAirflowServices]:
    """Started :class:`ScaledAirflowServices` under ``root``, stopped by PID on exit."""
    services = ScaledAirflowServices(root, workers, extra_env)
    try:
        services.start()
        yield services
    finally:
        left = services.stop()
        assert not left, f"processes still alive after stop: {left}"
