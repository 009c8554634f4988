"""Publishing: staged bundle -> immutable release directory -> pointer moved forward.

The manifest is rewritten (last) with the evaluation and gate verdict, the staging directory
is renamed into place atomically, and only then, and only if the gate passed, does the
pointer move. Pointer updates are serialised by a file lock and only ever move forward.

A published release's files are made read-only (``a-w``) before it is moved into place: they
are immutable, and serving memory-maps some of them (see :mod:`serving.release`). Root
ignores mode bits, which is why serving also watches the files for changes.

With a release store configured (``release_store``), the live release is then pushed to it by
:func:`push_release` under the same contract: bundle files, then the manifest, then the
store's pointer, forward only (see :mod:`serving.release_sync`, which replicas sync with).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.catalogue.gate import EVALUATION_FILE
from serving.errors import ReleaseError, StorageError
from serving.failpoints import failpoint
from serving.manifest import MANIFEST_NAME, fsync_dir, read_manifest, write_manifest
from serving.objectstore import TMP_MARK, ObjectStore
from serving.release import (
    POINTER_NAME,
    Pointer,
    check_pointer_name,
    pointer_lock,
    read_pointer,
    write_pointer,
)
from serving.release_sync import (
    make_read_only,
    read_store_pointer,
    release_key,
    write_store_pointer,
)

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
    with pointer_lock(releases_dir):
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


@dataclass(frozen=True)
class PushResult:
    """``pushed``: files this call put into the store (0: nothing to do); ``pointer_moved``:
    the store's pointer names the release now because of this call; ``generation``: the
    store pointer's generation after the call (None: the store has no pointer)."""

    release_id: str
    store: str
    pushed: int
    pointer_moved: bool
    generation: int | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def push_release(store: ObjectStore, releases_dir: Path, release_id: str) -> PushResult:
    """Push the live published release ``release_id`` of ``releases_dir`` to ``store``: every
    file of its bundle (checksums verified first), then its ``manifest.json``, and only then
    the store's pointer ``releases/CURRENT`` with the local pointer's generation.

    Forward only and idempotent: nothing is pushed when the store's pointer already names the
    release (a retried task), when its generation is not lower than the local one (another
    publisher went further), or when the release is no longer the live one here (a newer one
    went live since; its own publish pushes it). A push killed half way leaves the store's
    pointer on the previous release, whose files it never touches; pushing again completes it.
    Pushers are serialised by the home's publish lock (``pipelines.steps.publish_lock``), not
    across homes: two homes pushing to one store race on the pointer.
    """
    check_pointer_name(release_id, releases_dir / POINTER_NAME)
    local = read_pointer(releases_dir)
    remote = read_store_pointer(store)
    remote_gen = remote.generation if remote is not None else None
    if remote is not None and remote.release_id == release_id:
        log.info("release %s is already live in %s (generation %d)", release_id, store.url,
                 remote.generation)
        return PushResult(release_id, store.url, 0, False, remote_gen)
    if local is None or local.release_id != release_id:
        log.warning("release %s is not live in %s (%s is): not pushed to %s", release_id,
                    releases_dir, local.release_id if local else None, store.url)
        return PushResult(release_id, store.url, 0, False, remote_gen)
    if remote is not None and remote.generation >= local.generation:
        log.warning("%s names release %s at generation %d, not lower than this home's %d for "
                    "%s: the pointer moves forward only; not pushed", store.url,
                    remote.release_id, remote.generation, local.generation, release_id)
        return PushResult(release_id, store.url, 0, False, remote_gen)
    bundle = releases_dir / release_id
    manifest = read_manifest(bundle, verify_files=True)  # never spread a corrupt release
    if manifest.release_id != release_id:
        raise ReleaseError(f"release {bundle} has the manifest of {manifest.release_id}")
    files = sorted(path for path in bundle.rglob("*") if path.is_file()
                   and path != bundle / MANIFEST_NAME and TMP_MARK not in path.name)
    for path in files:
        store.put_file(release_key(release_id, path.relative_to(bundle).as_posix()), path)
    failpoint("store.files")
    store.put_file(release_key(release_id, MANIFEST_NAME), bundle / MANIFEST_NAME)
    failpoint("store.manifest")
    write_store_pointer(store, Pointer(release_id, local.generation))
    log.info("release %s pushed to %s (%d files, generation %d)", release_id, store.url,
             len(files) + 1, local.generation)
    return PushResult(release_id, store.url, len(files) + 1, True, local.generation)
