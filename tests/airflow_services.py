"""The embedded Airflow for tests, as operators run it: ``infra/local/airflow.sh`` starts the
api-server, the scheduler (LocalExecutor, ``--skip-serve-logs``) and the dag-processor on
127.0.0.1 with a private ``AIRFLOW_HOME`` (SQLite metadata) and ``INSTANTREC_HOME``.

Processes are stopped by their recorded PIDs (the script's ``stop``, then SIGKILL to each
process group that is left); :meth:`AirflowServices.listening` reports every socket their
process trees listen on. Talks to the REST API as the generated ``admin`` user.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from pipelines.service import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "local" / "airflow.sh"
COMPONENTS = ("api-server", "scheduler", "dag-processor")


class AirflowServices:
    """Airflow components of one private installation under ``root``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.airflow_home = self.root / "airflow"
        self.instantrec_home = self.root / "home"
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.run_dir = self.airflow_home / "run"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW_BIN": str(Path(sys.executable).parent / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            "INSTANTREC_HOME": str(self.instantrec_home),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        for key in ("INSTANTREC_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
            self.env.pop(key, None)  # the private home's embedded registry, not the caller's
        self._token: str | None = None

    # --- processes -------------------------------------------------------------------------
    def _script(self, command: str, timeout: float) -> str:
        out = subprocess.run(["bash", str(SCRIPT), command], env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"airflow.sh {command} exited {out.returncode}:\n{out.stdout}\n"
                               f"{out.stderr}\n{self.output_tail()}")
        return out.stdout

    def start(self) -> None:
        self._script("start", timeout=300)

    def pids(self) -> dict[str, int]:
        """The recorded PID of each component (each leads its own process group)."""
        pids = {}
        for name in COMPONENTS:
            path = self.run_dir / f"{name}.pid"
            if path.is_file():
                pids[name] = int(path.read_text().strip())
        return pids

    def processes(self) -> list[psutil.Process]:
        """Every live process in the components' process groups."""
        groups = set(self.pids().values())
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups:
                    found.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def listening(self) -> set[tuple[str, int, str]]:
        """(address, port, process name) of every TCP socket the components listen on."""
        sockets = set()
        for proc in self.processes():
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        sockets.add((conn.laddr.ip, conn.laddr.port, proc.name()))
            except psutil.Error:
                continue
        return sockets

    def stop(self) -> list[int]:
        """Stop every component by PID; returns the PIDs of processes still alive (none)."""
        leaders = list(self.pids().values())
        try:
            self._script("stop", timeout=180)
        finally:
            for pgid in leaders:  # whatever the script left behind, by process group
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while True:
            alive = [p for p in leaders if psutil.pid_exists(p)
                     and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def output_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in COMPONENTS:
            path = self.run_dir / f"{name}.log"
            if path.is_file():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # --- REST API --------------------------------------------------------------------------
    def token(self) -> str:
        if self._token is None:
            passwords = self.airflow_home / "simple_auth_manager_passwords.json.generated"
            password = json.loads(passwords.read_text())["admin"]
            body = self._request("POST", "/auth/token",
                                 {"username": "admin", "password": password}, auth=False)
            self._token = body["access_token"]
        return self._token

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True,
                 accept: str = "application/json") -> Any:
        headers = {"Accept": accept}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:2000]!r}") from exc

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """JSON of ``method`` on ``/api/v2`` + ``path``."""
        return self._request(method, "/api/v2" + path, body)

    @staticmethod
    def quote(run_id: str) -> str:
        return urllib.parse.quote(run_id, safe="")

    def wait_for(self, what: str, check, timeout: float, every: float = 2.0) -> Any:
        """Poll ``check()`` until it returns something truthy; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                     f"{self.output_tail()}")
            time.sleep(every)


@contextmanager
def airflow_services(root: Path) -> Iterator[AirflowServices]:
    """Started :class:`AirflowServices` under ``root``, stopped by PID on exit."""
    services = AirflowServices(root)
    try:
        services.start()
        yield services
    finally:
        left = services.stop()
        assert not left, f"Airflow processes still alive after stop: {left}"


SCALED_SCRIPT = REPO / "infra" / "scaled" / "loopback.sh"


class ScaledAirflowServices(AirflowServices):
    """The scaled-out set-up of ``infra/scaled/loopback.sh`` under ``root``: a private Postgres
    cluster, Redis, the MLflow server and Airflow with the CeleryExecutor (api-server, scheduler,
    dag-processor, ``workers`` Celery workers), every socket on 127.0.0.1.

    ``root`` must be reachable by the ``postgres`` user when the tests run as root (the script
    runs Postgres as that user): every directory above ``root/loopback/run`` searchable by others.
    ``extra_env`` reaches every component (e.g. ``AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE``).
    """

    def __init__(self, root: Path, workers: int = 2, extra_env: dict[str, str] | None = None,
                 ) -> None:
        self.root = Path(root)
        self.loopback_dir = self.root / "loopback"
        self.airflow_home = self.loopback_dir / "airflow"
        self.run_dir = self.loopback_dir / "run"
        self.mlflow_artifacts = self.loopback_dir / "mlflow-artifacts"
        self.instantrec_home = self.root / "home"
        self.workers = workers
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(free_port())
        self.port, self.postgres_port, self.redis_port, self.mlflow_port = sorted(ports)
        self.base = f"http://127.0.0.1:{self.port}"
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        # Nothing of the caller's Airflow, instantrec or MLflow settings: the script sets them.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("AIRFLOW", "INSTANTREC_", "MLFLOW_", "CELERY"))}
        self.env = {
            **inherited,
            "INSTANTREC_LOOPBACK_DIR": str(self.loopback_dir),
            "INSTANTREC_HOME": str(self.instantrec_home),
            "VENV_BIN": str(Path(sys.executable).parent),
            "AIRFLOW_PORT": str(self.port),
            "POSTGRES_PORT": str(self.postgres_port),
            "REDIS_PORT": str(self.redis_port),
            "MLFLOW_PORT": str(self.mlflow_port),
            "CELERY_WORKERS": str(workers),
            **(extra_env or {}),
        }
        self._token = None
        self.start_seconds: float | None = None

    @property
    def components(self) -> tuple[str, ...]:
        return ("postgres", "redis", "mlflow", "api-server", "scheduler", "dag-processor",
                *(f"worker-{i}" for i in range(1, self.workers + 1)))

    def _script(self, command: str, timeout: float) -> str:
        out = subprocess.run(["bash", str(SCALED_SCRIPT), command], env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"loopback.sh {command} exited {out.returncode}:\n{out.stdout}\n"
                               f"{out.stderr}\n{self.output_tail()}")
        return out.stdout

    def start(self) -> None:
        began = time.monotonic()
        self._script("start", timeout=420)
        self.start_seconds = time.monotonic() - began

    def pids(self) -> dict[str, int]:
        pids = {}
        for name in self.components:
            path = self.run_dir / f"{name}.pid"
            if path.is_file():
                pids[name] = int(path.read_text().strip())
        return pids

    def worker_hostnames(self) -> set[str]:
        """What each worker reports as a task instance's ``hostname`` (its --celery-hostname)."""
        return {f"worker-{i}@{os.uname().nodename}" for i in range(1, self.workers + 1)}

    def output_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in self.components:
            path = self.run_dir / f"{name}.log"
            if path.is_file():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


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
