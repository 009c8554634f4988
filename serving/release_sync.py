"""A replica's local releases, kept in step with a remote source of releases.

With ``release_source`` ``store`` or ``mlflow`` (:class:`serving.settings.Settings`), a
serving replica does not read the releases of a shared home: it copies the release its source
names into its own ``releases/`` directory, a local cache, and then follows its own pointer
exactly as a replica of the home would (:mod:`serving.release`). The sources:

- ``store``: an object store (:mod:`serving.objectstore`) that the publish step pushes to in
  this order: every file of ``releases/<release_id>/``, then that release's
  ``manifest.json``, then the pointer object ``releases/CURRENT`` (``{"release_id",
  "generation"}``, forward only). A pointer names only a release whose files are all there.
- ``mlflow``: the model registry: the version of ``settings.model_name`` that the alias
  ``champion`` names, its ``release_id`` tag, and the release bundle the version's pyfunc
  carries as its artefact ``release``.

A sync (:meth:`ReleaseSync.sync`) costs one small read of the source when nothing changed.
When the source names a release this replica does not have, its files are downloaded into
``releases/.staging/<release_id>.sync``, checked against the checksums of its manifest, made
read-only, renamed into ``releases/<release_id>`` and only then does the local pointer move
(generation + 1). A download that fails or does not verify is removed and raised; nothing
partial is ever visible under ``releases/<release_id>``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from serving.errors import ConfigurationError, ReleaseError
from serving.manifest import MANIFEST_NAME, fsync_dir, read_manifest
from serving.objectstore import ObjectStore, check_key, open_store
from serving.release import (
    POINTER_NAME,
    Pointer,
    check_pointer_name,
    pointer_lock,
    read_pointer,
    write_pointer,
)
from serving.settings import Settings

log = logging.getLogger(__name__)

STORE_RELEASES = "releases"
STORE_POINTER = f"{STORE_RELEASES}/{POINTER_NAME}"
CHAMPION = "champion"   # the registry alias that names the release to serve
RELEASE_ARTEFACT = "release"   # the pyfunc artefact that holds the bundle
SYNC_SUFFIX = ".sync"   # releases/.staging/<release_id>.sync: a download in progress
# a release whose download failed or did not verify is not downloaded again for this long,
# unless the source names another release meanwhile
RETRY_FAILED_S = 30.0


def make_read_only(bundle_dir: Path) -> None:
    """Clear every write bit (``a-w``) of the files under ``bundle_dir``; directories keep
    theirs, so a release that is no longer wanted can still be deleted whole."""
    for path in bundle_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, path.stat().st_mode & ~0o222)


def release_key(release_id: str, name: str = "") -> str:
    """The store key of file ``name`` (a ``/``-separated path inside the bundle) of a release;
    without ``name``, the release's folder prefix (``releases/<release_id>/``)."""
    return f"{STORE_RELEASES}/{release_id}/{name}"


