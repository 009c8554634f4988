"""Ranker checkpoints on disk, tied to the release they were trained against.

Layout under ``<home>/rankers``::

    LATEST                          {"release_id", "file", "offset", "seq"}
    <release_id>/ckpt-<offset>.npz  parameters + AdaGrad state + updater metadata

A checkpoint records the last event-log offset it has applied (``meta.offset``), so a
restarted updater continues exactly where the checkpoint left off.

With a release store (``settings.release_store``), the same layout is mirrored under the
store's ``rankers/`` by :func:`push_checkpoint` (the nearline updater's pusher): the
checkpoint file ``rankers/<release_id>/ckpt-<offset>.npz`` first, then the pointer object
``rankers/LATEST`` (the same JSON as the local file), forward only by ``seq``; the newest
:data:`KEEP` files of the pointer's release stay, older ones are deleted once the pointer has
moved. Replicas that take their releases from elsewhere (``release_source`` ``store`` or
``mlflow``) copy the checkpoint the store's pointer names into their own home with
:class:`CheckpointSync`, then serve it exactly as a checkpoint published in that home.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from serving.errors import ReleaseError, short_repr
from serving.failpoints import failpoint
from serving.layout import rankers_dir
from serving.manifest import fsync_dir, write_json_atomic
from serving.objectstore import TMP_MARK, ObjectStore, open_store
from serving.ranker import Ranker
from serving.release import check_pointer_name
from serving.settings import Settings

log = logging.getLogger(__name__)

LATEST = "LATEST"
KEEP = 5
STORE_RANKERS = "rankers"
STORE_LATEST = f"{STORE_RANKERS}/{LATEST}"
# a checkpoint whose download failed or did not load is not downloaded again for this long,
# unless the store's pointer names another one meanwhile
RETRY_FAILED_S = 30.0


@dataclass(frozen=True)
class CheckpointRef:
    release_id: str
    file: str
    offset: int
    seq: int


def parse_latest(raw: bytes | str, path: Path) -> CheckpointRef:
    """The checkpoint a ranker pointer's content ``raw`` names (``path``: where it was read,
    for errors). Raises :class:`ReleaseError` for content that is not the pointer's JSON, or
    that names anything but ``<release_id>/<plain name>``: nothing outside the release's
    folder is ever loaded or downloaded."""
    try:
        data = json.loads(raw)
        ref = CheckpointRef(str(data["release_id"]), str(data["file"]), int(data["offset"]),
                            int(data["seq"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"ranker pointer {path} is corrupt: {exc}") from exc
    check_pointer_name(ref.release_id, path)
    folder, _, name = ref.file.partition("/")
    if folder != ref.release_id:
        raise ReleaseError(f"ranker pointer {path} names file {short_repr(ref.file)}, which is "
                           f"not inside the folder of its release {ref.release_id}: refused")
    check_pointer_name(name, path, "checkpoint file")
    return ref


def latest_json(ref: CheckpointRef) -> str:
    """The pointer's content for ``ref``: the JSON :func:`write_json_atomic` writes."""
    return json.dumps(ref.__dict__, indent=2, sort_keys=True)


def read_latest(home: Path) -> CheckpointRef | None:
    path = rankers_dir(home) / LATEST
    if not path.exists():
        return None
    return parse_latest(path.read_text(), path)


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


# -- the release store ----------------------------------------------------------------------


def store_key(file: str) -> str:
    """The store key of checkpoint ``file`` (``<release_id>/ckpt-<offset>.npz``)."""
    return f"{STORE_RANKERS}/{file}"


def read_store_latest(store: ObjectStore) -> CheckpointRef | None:
    """The checkpoint the store's pointer ``rankers/LATEST`` names, or None when none was
    pushed yet; the checks of :func:`parse_latest` apply (a bad pointer raises
    :class:`ReleaseError`)."""
    raw = store.read_bytes(STORE_LATEST)
    return None if raw is None else parse_latest(raw, Path(f"{store.url}/{STORE_LATEST}"))


