"""Publishing: staged bundle -> immutable release directory -> pointer moved forward.

The manifest is rewritten (last) with the evaluation and gate verdict, the staging directory
is renamed into place atomically, and only then, and only if the gate passed, does the
pointer move. Pointer updates are serialised by a file lock and only ever move forward.

A published release's files are made read-only (``a-w``) before it is moved into place: they
are immutable, and serving memory-maps some of them (see :mod:`serving.release`). Root
ignores mode bits, which is why serving also watches the files for changes.
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
from serving.errors import ReleaseError, StorageError
from serving.failpoints import failpoint
from serving.manifest import fsync_dir, read_manifest, write_manifest
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
    if not bundle_dir.exists() and (releases_dir / bundle_dir.name).is_dir():
        # a retry after a crash between moving the staged bundle into place and the pointer
        bundle_dir = releases_dir / bundle_dir.name
    manifest = read_manifest(bundle_dir)
    final = releases_dir / manifest.release_id
    if bundle_dir.resolve() != final.resolve():
        eval_path = bundle_dir / EVALUATION_FILE
        if not eval_path.is_file():
            raise ReleaseError(f"staged release {bundle_dir} has not been evaluated")
        evaluation = json.loads(eval_path.read_text())
        manifest = manifest.model_copy(update={"evaluation": evaluation,
                                               "gate": evaluation["gate"]})
        # a writer killed mid-write (evaluate's or an earlier publish's write_json_atomic)
        # leaves its temporary file: it is no part of the release, which is immutable from here
        for stale in bundle_dir.rglob(".*.tmp-*"):
            stale.unlink()
        write_manifest(bundle_dir, manifest)  # last write into the bundle
        failpoint("publish.manifest")
        make_read_only(bundle_dir)  # immutable from here on (see serving.release)
        if final.exists():
            shutil.rmtree(bundle_dir)  # a concurrent or earlier run published it already
        else:
            try:
                fsync_dir(bundle_dir)
                os.replace(bundle_dir, final)
                failpoint("publish.moved")
                fsync_dir(releases_dir)
                failpoint("publish.dir_synced")
            except OSError as exc:
                raise StorageError(f"cannot move release {manifest.release_id} into "
                                   f"{releases_dir}: {exc}") from exc
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
        failpoint("publish.pointer")
    log.info("release %s is live (generation %d)", manifest.release_id, generation)
    return PublishResult(manifest.release_id, str(final), True, generation, True, True)


def make_read_only(bundle_dir: Path) -> None:
    """Clear every write bit (``a-w``) of the files under ``bundle_dir``; directories keep
    theirs, so a release that is no longer wanted can still be deleted whole."""
    for path in bundle_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, path.stat().st_mode & ~0o222)
