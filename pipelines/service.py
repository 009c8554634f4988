"""``instantrec serve``, ``instantrec nearline`` and ``redis-server`` as child processes on
loopback, started and stopped by PID.

Also the loopback helpers every test server uses (:func:`free_port`, :func:`die_with_parent`).
Used by ``instantrec bench http``, ``bench replicas`` and the service's tests: each process runs
exactly as an operator starts it (the console script, its own process), bound to 127.0.0.1 on
a free port, and is stopped with SIGTERM (then SIGKILL) by its PID, never left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

from serving.errors import InstantrecError

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
REDIS_START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the parent dies without stopping it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _Child:
    """A child process of ours (``proc``), its output in ``log_path``, stopped by PID."""

    what = "the process"          # for the error of :attr:`pid` when it is not running
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise InstantrecError(f"{self.what} is not running")
        return self.proc.pid

    def output(self) -> str:
        return _tail(self.log_path)

    def stop(self) -> None:
        _stop(self.proc)


class ServiceProcess(_Child):
    """One ``instantrec serve`` on 127.0.0.1:``port`` for ``home``; output in ``log_path``."""

    what = "the service"

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

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def start(self, wait_ready: bool = True) -> ServiceProcess:
        return self.spawn().wait(wait_ready)

    def spawn(self) -> ServiceProcess:
        """Start the process without waiting for it (several then load at once: :meth:`wait`)."""
        cmd = [sys.executable, "-m", "pipelines.cli", "--home", str(self.home), "serve",
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.server != "uvicorn":
            cmd += ["--server", self.server]
        self.proc = _spawn(cmd, self.log_path, self.env)
        return self

    def wait(self, wait_ready: bool = True) -> ServiceProcess:
        """Wait until the spawned server answers ``/readyz`` (``/healthz`` without
        ``wait_ready``) with 200; stops it and raises InstantrecError if it exits or is not
        ready within START_TIMEOUT_S."""
        assert self.proc is not None, "spawn() first"
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

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
           ) -> subprocess.Popen[bytes]:
    """``cmd`` as a child that dies with this process, its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                preexec_fn=die_with_parent if sys.platform == "linux" else None)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop ``proc`` by its PID: SIGTERM, then SIGKILL after STOP_TIMEOUT_S; reaps it."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class NearlineProcess(_Child):
    """One ``instantrec nearline`` (the updater, following the log until stopped) for
    ``home``, configured by ``env`` (e.g. a Redis log and its consumer group); output in
    ``log_path``. It opens no socket but its Redis client's."""

    what = "the nearline updater"

    def __init__(self, home: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.home = Path(home)
        self.log_path = Path(log_path)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> NearlineProcess:
        self.proc = _spawn([sys.executable, "-m", "pipelines.cli", "--home", str(self.home),
                            "nearline"], self.log_path, self.env)
        return self

    def check_alive(self) -> None:
        """Raise InstantrecError, with its output, if the updater has exited."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise InstantrecError(f"instantrec nearline exited with {code}:\n{self.output()}")


def _redis_ping(port: int) -> bool:
    """True once the server answers PING with PONG (not while it is still loading the AOF)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess(_Child):
    """One ``redis-server`` on 127.0.0.1:``port`` keeping its data (the append-only file) in
    ``directory``. ``appendfsync`` is the AOF's fsync policy: ``always`` (an acknowledged write
    is on disk, what the tests run) or ``everysec`` (up to a second of writes can be lost in a
    crash: Redis's recommended production setting)."""

    what = "redis-server"

    def __init__(self, directory: Path, port: int | None = None,
                 appendfsync: Literal["always", "everysec"] = "always") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.log_path = self.directory / "redis-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server and wait until it answers PING; returns its URL. Raises
        InstantrecError when redis-server is not installed, exits, or is not up within
        REDIS_START_TIMEOUT_S."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise InstantrecError("redis-server is not installed: run `make system-deps` (as "
                                  "root: apt-get install -y redis-server)")
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(self.port),
               "--dir", str(self.directory), "--appendonly", "yes",
               "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
               "--protected-mode", "yes", "--logfile", ""]
        self.proc = _spawn(cmd, self.log_path)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not _redis_ping(self.port):
            if self.proc.poll() is not None:
                raise InstantrecError(f"redis-server exited with code {self.proc.returncode} "
                                      f"on port {self.port}; its output:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise InstantrecError(f"redis-server did not answer PING on port {self.port} "
                                      f"within {REDIS_START_TIMEOUT_S:.0f} s; its output:\n"
                                      f"{self.output()}")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM (Redis flushes the AOF and exits), then SIGKILL."""
        proc, self.proc = self.proc, None
        _stop(proc)

    def restart(self) -> str:
        self.stop()
        return self.start()

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