def push_checkpoint(store: ObjectStore, home: Path, ref: CheckpointRef,
                    keep: int = KEEP) -> bool:
    """Push the checkpoint ``ref`` published in ``home`` to ``store``: its file, then the
    store's pointer (the JSON of the local one), then delete the store's checkpoint files but
    the newest ``keep`` of ``ref``'s release. Returns True when the pointer moved.

    Forward only by ``seq``: nothing is pushed when the store's pointer already names ``ref``
    (a retry) or a checkpoint with a higher or equal ``seq`` (another publisher went further).
    A push killed half way leaves the pointer on the previous checkpoint, whose file it never
    touches. Pushers of one home are serialised by ``rankers/.store-push.lock`` (the updater
    and a batch retrain); two homes pushing to one store race on the pointer.

    Raises :class:`~serving.errors.StorageError` (the store or the local file cannot be read
    or written) or :class:`ReleaseError` (the store's pointer is corrupt or refused)."""
    with FileLock(str(rankers_dir(home) / ".store-push.lock"), timeout=60):
        remote = read_store_latest(store)
        if remote is not None and remote.seq >= ref.seq:
            if remote != ref:
                log.warning("%s names checkpoint %s at seq %d, not lower than %s at seq %d: the "
                            "pointer moves forward only; not pushed", store.url, remote.file,
                            remote.seq, ref.file, ref.seq)
            return False
        store.put_file(store_key(ref.file), rankers_dir(home) / ref.file)
        store.write_bytes(STORE_LATEST, latest_json(ref).encode())
    prune_store(store, ref, keep)
    return True


def prune_store(store: ObjectStore, ref: CheckpointRef, keep: int = KEEP) -> int:
    """Delete the store's checkpoint files except the newest ``keep`` of ``ref``'s release and
    ``ref``'s own (checkpoints of other releases are never taken by a replica: the pointer has
    left them); returns how many went."""
    files = [key for key in store.list_keys(f"{STORE_RANKERS}/")
             if key.count("/") == 2 and key.rpartition("/")[2].startswith("ckpt-")
             and key.endswith(".npz")]
    mine = sorted(k for k in files if k.startswith(f"{STORE_RANKERS}/{ref.release_id}/"))
    kept = {*mine[-keep:], store_key(ref.file)}
    gone = [key for key in files if key not in kept]
    for key in gone:
        store.delete(key)
    return len(gone)


class CheckpointSync:
    """Keeps a replica's ``rankers/`` in step with the store's ``rankers/LATEST``."""

    def __init__(self, store: ObjectStore, home: Path,
                 retry_failed_s: float = RETRY_FAILED_S) -> None:
        self.store = store
        self.home = home
        self.retry_failed_s = retry_failed_s
        self._failed: tuple[CheckpointRef | None, float] = (None, 0.0)   # (pointer, when)

    def describe(self) -> str:
        return f"store {self.store.url}"

    def sync(self, release_id: str) -> CheckpointRef | None:
        """Copy the checkpoint the store's pointer names into this home and point the local
        LATEST at it (the same content), if it is trained for ``release_id`` (the release
        served here) and not here already. Returns the new reference, or None when nothing
        changed (one small read of the store): no pointer, another release's checkpoint, the
        local one, or one whose download failed less than ``retry_failed_s`` ago.

        The file is downloaded under a temporary name, loaded once (a file that does not read
        or was trained for another release is refused), fsynced and renamed into place; only
        then does the local pointer move. Raises :class:`ReleaseError` (a refused pointer or
        file) or :class:`~serving.errors.StorageError` (the store cannot be read); the local
        checkpoints and pointer are unchanged then."""
        remote = read_store_latest(self.store)
        if remote is None or remote.release_id != release_id:
            return None
        folder = rankers_dir(self.home) / release_id
        target = rankers_dir(self.home) / remote.file
        try:
            local = read_latest(self.home)
        except ReleaseError:
            local = None  # replaced below by the store's
        if local == remote and target.is_file():
            return None
        failed, when = self._failed
        if failed == remote and time.monotonic() - when < self.retry_failed_s:
            return None
        tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self.store.get_file(store_key(remote.file), tmp)
            ranker = Ranker.load(tmp)
            if ranker.release_id != remote.release_id:
                raise ReleaseError(f"checkpoint {remote.file} in {self.store.url} was trained "
                                   f"for release {ranker.release_id}, not {remote.release_id}")
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            self._failed = (remote, time.monotonic())
            raise
        self._failed = (None, 0.0)
        with FileLock(str(rankers_dir(self.home) / ".latest.lock"), timeout=60):
            write_json_atomic(rankers_dir(self.home) / LATEST, remote.__dict__)
        for old in sorted(folder.glob("ckpt-*.npz"))[:-KEEP]:
            if old != target:
                old.unlink(missing_ok=True)
        log.info("ranker checkpoint %s (seq %d) synced from %s", remote.file, remote.seq,
                 self.store.url)
        return remote


def open_checkpoint_sync(settings: Settings) -> CheckpointSync | None:
    """The sync of the store's ranker checkpoints into ``settings.home``: for a replica whose
    releases come from elsewhere (``release_source`` ``store`` or ``mlflow``) when a
    ``release_store`` is set; None otherwise (the home's own checkpoints are served)."""
    if settings.release_source == "home" or not settings.release_store:
        return None
    return CheckpointSync(open_store(settings.release_store), settings.home)
