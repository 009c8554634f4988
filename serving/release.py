"""Release bundles on disk and the forward-only pointer that names the live one.

Layout under ``<home>/releases``::

    CURRENT                   pointer: {"release_id": ..., "generation": n}
    <release_id>/             one immutable bundle per release
        index.ann             Annoy index (angular), item i == row i of items.parquet; in a
                              delta release, the base release's file, hard-linked
        index_rows.npy        delta releases only: Annoy item -> row (-1 = gone/changed)
        delta_rows.npy        delta releases only: rows searched exactly (see vector_index)
        vectors.npy           float32 (n, dim) unit vectors, same order
        items.parquet         the id map and the item table serving filters on
        lexical/              BM25 index over the same item texts (bm25s)
        manifest.json         written last
    .staging/<release_id>/    bundles being built; never read by serving

A published release is immutable: its files are made read-only (``a-w``) when the bundle is
moved into place, and must never be edited, truncated or replaced in place. Serving
memory-maps ``index.ann`` and ``vectors.npy``: truncating a mapped file kills the serving
process (SIGBUS), and rewriting one changes what it answers. Mode bits do not stop root, so
serving also records each file's size, mtime and inode at load (:func:`changed_files`) and
reports a release whose files changed under it; checksums at load refuse such a release. A
new catalogue means a new release, published beside the old one.

Pointers name a release by a plain name inside their folder (:func:`check_pointer_name`):
a pointer naming ``../..`` or an absolute path is refused, never followed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

import numpy as np
from filelock import FileLock

from serving.errors import ReleaseError, short_repr
from serving.lexical import LexicalIndex
from serving.manifest import Manifest, read_manifest, write_json_atomic
from serving.schema import ITEM_ID
from serving.vector_index import VectorIndex

log = logging.getLogger(__name__)

POINTER_NAME = "CURRENT"
INDEX_FILE = "index.ann"
INDEX_ROWS_FILE = "index_rows.npy"
DELTA_ROWS_FILE = "delta_rows.npy"
VECTORS_FILE = "vectors.npy"
ITEMS_FILE = "items.parquet"
LEXICAL_DIR = "lexical"


@dataclass(frozen=True)
class Pointer:
    release_id: str
    generation: int


def check_pointer_name(name: str, pointer: Path, what: str = "release id") -> str:
    """``name`` read from the pointer file ``pointer``, if it is a plain name of an entry of
    the pointer's folder: not empty, no ``/`` or ``\\``, not ``.``, ``..`` or hidden (a leading
    dot: ``.staging``), no NUL or other control character. A pointer is a file anyone with
    write access to the home can edit; following ``../..`` would load whatever lies there.

    Raises :class:`ReleaseError` naming the pointer file."""
    if (not name or "/" in name or "\\" in name or name.startswith(".")
            or not name.isprintable()):
        raise ReleaseError(f"pointer {pointer} names {what} {short_repr(name)}, which is not a "
                           f"plain name inside {pointer.parent}: refused")
    return name


def read_pointer(releases_dir: Path) -> Pointer | None:
    """The live release, or None when nothing has been published yet."""
    path = releases_dir / POINTER_NAME
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        pointer = Pointer(release_id=str(raw["release_id"]), generation=int(raw["generation"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"release pointer {path} is corrupt: {exc}") from exc
    check_pointer_name(pointer.release_id, path)
    return pointer


def pointer_lock(releases_dir: Path, timeout_s: float = 60.0) -> FileLock:
    """The lock every move of ``releases_dir``'s pointer holds (a publish, a replica's sync),
    and release retention beside them."""
    return FileLock(str(releases_dir / ".pointer.lock"), timeout=timeout_s)


def write_pointer(releases_dir: Path, pointer: Pointer) -> None:
    write_json_atomic(releases_dir / POINTER_NAME,
                      {"release_id": pointer.release_id, "generation": pointer.generation})


@dataclass(frozen=True)
class ItemTable:
    """Columnar item attributes in index order (row i == Annoy item i)."""

    item_ids: np.ndarray      # object (str)
    titles: np.ndarray        # object (str)
    categories: np.ndarray    # object (str | None)
    brands: np.ndarray        # object (str | None)
    prices: np.ndarray        # float64, NaN = unknown
    in_stock: np.ndarray      # bool

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified release: what one request needs, immutable once built."""

    path: Path
    manifest: Manifest
    index: VectorIndex        # Annoy (memory-mapped), plus the exact delta of a refresh
    vectors: np.ndarray       # float32 (n, dim), memory-mapped
    items: ItemTable
    lexical: LexicalIndex | None = None
    # (size, mtime_ns, inode) of every file of the bundle when loading began
    file_stats: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def release_id(self) -> str:
        return self.manifest.release_id


