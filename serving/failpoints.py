"""Named points at which a crash test may kill this process, deterministically.

``INSTANTREC_FAILPOINT=NAME:N`` makes the N-th pass through the point ``NAME`` (default 1)
SIGKILL the process on the spot, as a power cut or the OOM killer would: no cleanup, no
flush. Unset (as always outside such tests), a point costs one dictionary look-up.

Points: ``nearline.applied`` (the updater has applied an event, before any checkpoint),
``checkpoint.written`` (a checkpoint file is complete, the pointer not yet moved),
``checkpoint.published`` (the pointer has moved, older files not yet cleaned up).
"""

from __future__ import annotations

import os
import signal

ENV = "INSTANTREC_FAILPOINT"
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Pass through the point ``name``: kill this process here if the environment says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
