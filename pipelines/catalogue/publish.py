"""Publishing: staged bundle -> immutable release directory -> pointer moved forward.

The manifest is rewritten (last) with the evaluation and gate verdict, the staging directory
is renamed into place atomically, and only then, and only if the gate passed, does the
pointer move. Pointer updates are serialised by a file lock and only ever move forward.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from pipelines.catalogue.gate import EVALUATION_FILE
from serving.errors import ReleaseError
from serving.manifest import read_manifest, write_manifest
from serving.release import Pointer, read_pointer, write_pointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    """``live``: the pointer names this release now; ``went_live``: this call moved it there
    (it was not live before), i.e. a new release is serving; ``generation``: the pointer's."""

    release_id: str
    path: str
    live: bool
    generation: int | None
    gate_passed: bool
    went_live: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def publish_release(bundle_dir: Path, releases_dir: Path) -> PublishResult:
    """Publish the evaluated bundle at ``bundle_dir`` (staged or already published).

    Idempotent: publishing the same release again changes nothing (and says
    ``went_live=False``).
    """
    manifest = read_manifest(bundle_dir)
    final = releases_dir / manifest.release_id
    if bundle_dir.resolve() != final.resolve():
        eval_path = bundle_dir / EVALUATION_FILE
        if not eval_path.is_file():
            raise ReleaseError(f"staged release {bundle_dir} has not been evaluated")
        evaluation = json.loads(eval_path.read_text())
        manifest = manifest.model_copy(update={"evaluation": evaluation,
                                               "gate": evaluation["gate"]})
        write_manifest(bundle_dir, manifest)  # last write into the bundle
        if final.exists():
            shutil.rmtree(bundle_dir)  # a concurrent or earlier run published it already
        else:
            _fsync_dir(bundle_dir)
            os.replace(bundle_dir, final)
            _fsync_dir(releases_dir)
        manifest = read_manifest(final)
    passed = bool(manifest.gate and manifest.gate.get("passed"))
    if not passed:
        log.warning("release %s failed its gate (%s); pointer not moved", manifest.release_id,
                    manifest.gate)
        current = read_pointer(releases_dir)
        return PublishResult(manifest.release_id, str(final), False,
                             current.generation if current else None, False, False)
    with FileLock(str(releases_dir / ".pointer.lock"), timeout=60):
        current = read_pointer(releases_dir)
        if current is not None and current.release_id == manifest.release_id:
            log.info("release %s is already live (generation %d)", manifest.release_id,
                     current.generation)
            return PublishResult(manifest.release_id, str(final), True, current.generation, True,
                                 False)
        generation = (current.generation if current else 0) + 1
        write_pointer(releases_dir, Pointer(manifest.release_id, generation))
    log.info("release %s is live (generation %d)", manifest.release_id, generation)
    return PublishResult(manifest.release_id, str(final), True, generation, True, True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