def stat_files(bundle_dir: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, inode) of every file under ``bundle_dir``, by relative path."""
    stats = {}
    for path in sorted(bundle_dir.rglob("*")):
        st = path.stat()
        if S_ISREG(st.st_mode):
            stats[path.relative_to(bundle_dir).as_posix()] = (st.st_size, st.st_mtime_ns,
                                                              st.st_ino)
    return stats


def changed_files(bundle: Bundle) -> list[str]:
    """Files of a loaded bundle whose size, mtime or inode differ from when it was loaded, or
    that are gone: a published release edited in place (see the module docstring)."""
    changed = []
    for name, recorded in bundle.file_stats.items():
        try:
            st = (bundle.path / name).stat()
        except OSError:
            changed.append(name)
            continue
        if (st.st_size, st.st_mtime_ns, st.st_ino) != recorded:
            changed.append(name)
    return changed


def load_items(path: Path) -> ItemTable:
    import polars as pl

    df = pl.read_parquet(path)
    return ItemTable(
        item_ids=df[ITEM_ID].to_numpy().astype(object),
        titles=df["title"].to_numpy().astype(object),
        categories=df["category"].to_numpy().astype(object),
        brands=df["brand"].to_numpy().astype(object),
        prices=df["price"].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
        in_stock=df["in_stock"].fill_null(False).to_numpy().astype(bool),
    )


def load_bundle(bundle_dir: Path, verify_files: bool = True) -> Bundle:
    """Load a bundle, checking the manifest, checksums, library version and shapes.

    Raises :class:`ReleaseError` if anything is missing, corrupt or inconsistent.
    """
    import annoy

    try:  # before the checksums: a file changed after them is seen by changed_files
        file_stats = stat_files(bundle_dir)
    except OSError as exc:
        raise ReleaseError(f"release {bundle_dir} cannot be loaded: {exc}") from exc
    manifest = read_manifest(bundle_dir, verify_files=verify_files)
    built_with = manifest.libraries.get("annoy")
    here = _annoy_version()
    if built_with and here and built_with.split(".")[:2] != here.split(".")[:2]:
        raise ReleaseError(
            f"release {manifest.release_id} was built with annoy {built_with}, "
            f"this process has annoy {here}"
        )
    try:
        items = load_items(bundle_dir / ITEMS_FILE)
        vectors = np.load(bundle_dir / VECTORS_FILE, mmap_mode="r")
        ann = annoy.AnnoyIndex(manifest.encoder.dim, manifest.index.metric)
        ann.load(str(bundle_dir / INDEX_FILE))
        if manifest.index.base_release is None:
            index = VectorIndex.full(ann, vectors, manifest.index.search_k)
        else:
            index = VectorIndex.delta(ann, vectors, manifest.index.search_k,
                                      np.load(bundle_dir / INDEX_ROWS_FILE),
                                      np.load(bundle_dir / DELTA_ROWS_FILE))
        lexical = (LexicalIndex.load(bundle_dir / LEXICAL_DIR) if manifest.lexical is not None
                   else None)
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"release {bundle_dir} cannot be loaded: {exc}") from exc
    n = manifest.item_count
    if lexical is not None and lexical.n_docs != n:
        raise ReleaseError(f"release {manifest.release_id}: lexical index has {lexical.n_docs} "
                           f"documents, the release {n} items")
    in_index = ann.get_n_items() if index.index_rows is None else (
        ann.get_n_items() - index.dropped + index.delta_size)
    if len(items) != n or vectors.shape != (n, manifest.encoder.dim) or in_index != n:
        raise ReleaseError(
            f"release {manifest.release_id} is inconsistent: manifest says {n} items, "
            f"items table has {len(items)}, vectors {vectors.shape}, index {in_index}"
        )
    return Bundle(path=bundle_dir, manifest=manifest, index=index, vectors=vectors, items=items,
                  lexical=lexical, file_stats=file_stats)


def current_bundle_dir(releases_dir: Path) -> Path:
    pointer = read_pointer(releases_dir)
    if pointer is None:
        raise ReleaseError(
            f"no release has been published under {releases_dir}; run `instantrec build` first"
        )
    return releases_dir / pointer.release_id


def _annoy_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("annoy")
    except PackageNotFoundError:
        return None
