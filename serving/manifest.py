"""The release manifest: everything serving needs to load and trust a release bundle.

The manifest is written last into a bundle; a bundle without a valid manifest does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from serving.errors import ReleaseError, StorageError
from serving.failpoints import failpoint

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class EncoderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    revision: str
    dim: int
    max_tokens: int
    pooling: Literal["mean"] = "mean"
    normalized: bool = True
    # Directory of a non-default (e.g. fine-tuned) encoder, so serving loads the encoder the
    # release was embedded with; None = the packaged default (or INSTANTREC_ENCODER_PATH).
    path: str | None = None


class IndexSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    library: Literal["annoy"] = "annoy"
    metric: Literal["angular"] = "angular"
    n_trees: int
    search_k: int
    seed: int
    recall_at_10: float
    recall_target: float
    tuning: list[dict[str, float]] = []
    # A delta release (see serving.vector_index): the release whose build wrote the Annoy file
    # this one links, how many of its rows are searched exactly beside it, and how many Annoy
    # items it drops. None/0/0 = Annoy holds every item.
    base_release: str | None = None
    delta_items: int = 0
    dropped_items: int = 0


class LexicalSpec(BaseModel):
    """The BM25 channel's settings (item text = the text the vectors were computed from)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    library: Literal["bm25s"] = "bm25s"
    variant: Literal["lucene"] = "lucene"
    k1: float = 1.5
    b: float = 0.75
    stemmer: str = "english"
    stopwords: str = "en"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str
    bytes: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    release_id: str
    created_at: str
    item_count: int
    catalogue_digest: str
    encoder: EncoderSpec
    index: IndexSpec
    lexical: LexicalSpec | None = None
    files: dict[str, FileEntry]
    id_map: str = "items.parquet"
    libraries: dict[str, str]
    evaluation: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(bundle_dir: Path, names: list[str]) -> dict[str, FileEntry]:
    return {n: FileEntry(sha256=sha256_file(bundle_dir / n), bytes=(bundle_dir / n).stat().st_size)
            for n in names}


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file, fsync, ``os.replace`` and an fsync of the
    directory, so the new content is whole and durable before this returns.

    Raises :class:`StorageError` if any step fails (disk full, I/O error, failed fsync): the
    old file is untouched then, and a failure is never reported as success.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            failpoint("atomic.written")
            fh.flush()
            os.fsync(fh.fileno())
        failpoint("atomic.synced")
        os.replace(tmp, path)
        failpoint("atomic.replaced")
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc}") from exc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    write_json_atomic(bundle_dir / MANIFEST_NAME, manifest.model_dump(mode="json"))


def read_manifest(bundle_dir: Path, verify_files: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with ``verify_files`` also check every checksum.

    Raises :class:`ReleaseError` naming the bundle and what is wrong with it.
    """
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise ReleaseError(f"release {bundle_dir} has no {MANIFEST_NAME}: it is incomplete")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ReleaseError(f"manifest of release {bundle_dir} is invalid: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ReleaseError(
            f"release {bundle_dir} has manifest format {manifest.format_version}, "
            f"this code reads format {FORMAT_VERSION}"
        )
    if verify_files:
        for name, entry in manifest.files.items():
            file = bundle_dir / name
            if not file.is_file():
                raise ReleaseError(f"release {bundle_dir} lacks file {name}")
            if file.stat().st_size != entry.bytes or sha256_file(file) != entry.sha256:
                raise ReleaseError(f"release {bundle_dir}: checksum mismatch on {name}")
    return manifest
