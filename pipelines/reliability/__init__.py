"""Fault-injection campaigns: crash, I/O-error, load and abuse probes with counted outcomes.

Each probe returns the same figures (``tried``, ``survived``, ``lost``, ``duplicated``,
``crashed``) and its own details. ``instantrec bench reliability`` runs them at full size;
the suite runs them small. The helpers here run a function in a forked child that a probe
kills (SIGKILL, or a failpoint of :mod:`serving.failpoints`) and stage copies of a release
to publish.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving import failpoints

EXIT_OK, EXIT_TYPED, EXIT_CRASH = 0, 3, 1


def fork_call(fn: Callable[[], Any], failpoint: str | None = None) -> int:
    """Run ``fn()`` in a forked child and return its pid. The child exits 0 when ``fn``
    returns, 3 on a typed :class:`~serving.errors.InstantrecError`, 1 on anything else (a
    crash, with its traceback on stderr); ``failpoint`` (``NAME:N[:enospc|eio]``) is armed in
    the child only. The parent must not have threads or have run torch before forking."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = EXIT_CRASH
    try:
        from serving.errors import InstantrecError

        if failpoint:
            os.environ[failpoints.ENV] = failpoint
        else:
            os.environ.pop(failpoints.ENV, None)
        failpoints.reset()
        try:
            fn()
            code = EXIT_OK
        except InstantrecError as exc:
            print(f"typed error: {exc}", file=sys.stderr)
            code = EXIT_TYPED
    except BaseException:  # noqa: BLE001 - the child reports any crash by its exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_exit(pid: int, timeout_s: float) -> int | None:
    """Wait for child ``pid``: its exit code (negative: killed by that signal), or None if it
    is still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def kill(pid: int) -> int:
    """SIGKILL child ``pid`` and reap it; returns its exit code."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def figures(tried: int, survived: int, lost: int = 0, duplicated: int = 0, crashed: int = 0,
            **details: Any) -> dict[str, Any]:
    """The figures every probe reports, then its own details."""
    return {"tried": tried, "survived": survived, "lost": lost, "duplicated": duplicated,
            "crashed": crashed, **details}


def stage_copy(releases_dir: Path, source_id: str, new_id: str, passed: bool = True) -> Path:
    """A staged, evaluated copy of published release ``source_id`` under the id ``new_id``:
    its files hard-linked (published files are immutable, so sharing them is safe; never
    write to one), a manifest and evaluation of its own. What a rebuild of the same catalogue
    under another id would stage."""
    from pipelines.catalogue.gate import EVALUATION_FILE
    from serving.manifest import MANIFEST_NAME, read_manifest, write_json_atomic, write_manifest

    source = releases_dir / source_id
    staged = releases_dir / ".staging" / new_id
    staged.mkdir(parents=True)
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if rel.name in (MANIFEST_NAME, EVALUATION_FILE):
            continue
        if path.is_dir():
            (staged / rel).mkdir(parents=True, exist_ok=True)
        else:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, staged / rel)
    manifest = read_manifest(source, verify_files=False)
    write_manifest(staged, manifest.model_copy(update={"release_id": new_id, "evaluation": None,
                                                       "gate": None}))
    write_json_atomic(staged / EVALUATION_FILE, {
        "release_id": new_id, "metrics": {}, "details": {},
        "gate": {"passed": passed, "failures": [] if passed else ["probe: gate failed"]}})
    return staged