def read_store_pointer(store: ObjectStore) -> Pointer | None:
    """The release the store's pointer names, or None when nothing was pushed yet. Raises
    :class:`ReleaseError` for a pointer that is not JSON of the right shape, or names anything
    but a plain release name (``../x`` is refused, never followed)."""
    raw = store.read_bytes(STORE_POINTER)
    if raw is None:
        return None
    where = f"{store.url}/{STORE_POINTER}"
    try:
        data = json.loads(raw)
        pointer = Pointer(release_id=str(data["release_id"]), generation=int(data["generation"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"release pointer {where} is corrupt: {exc}") from exc
    check_pointer_name(pointer.release_id, Path(where))
    return pointer


def write_store_pointer(store: ObjectStore, pointer: Pointer) -> None:
    store.write_bytes(STORE_POINTER, json.dumps(
        {"release_id": pointer.release_id, "generation": pointer.generation},
        sort_keys=True).encode())


class ReleaseSource(ABC):
    """Where a replica's releases come from."""

    @abstractmethod
    def describe(self) -> str:
        """The source, for log lines and errors."""

    @abstractmethod
    def named_release(self) -> str | None:
        """The release id the source names now (one small read), or None if it names none."""

    @abstractmethod
    def fetch(self, release_id: str, work_dir: Path) -> Path:
        """Download the bundle of ``release_id`` under the empty directory ``work_dir``;
        returns the bundle's directory (inside ``work_dir``), not verified yet."""


class StoreSource(ReleaseSource):
    """Releases pushed to an object store by the publish step."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def describe(self) -> str:
        return f"store {self.store.url}"

    def named_release(self) -> str | None:
        pointer = read_store_pointer(self.store)
        return pointer.release_id if pointer is not None else None

    def fetch(self, release_id: str, work_dir: Path) -> Path:
        prefix = release_key(release_id)
        names = [key[len(prefix):] for key in self.store.list_keys(prefix)]
        if MANIFEST_NAME not in names:
            raise ReleaseError(f"release {release_id} in {self.store.url} has no {MANIFEST_NAME}: "
                               "it is incomplete")
        bundle = work_dir / release_id
        for name in names:
            check_key(name)  # a key naming ../x would write outside the bundle: refused
            self.store.get_file(prefix + name, bundle / name)
        return bundle


class MlflowSource(ReleaseSource):
    """The release of the registered model's ``champion`` version (``settings.model_name``
    in the registry at ``settings.tracking_uri``)."""

    def __init__(self, settings: Settings) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise ConfigurationError("INSTANTREC_RELEASE_SOURCE=mlflow needs the mlflow package "
                                     "(pip install 'instantrec[pipelines]')") from exc
        uri = settings.tracking_uri
        if uri.startswith("sqlite:///"):  # the embedded store: SQLite needs its folder
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = uri
        self.name = settings.model_name
        self._client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._versions: dict[str, str] = {}   # release id -> the version that named it

    def describe(self) -> str:
        return f"registered model {self.name}@{CHAMPION} at {self.tracking_uri}"

    def named_release(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            version = self._client.get_model_version_by_alias(self.name, CHAMPION)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        release_id = version.tags.get("release_id")
        if not release_id:
            raise ReleaseError(f"{self.name} version {version.version} ({CHAMPION}) has no "
                               "release_id tag: it is not a release")
        check_pointer_name(release_id, Path(f"models:/{self.name}@{CHAMPION}"))
        self._versions[release_id] = str(version.version)
        return str(release_id)

    def fetch(self, release_id: str, work_dir: Path) -> Path:
        from mlflow.artifacts import download_artifacts
        from mlflow.models import Model

        version = self._versions[release_id]
        model_uri = self._client.get_model_version_download_uri(self.name, version)
        mlmodel = Path(download_artifacts(artifact_uri=f"{model_uri}/MLmodel",
                                          dst_path=str(work_dir / "model"),
                                          tracking_uri=self.tracking_uri,
                                          registry_uri=self.tracking_uri))
        artefacts: dict[str, Any] = (Model.load(str(mlmodel)).flavors.get("python_function", {})
                                     .get("artifacts") or {})
        if RELEASE_ARTEFACT not in artefacts:
            raise ReleaseError(f"{self.name} version {version} carries no {RELEASE_ARTEFACT!r} "
                               "artefact: it is not a release")
        relative = str(artefacts[RELEASE_ARTEFACT]["path"])
        check_key(relative)
        return Path(download_artifacts(artifact_uri=f"{model_uri}/{relative}",
                                       dst_path=str(work_dir / "bundle"),
                                       tracking_uri=self.tracking_uri,
                                       registry_uri=self.tracking_uri))


class ReleaseSync:
    """Keeps ``releases_dir`` (a replica's own) in step with ``source``."""

    def __init__(self, source: ReleaseSource, releases_dir: Path,
                 retry_failed_s: float = RETRY_FAILED_S, keep: int | None = None,
                 home: Path | None = None) -> None:
        self.source = source
        self.releases_dir = releases_dir
        self.retry_failed_s = retry_failed_s
        # retention after each release synced (serving.retention); None keeps everything
        self.keep = keep
        self.home = home
        self._failed: tuple[str | None, float] = (None, 0.0)   # (release id, when)

    def sync(self, wait_s: float = 0.0) -> str | None:
        """Make the local pointer name the release the source names, downloading it first if
        it is not here; returns its id when the pointer moved, None when nothing changed (the
        source names no release or the live one; another process of this home is downloading
        it and ``wait_s`` passed; it failed less than ``retry_failed_s`` ago).

        Raises :class:`ReleaseError` (a bundle that does not verify, a bad pointer),
        :class:`~serving.errors.StorageError` (the source cannot be read) or the source
        client's own error; the local releases and pointer are unchanged then."""
        release_id = self.source.named_release()
        if release_id is None:
            return None
        local = read_pointer(self.releases_dir) if self.releases_dir.is_dir() else None
        if local is not None and local.release_id == release_id:
            return None
        failed, when = self._failed
        if failed == release_id and time.monotonic() - when < self.retry_failed_s:
            return None
        final = self.releases_dir / release_id
        if not final.is_dir():
            try:
                if not self._download(release_id, wait_s):
                    return None
            except BaseException:
                self._failed = (release_id, time.monotonic())
                raise
        self._failed = (None, 0.0)
        with pointer_lock(self.releases_dir):
            local = read_pointer(self.releases_dir)
            if local is not None and local.release_id == release_id:
                return None
            generation = (local.generation if local else 0) + 1
            write_pointer(self.releases_dir, Pointer(release_id, generation))
        log.info("release %s synced from %s (local generation %d)", release_id,
                 self.source.describe(), generation)
        if self.keep is not None:
            from serving.retention import prune_after_live

            prune_after_live(self.releases_dir, self.keep, self.home)
        return release_id

    def _download(self, release_id: str, wait_s: float) -> bool:
        """Download, verify and install ``releases/<release_id>``; False when another process
        of this home held the download for longer than ``wait_s``."""
        staging = self.releases_dir / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        work = staging / f"{release_id}{SYNC_SUFFIX}"
        final = self.releases_dir / release_id
        try:
            lock = FileLock(str(staging / f"{release_id}{SYNC_SUFFIX}.lock"), timeout=wait_s)
            lock.acquire()
        except Timeout:
            log.info("release %s is being downloaded by another process of this home",
                     release_id)
            return False
        try:
            if final.is_dir():  # the other process finished it
                return True
            shutil.rmtree(work, ignore_errors=True)  # a download killed half way
            work.mkdir()
            try:
                started = time.monotonic()
                bundle = self.source.fetch(release_id, work)
                manifest = read_manifest(bundle, verify_files=True)
                if manifest.release_id != release_id:
                    raise ReleaseError(f"{self.source.describe()} names release {release_id}, "
                                       f"whose manifest says {manifest.release_id}")
                make_read_only(bundle)
                fsync_dir(bundle)
                os.replace(bundle, final)
                fsync_dir(self.releases_dir)
                log.info("downloaded release %s from %s in %.1f s", release_id,
                         self.source.describe(), time.monotonic() - started)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return True
        finally:
            lock.release()


def open_release_sync(settings: Settings) -> ReleaseSync | None:
    """The sync of ``settings.release_source`` into ``settings.releases_dir``, or None for
    ``home`` (the home's releases are the ones served). Raises :class:`ConfigurationError`
    for ``store`` without ``release_store``, or a store URL of an unknown form."""
    if settings.release_source == "home":
        return None
    if settings.release_source == "store":
        if not settings.release_store:
            raise ConfigurationError("INSTANTREC_RELEASE_SOURCE=store needs the store to read: "
                                     "set INSTANTREC_RELEASE_STORE (a path, file:///abs/path "
                                     "or s3://bucket/prefix)")
        source: ReleaseSource = StoreSource(open_store(settings.release_store))
    else:
        source = MlflowSource(settings)
    settings.releases_dir.mkdir(parents=True, exist_ok=True)
    return ReleaseSync(source, settings.releases_dir, keep=settings.keep_releases,
                       home=settings.home)
