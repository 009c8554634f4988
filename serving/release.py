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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.errors import ReleaseError
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


def read_pointer(releases_dir: Path) -> Pointer | None:
    """The live release, or None when nothing has been published yet."""
    path = releases_dir / POINTER_NAME
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        return Pointer(release_id=str(raw["release_id"]), generation=int(raw["generation"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"release pointer {path} is corrupt: {exc}") from exc


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

    @property
    def release_id(self) -> str:
        return self.manifest.release_id


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
                  lexical=lexical)


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
