"""Airflow as operators run it, as child processes on 127.0.0.1, started and stopped by PID.

:class:`AirflowProcesses` is what every set-up shares: a start script under ``infra/``
(``start``/``stop``, one PID file and one output file per component in ``run_dir``), the REST
API as the generated ``admin`` user, and polling. :class:`LoopbackAirflow` is the scaled-out
set-up of ``infra/scaled/loopback.sh`` (a private Postgres, Redis, the MLflow server, Airflow
with the CeleryExecutor). ``instantrec bench scaled`` and the integration tests use them; the
tests add the embedded set-up (``infra/local/airflow.sh``).

Processes are stopped by their recorded PIDs: the script's ``stop``, then SIGKILL to each
process group that is left.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipelines.service import free_port
from serving.errors import InstantrecError

REPO = Path(__file__).resolve().parents[1]
LOOPBACK_SCRIPT = REPO / "infra" / "scaled" / "loopback.sh"

T = TypeVar("T")


class AirflowProcesses:
    """Components started by ``script`` (PID files and outputs in ``run_dir``), its REST API at
    ``base`` with the admin password under ``airflow_home``. ``env`` is the script's whole
    environment. ``start_seconds`` and ``stop_seconds`` are how long the last ``start`` and
    ``stop`` took (wall clock), ``stop_output`` what the script's ``stop`` printed."""

    script: Path
    components: tuple[str, ...]

    def __init__(self, airflow_home: Path, run_dir: Path, port: int, env: dict[str, str]) -> None:
        self.airflow_home = Path(airflow_home)
        self.run_dir = Path(run_dir)
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.env = env
        self._token: str | None = None
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self.stop_output = ""  # the script's report of the last stop

    # --- processes -------------------------------------------------------------------------
    def _script(self, command: str, timeout: float) -> str:
        out = subprocess.run(["bash", str(self.script), command], env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise InstantrecError(f"{self.script.name} {command} exited {out.returncode}:\n"
                                  f"{out.stdout}\n{out.stderr}\n{self.output_tail()}")
        return out.stdout

    def start(self, timeout: float = 420.0) -> None:
        began = time.monotonic()
        self._script("start", timeout=timeout)
        self.start_seconds = time.monotonic() - began

    def pids(self) -> dict[str, int]:
        """The recorded PID of each component (each leads its own process group)."""
        pids = {}
        for name in self.components:
            path = self.run_dir / f"{name}.pid"
            if path.is_file():
                pids[name] = int(path.read_text().strip())
        return pids

    def stop(self, timeout: float = 420.0) -> list[int]:
        """Stop every component by PID; returns the PIDs of processes still alive (none)."""
        began = time.monotonic()
        leaders = list(self.pids().values())
        try:
            self.stop_output = self._script("stop", timeout=timeout)
        finally:
            for pgid in leaders:  # whatever the script left behind, by process group
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while True:
            alive = [p for p in leaders if _running(p)]
            if not alive or time.monotonic() > deadline:
                self.stop_seconds = time.monotonic() - began
                return alive
            time.sleep(0.2)

    def processes(self) -> list[Any]:
        """Every live process (``psutil.Process``) in the components' process groups."""
        import psutil  # Airflow's own dependency

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
        import psutil

        sockets = set()
        for proc in self.processes():
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        sockets.add((conn.laddr.ip, conn.laddr.port, proc.name()))
            except psutil.Error:
                continue
        return sockets

    def output_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in self.components:
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

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Accept": "application/json"}
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
            raise InstantrecError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:2000]!r}"
                                  ) from exc

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """JSON of ``method`` on ``/api/v2`` + ``path``."""
        return self._request(method, "/api/v2" + path, body)

    @staticmethod
    def quote(run_id: str) -> str:
        return urllib.parse.quote(run_id, safe="")

    def wait_for(self, what: str, check: Callable[[], T], timeout: float,
                 every: float = 2.0) -> T:
        """Poll ``check()`` until it returns something truthy; raise after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise InstantrecError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                      f"{self.output_tail()}")
            time.sleep(every)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process, not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class LoopbackAirflow(AirflowProcesses):
    """The scaled-out set-up of ``infra/scaled/loopback.sh`` under ``root``: a private Postgres
    cluster, Redis, the MLflow server and Airflow with the CeleryExecutor (api-server, scheduler,
    dag-processor, ``workers`` Celery workers), every socket on 127.0.0.1, on free ports.
    ``INSTANTREC_HOME`` is ``root/home``.

    ``root`` must be reachable by the ``postgres`` user when this runs as root (the script runs
    Postgres as that user): every directory above ``root/loopback/run`` searchable by others,
    which mktemp's 0700 directories are not. ``extra_env`` reaches every component (e.g.
    ``AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE``).
    """

    script = LOOPBACK_SCRIPT

    def __init__(self, root: Path, workers: int = 2, extra_env: dict[str, str] | None = None,
                 ) -> None:
        self.root = Path(root)
        self.loopback_dir = self.root / "loopback"
        self.mlflow_artifacts = self.loopback_dir / "mlflow-artifacts"
        self.instantrec_home = self.root / "home"
        self.workers = workers
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(free_port())
        port, self.postgres_port, self.redis_port, self.mlflow_port = sorted(ports)
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        # Nothing of the caller's Airflow, instantrec or MLflow settings: the script sets them.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("AIRFLOW", "INSTANTREC_", "MLFLOW_", "CELERY"))}
        env = {
            **inherited,
            "INSTANTREC_LOOPBACK_DIR": str(self.loopback_dir),
            "INSTANTREC_HOME": str(self.instantrec_home),
            "VENV_BIN": str(Path(sys.executable).parent),
            "AIRFLOW_PORT": str(port),
            "POSTGRES_PORT": str(self.postgres_port),
            "REDIS_PORT": str(self.redis_port),
            "MLFLOW_PORT": str(self.mlflow_port),
            "CELERY_WORKERS": str(workers),
            **(extra_env or {}),
        }
        super().__init__(self.loopback_dir / "airflow", self.loopback_dir / "run", port, env)
        self.components = ("postgres", "redis", "mlflow", "api-server", "scheduler",
                           "dag-processor", *(f"worker-{i}" for i in range(1, workers + 1)))

    def worker_hostnames(self) -> set[str]:
        """What each worker reports as a task instance's ``hostname`` (its --celery-hostname)."""
        return {f"worker-{i}@{os.uname().nodename}" for i in range(1, self.workers + 1)}
