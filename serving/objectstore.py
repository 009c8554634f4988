"""Object stores that releases are published to and replicas sync from.

A store holds objects under ``/``-separated keys (``releases/CURRENT``,
``releases/<release_id>/vectors.npy``). Two kinds:

- :class:`LocalStore`: files under a directory (``file:///abs/path`` or a plain path), e.g. a
  shared mount. Every write goes to a temporary name beside the target, is fsynced and renamed
  into place, so a reader sees the old object or the new one, never a part.
- :class:`S3Store`: a bucket of an S3-compatible service (``s3://bucket/prefix``) through
  boto3. The endpoint comes from boto3's own ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
  (unset: AWS), credentials and region from the usual ``AWS_*`` variables or files. An S3
  PUT is atomic per object: a reader never sees part of one.

Neither store offers an atomic compare-and-swap across objects; the publish contract (see
:func:`pipelines.catalogue.publish.push_release`) relies only on per-object atomicity and on
the order of writes: bundle files, then the release's manifest, then the pointer.
"""

from __future__ import annotations

import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from serving.errors import ConfigurationError, StorageError, short_repr
from serving.manifest import fsync_dir

TMP_MARK = ".tmp-"   # LocalStore's temporary files: ``.<name>.tmp-<pid>-<hex>``


def check_key(key: str) -> str:
    """``key`` if it is a relative ``/``-separated path of plain names (no empty, ``.`` or
    ``..`` part, no backslash, no control character); raises :class:`StorageError` otherwise.
    A key names an object inside the store, never anything beside it."""
    parts = key.split("/")
    if (not key or "\\" in key or not key.isprintable()
            or any(part in ("", ".", "..") for part in parts)):
        raise StorageError(f"object key {short_repr(key)} is not a relative path of plain names")
    return key


class ObjectStore(ABC):
    """Objects under keys; each single write is atomic (whole or not at all)."""

    url: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` as object ``key`` (replacing it)."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Write object ``key`` to the file ``path`` (its folder is created). Raises
        :class:`StorageError` if the object is missing or cannot be read."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """The content of the small object ``key``, or None if there is none."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` as object ``key`` (replacing it, atomically)."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix`` (a folder: ``releases/<id>/``), sorted."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether object ``key`` exists."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove object ``key``; nothing happens when there is none."""


class LocalStore(ObjectStore):
    """A store in the directory ``root``: object ``a/b`` is the file ``root/a/b``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, fill: Any) -> None:
        """Write object ``key`` through a temporary file that ``fill(fh)`` fills: fsync, rename,
        fsync of the folder."""
        target = self._path(key)
        tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {key} to {self.url}: {exc}") from exc

    def put_file(self, key: str, path: Path) -> None:
        def fill(fh: Any) -> None:
            with Path(path).open("rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)

        self._write(key, fill)

    def get_file(self, key: str, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(key), path)
        except OSError as exc:
            raise StorageError(f"cannot get {key} from {self.url}: {exc}") from exc

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {key} from {self.url}: {exc}") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda fh: fh.write(data))

    def list_keys(self, prefix: str) -> list[str]:
        # the folder part of the prefix bounds the walk; the rest filters names
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        try:
            found = [p for p in base.rglob("*") if p.is_file()] if base.is_dir() else []
        except OSError as exc:
            raise StorageError(f"cannot list {prefix} in {self.url}: {exc}") from exc
        keys = (p.relative_to(self.root).as_posix() for p in found
                if not (p.name.startswith(".") and TMP_MARK in p.name))  # a write in progress
        return sorted(k for k in keys if k.startswith(prefix))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key} from {self.url}: {exc}") from exc


_RAISE = object()   # S3Store._call: no value stands in for a missing key


class S3Store(ObjectStore):
    """A store in ``bucket`` under the key prefix ``prefix`` (``""``: the whole bucket) of an
    S3-compatible service, through a boto3 client (endpoint, region and credentials as boto3
    finds them: ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or the AWS config files)."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client or boto3.client("s3")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], Any], missing: Any = _RAISE) -> Any:
        """``fn()``, its S3 and I/O errors raised as StorageError naming ``what`` and ``key``;
        ``missing`` (when given) is returned instead for a key that does not exist."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            if missing is not _RAISE and _missing(exc):
                return missing
            raise StorageError(f"cannot {what} {key} in {self.url}: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"cannot {what} {key} in {self.url}: {exc}") from exc

    def put_file(self, key: str, path: Path) -> None:
        self._call("put", key, lambda: self._client.upload_file(str(path), self.bucket,
                                                                self._key(key)))

    def get_file(self, key: str, path: Path) -> None:
        def get() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._client.download_file(self.bucket, self._key(key), str(path))

        self._call("get", key, get)

    def read_bytes(self, key: str) -> bytes | None:
        return self._call("read", key, lambda: bytes(self._client.get_object(
            Bucket=self.bucket, Key=self._key(key))["Body"].read()), missing=None)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data))

    def list_keys(self, prefix: str) -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0

        def keys() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            return sorted(obj["Key"][cut:] for page in pages for obj in page.get("Contents", ()))

        return self._call("list", prefix, keys)

    def exists(self, key: str) -> bool:
        return self._call("look up", key, lambda: self._client.head_object(
            Bucket=self.bucket, Key=self._key(key)) is not None, missing=False)

    def delete(self, key: str) -> None:
        # S3 answers a delete of a missing key with success
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket,
                                                                     Key=self._key(key)))


def _missing(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def open_store(url: str, setting: str = "INSTANTREC_RELEASE_STORE") -> ObjectStore:
    """The store ``url`` names: ``file:///abs/path`` or a plain path (a :class:`LocalStore`),
    ``s3://bucket[/prefix]`` (an :class:`S3Store`). ``setting`` names where the URL came from,
    for the error a URL of any other form raises (:class:`ConfigurationError`)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigurationError(f"{setting}={url!r} names no bucket: use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ConfigurationError(f"{setting}={url!r} is not a local absolute path: use "
                                     "file:///abs/path")
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "" and url.strip():
        return LocalStore(Path(url))
    raise ConfigurationError(f"{setting}={url!r} is not a store this code knows: use a path, "
                             "file:///abs/path or s3://bucket/prefix")
