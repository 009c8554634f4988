"""A real ``redis-server`` on loopback for tests: durable (AOF, fsync always), private dir.

``redis-server`` is a system package (``make system-deps`` installs it); its absence fails the
tests that need it, loudly, and never skips them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipelines.service import die_with_parent, free_port

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def _binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not installed, and the Redis backend tests need a real one: "
                    "run `make system-deps` (as root: apt-get install -y redis-server)",
                    pytrace=False)
    return path


def _ping(port: int) -> bool:
    """True once the server answers PING with PONG (not while it is still loading the AOF)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port`` keeping its data in ``directory``."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.directory / "redis-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def start(self) -> str:
        cmd = [_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
               "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--logfile", ""]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ping(self.port):
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with code {self.proc.returncode} on port "
                            f"{self.port}; its output:\n{self._output()}", pytrace=False)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not answer PING on port {self.port} within "
                            f"{START_TIMEOUT_S:.0f} s; its output:\n{self._output()}",
                            pytrace=False)
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM (Redis flushes the AOF and exits), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def restart(self) -> str:
        self.stop()
        return self.start()


@contextmanager
def running_redis(directory: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit."""
    server = RedisServer(directory, port)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def redis_server(tmp_path: Path, port: int | None = None) -> Iterator[str]:
    """Start ``redis-server`` on 127.0.0.1 (a free port unless given) with its data in
    ``tmp_path``; yields its URL ``redis://127.0.0.1:<port>/0`` and stops it on exit."""
    with running_redis(tmp_path, port) as server:
        yield server.url
