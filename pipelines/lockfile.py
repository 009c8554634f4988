"""Process locks on files: an exclusive ``flock`` with its holder written inside.

The kernel drops a ``flock`` when its process dies, however it dies, so a killed process
never leaves a stale lock behind; the holder's line (pid, host, start time, command) lets
whoever is refused say who holds it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from serving.errors import ReleaseError


def try_lock(path: Path) -> tuple[int | None, str]:
    """Take the lock at ``path`` without waiting: ``(descriptor, "")`` (closing the
    descriptor releases it), or ``(None, holder)`` when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's line stays
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        return None, holder
    argv = sys.orig_argv  # with the interpreter's own options: `python -m pipelines.cli ...`
    command = " ".join([os.path.basename(argv[0]), *argv[1:]]) if argv else "?"
    line = (f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{datetime.now(UTC).isoformat(timespec='seconds')}: {command[:300]}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, " ".join(line.split()).encode(errors="replace") + b"\n", 0)
    return fd, ""


def unlock(fd: int) -> None:
    """Release a lock taken by :func:`try_lock`, clearing the holder's line first."""
    os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor drops the flock


_held: dict[str, FileLock] = {}


@contextmanager
def waiting_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold a blocking ``flock`` at ``path``, waiting up to ``timeout_s`` (re-entrant within a
    process: one lock object per path). Past the wait, a :class:`ReleaseError` saying that
    ``what`` (e.g. "the publish lock") was held that long by another process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _held.setdefault(str(path), FileLock(str(path), timeout=timeout_s))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout as exc:
        raise ReleaseError(f"{what} {path} was held for more than {timeout_s:.0f} s by another "
                           "process") from exc
    try:
        yield
    finally:
        lock.release()
