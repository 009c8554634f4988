"""Release retention: a home, or a replica's local cache of releases, keeps the live release
and the ``keep`` newest others, and deletes the rest with their ranker checkpoints.

Every refresh that changes the catalogue publishes a release (a Home Depot release is about
220 MB), so without retention ``releases/`` grows by that much per refresh. What is kept:

- the release the pointer ``releases/CURRENT`` names (the live one);
- the release ``rankers/LATEST`` names (the nearline updater may still be writing its
  checkpoints);
- the ``keep`` newest other releases, by when they were published or synced here (their
  manifest, the last file a publish or a sync writes), so an operator can go back to one by
  publishing it again; ``keep`` is at least 1: the release live before this one is still
  served by processes that have not reloaded yet.

A release goes in one rename (into ``releases/.staging/``) before its files are deleted, so
its directory is never seen half deleted; its checkpoints under ``rankers/<release_id>/`` go
with it. Pruning holds the pointer lock, so it never runs beside a move of the pointer.
Delta releases share their Annoy file with their base by hard link, so deleting the base
leaves them whole. The release store and the MLflow registry keep their own copies.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from serving.checkpoint import read_latest
from serving.errors import ConfigurationError, StorageError
from serving.layout import rankers_dir
from serving.manifest import MANIFEST_NAME
from serving.release import pointer_lock, read_pointer

log = logging.getLogger(__name__)


def prunable_releases(releases_dir: Path, keep: int, home: Path | None = None) -> list[str]:
    """The release ids under ``releases_dir`` that retention would delete, oldest first (none
    while no release is live). ``home``: whose ``rankers/LATEST`` is also kept."""
    if keep < 1:
        raise ConfigurationError(f"keep must be at least 1 (the release live before this one is "
                                 f"still served until every process reloads), got {keep}")
    pointer = read_pointer(releases_dir) if releases_dir.is_dir() else None
    if pointer is None:
        return []
    protected = {pointer.release_id}
    latest = read_latest(home) if home is not None else None
    if latest is not None:
        protected.add(latest.release_id)
    published = []
    for path in releases_dir.iterdir():
        manifest = path / MANIFEST_NAME
        if path.name.startswith(".") or path.name in protected or not manifest.is_file():
            continue
        published.append((manifest.stat().st_mtime_ns, path.name))
    published.sort()
    return [name for _, name in published[:max(0, len(published) - keep)]]


def prune_releases(releases_dir: Path, keep: int, home: Path | None = None,
                   dry_run: bool = False) -> list[str]:
    """Delete what :func:`prunable_releases` names (with ``home``'s ``rankers/<id>/``, when
    given), under the pointer lock; returns the ids deleted (or, with ``dry_run``, that would
    be). Raises :class:`StorageError` naming the release when one cannot be moved away."""
    if not releases_dir.is_dir():
        return []
    with pointer_lock(releases_dir):
        doomed = prunable_releases(releases_dir, keep, home)
        if dry_run:
            return doomed
        trash = releases_dir / ".staging"
        trash.mkdir(exist_ok=True)
        for release_id in doomed:
            gone = trash / f"{release_id}.pruned-{secrets.token_hex(4)}"
            try:
                os.replace(releases_dir / release_id, gone)
            except OSError as exc:
                raise StorageError(f"cannot prune release {release_id} in {releases_dir}: "
                                   f"{exc}") from exc
            shutil.rmtree(gone, ignore_errors=True)
            if home is not None:
                shutil.rmtree(rankers_dir(home) / release_id, ignore_errors=True)
    if doomed:
        log.info("pruned %d old release(s) from %s, keeping the live one and %d more: %s",
                 len(doomed), releases_dir, keep, ", ".join(doomed))
    return doomed


def prune_after_live(releases_dir: Path, keep: int, home: Path | None = None) -> list[str]:
    """:func:`prune_releases` after a release went live (a publish, a replica's sync): a
    failure is logged, never raised, since the new release is live either way."""
    try:
        return prune_releases(releases_dir, keep, home)
    except Exception as exc:  # noqa: BLE001 - retention is housekeeping
        log.error("cannot prune old releases in %s: %s", releases_dir, exc)
        return []
