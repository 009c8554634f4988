"""``instantrec serve`` as a child process on loopback, started and stopped by PID.

Also the loopback helpers every test server uses (:func:`free_port`, :func:`die_with_parent`).
Used by ``instantrec bench http`` and the service's tests: the server runs exactly as an
operator starts it (the console script, its own process), bound to 127.0.0.1 on a free port,
and is stopped with SIGTERM (then SIGKILL) by its PID, never left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from serving.errors import InstantrecError

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the parent dies without stopping it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ServiceProcess:
    """One ``instantrec serve`` on 127.0.0.1:``port`` for ``home``; output in ``log_path``."""

    def __init__(self, home: Path, log_path: Path, port: int | None = None,
                 env: dict[str, str] | None = None, server: str = "uvicorn") -> None:
        self.home = Path(home)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.env = env or {}
        self.server = server
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise InstantrecError("the service is not running")
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def start(self, wait_ready: bool = True) -> ServiceProcess:
        cmd = [sys.executable, "-m", "pipelines.cli", "--home", str(self.home), "serve",
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.server != "uvicorn":
            cmd += ["--server", self.server]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
                                         preexec_fn=die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InstantrecError(f"instantrec serve exited with {self.proc.returncode}:\n"
                                      f"{self.output()}")
            try:
                status, _ = self.get("/readyz" if wait_ready else "/healthz", timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise InstantrecError(f"instantrec serve was not ready within {START_TIMEOUT_S:.0f} s:\n"
                              f"{self.output()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
