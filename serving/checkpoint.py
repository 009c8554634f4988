"""Ranker checkpoints on disk, tied to the release they were trained against.

Layout under ``<home>/rankers``::

    LATEST                          {"release_id", "file", "offset", "seq"}
    <release_id>/ckpt-<offset>.npz  parameters + AdaGrad state + updater metadata

A checkpoint records the last event-log offset it has applied (``meta.offset``), so a
restarted updater continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from serving.errors import ReleaseError, short_repr
from serving.failpoints import failpoint
from serving.layout import rankers_dir
from serving.manifest import write_json_atomic
from serving.ranker import Ranker
from serving.release import check_pointer_name

log = logging.getLogger(__name__)

LATEST = "LATEST"
KEEP = 5


@dataclass(frozen=True)
class CheckpointRef:
    release_id: str
    file: str
    offset: int
    seq: int


def read_latest(home: Path) -> CheckpointRef | None:
    path = rankers_dir(home) / LATEST
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        ref = CheckpointRef(str(raw["release_id"]), str(raw["file"]), int(raw["offset"]),
                            int(raw["seq"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"ranker pointer {path} is corrupt: {exc}") from exc
    # the file is <release_id>/<plain name>: nothing outside the release's folder is loaded
    check_pointer_name(ref.release_id, path)
    folder, _, name = ref.file.partition("/")
    if folder != ref.release_id:
        raise ReleaseError(f"ranker pointer {path} names file {short_repr(ref.file)}, which is "
                           f"not inside the folder of its release {ref.release_id}: refused")
    check_pointer_name(name, path, "checkpoint file")
    return ref


def load_latest(home: Path) -> tuple[CheckpointRef, Ranker] | None:
    ref = read_latest(home)
    if ref is None:
        return None
    return ref, Ranker.load(rankers_dir(home) / ref.file)


def load_usable(home: Path, release_id: str,
                ) -> tuple[CheckpointRef | None, Ranker | None, list[str]]:
    """The newest readable checkpoint trained for ``release_id``: the one LATEST names, or,
    when that cannot be read (truncated, corrupt), the newest older file of the release that
    can. Returns its reference (a fallback keeps LATEST's sequence number, so a reader does
    not retry the same broken file until a newer one is published), the ranker, and what was
    skipped and why. ``(None, None, problems)`` when no checkpoint for the release reads."""
    problems: list[str] = []
    try:
        ref = read_latest(home)
    except ReleaseError as exc:
        problems.append(str(exc))
        ref = None
    if ref is not None and ref.release_id != release_id:
        return None, None, problems
    if ref is not None:
        try:
            return ref, Ranker.load(rankers_dir(home) / ref.file), problems
        except ReleaseError as exc:
            problems.append(str(exc))
    broken = rankers_dir(home) / ref.file if ref is not None else None
    for path in sorted((rankers_dir(home) / release_id).glob("ckpt-*.npz"), reverse=True):
        if path == broken:
            continue
        try:
            ranker = Ranker.load(path)
        except ReleaseError as exc:
            problems.append(str(exc))
            continue
        if ranker.release_id == release_id:
            return (CheckpointRef(release_id, f"{release_id}/{path.name}", ranker.meta.offset,
                                  ref.seq if ref is not None else 0), ranker, problems)
    return None, None, problems


def publish_checkpoint(home: Path, ranker: Ranker, offset: int) -> CheckpointRef:
    """Write ``ranker`` (having applied every event up to ``offset``) and move LATEST to it.

    The checkpoint file is complete and renamed into place before the pointer moves, so a
    kill at any instant leaves either the old or the new checkpoint live, never a torn one.
    """
    folder = rankers_dir(home) / ranker.release_id
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{offset:012d}.npz"
    ranker.meta.offset = offset
    ranker.save(folder / name)
    failpoint("checkpoint.written")
    # The nearline updater and the batch retrain both publish: the lock makes every
    # sequence number unique, so a reader can tell whose checkpoint is live.
    with FileLock(str(rankers_dir(home) / ".latest.lock"), timeout=60):
        previous = read_latest(home)
        ref = CheckpointRef(ranker.release_id, f"{ranker.release_id}/{name}", offset,
                            (previous.seq + 1) if previous else 1)
        write_json_atomic(rankers_dir(home) / LATEST, ref.__dict__)
    failpoint("checkpoint.published")
    for old in sorted(folder.glob("ckpt-*.npz"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return ref
