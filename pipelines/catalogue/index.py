"""Annoy index building, with n_trees/search_k chosen by measured recall against exact search.

Annoy's default ``search_k`` (n_trees * k) gives poor recall on real embeddings; instead of
guessing, we measure recall@10 against exact top-10 for a sample of queries and keep the
cheapest setting that reaches the target.

A refresh that changes few items does not rebuild Annoy: the release links the live release's
Annoy file and searches the new and changed items exactly beside it (a delta release, see
:mod:`serving.vector_index`), after checking the combined recall on probes. Once the exactly
searched items or the dropped ones pass :data:`DELTA_MAX_SHARE`, the next refresh builds Annoy
afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as pkg_version
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.catalogue.embed import load_vectors
from pipelines.catalogue.warehouse import connect, query_frame
from serving.encoder import DEFAULT_ENCODER_NAME, Encoder
from serving.lexical import LexicalIndex, analyse, analysis_frame
from serving.lexical import signature as lexical_signature
from serving.manifest import (
    EncoderSpec,
    FileEntry,
    IndexSpec,
    LexicalSpec,
    Manifest,
    file_entries,
    write_manifest,
)
from serving.release import (
    DELTA_ROWS_FILE,
    INDEX_FILE,
    INDEX_ROWS_FILE,
    ITEMS_FILE,
    LEXICAL_DIR,
    VECTORS_FILE,
)
from serving.schema import CONTENT_HASH, ITEM_ID
from serving.text import item_text
from serving.vector_index import VectorIndex

log = logging.getLogger(__name__)

TREE_GRID = (8, 16, 32, 64, 128)
# search_k = n_trees x 10 x factor. Past 16 the steps are 1.5x and 1.33x rather than 2x: on
# Home Depot (64 trees) recall@10 on probes went 0.948 at 20,480 -> 0.977 at 40,960, so a
# doubling grid made every query pay for 0.977 when the target asked for 0.95.
SEARCH_K_FACTORS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
TUNING_QUERIES = 500
# A refresh whose catalogue size is within this share of the size the grid last ran at starts
# from the live release's (n_trees, search_k) and only verifies its recall: the grid search
# dominated a small refresh's index step. Beyond it, the grid runs again, so a cheaper setting
# is found when the catalogue has shrunk and the setting never drifts for long.
REUSE_MAX_SIZE_CHANGE = 0.05
# Part of every release id: a bundle written by code with another layout (e.g. before the
# lexical channel, or with its older tokenisation, or an index tuned on easier probes or a
# coarser search_k grid) is rebuilt, not mistaken for the current release of the same catalogue.
BUNDLE_LAYOUT = 5
# Per-dimension noise of the tuning probes (item vectors plus Gaussian noise, renormalised).
# Calibrated on real shopper queries (300 Home Depot development queries, 54,667 items): at
# 0.14 the probes' recall@10 matches the real queries' (0.970 vs 0.969 for the chosen
# setting); the former 0.05 made probes far easier than queries (0.962 on probes, 0.887 on
# real queries), so a release promised recall it did not deliver.
PROBE_NOISE = 0.14
# A refresh keeps the live release's Annoy file while the items searched exactly beside it
# (new and changed since the file was built) and the items it holds that are gone or changed
# each stay within this share of the catalogue, and the delta within DELTA_MAX_ITEMS (each
# query scores the delta exactly). The rebuild costs a refresh about 11% of a full build on
# Home Depot, so it is amortised over as many refreshes as serving tolerates: at 10%, 1% of
# the catalogue changing per refresh averaged 5.0% over the cycle; at 20%, Annoy is rebuilt
# every 19th refresh.
DELTA_MAX_SHARE = 0.20
DELTA_MAX_ITEMS = 20_000
# Probes that check a delta release's recall (a check of a setting tuned before, not a tuning).
DELTA_CHECK_PROBES = 200


@dataclass(frozen=True)
class IndexChoice:
    n_trees: int
    search_k: int
    recall_at_10: float
    tuning: list[dict[str, float]]


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices (len(queries), k) of the k most cosine-similar rows of ``vectors``."""
    sims = queries @ vectors.T
    k = min(k, vectors.shape[0])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, part, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(part, order, axis=1)


def neighbour_recall(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth|."""
    hits = [len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def _build(vectors: np.ndarray, n_trees: int, seed: int,
           on_build: Callable[[int, float], None] | None = None):
    """An Annoy index of ``vectors`` with ``n_trees`` trees; ``on_build(n_trees, seconds)`` is
    told how long it took (e.g. by ``bench ann``)."""
    import annoy

    started = time.perf_counter()
    index = annoy.AnnoyIndex(vectors.shape[1], "angular")
    index.set_seed(seed)
    for i, v in enumerate(vectors):
        index.add_item(i, v)
    index.build(n_trees, n_jobs=1)  # n_jobs=1 keeps the build deterministic for a seed
    if on_build is not None:
        on_build(n_trees, time.perf_counter() - started)
    return index


def _probe(index: object, vectors: np.ndarray, search_k: int, queries: np.ndarray,
           k: int) -> list[list[int]]:
    """Annoy's top ``k`` for each probe, searched as serving searches (on one thread per core:
    Annoy releases the GIL)."""
    return [rows for rows, _ in VectorIndex.full(index, vectors, search_k).nearest_many(queries, k)]


def tune_index(vectors: np.ndarray, seed: int, target: float = 0.95, k: int = 10,
               sample: int = TUNING_QUERIES, reuse: tuple[int, int, int] | None = None,
               noise: float = PROBE_NOISE,
               on_build: Callable[[int, float], None] | None = None):
    """Build indexes over ``vectors`` and return (index, choice) for the cheapest setting
    whose recall@k against exact search on a query sample reaches ``target``.

    The sample is item vectors mixed with noise (:data:`PROBE_NOISE`), so queries are near
    but not on items, and about as hard for the index as real queries.
    ``reuse`` = (n_trees, search_k, items the grid last ran at), from the live release: that
    setting is built and measured on the same query sample first, and kept if it reaches
    ``target``; otherwise the grid continues upward from it (larger ``search_k`` on the index
    just built, then more trees), since fewer trees or a smaller ``search_k`` fell short
    already.
    """
    n = vectors.shape[0]
    rng = np.random.default_rng(seed)
    pick = rng.choice(n, size=min(sample, n), replace=False)
    queries = vectors[pick] + rng.normal(0, noise, size=(len(pick), vectors.shape[1]))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    truth = exact_top_k(vectors, queries, k)
    tuning: list[dict[str, float]] = []
    best = None
    start_trees, start_search_k, built = 0, 0, None
    if reuse is not None:
        n_trees, search_k, tuned_at = reuse
        index = _build(vectors, n_trees, seed, on_build)
        found = _probe(index, vectors, search_k, queries, k)
        recall = neighbour_recall(found, truth)
        point = {"n_trees": n_trees, "search_k": search_k, "recall_at_10": recall,
                 "reused_from_items": tuned_at}
        if recall >= target:
            log.info("index: reused n_trees=%d search_k=%d, recall@10=%.3f", n_trees, search_k,
                     recall)
            return index, IndexChoice(n_trees, search_k, recall, [point])
        log.info("index: reused setting reached recall %.3f < %.2f; tuning on from it", recall,
                 target)
        tuning.append(point)
        start_trees, start_search_k, built = n_trees, search_k, index
    for n_trees in TREE_GRID:
        if n_trees < start_trees:
            continue
        index = built if built is not None and n_trees == start_trees else _build(
            vectors, n_trees, seed, on_build)
        for factor in SEARCH_K_FACTORS:
            search_k = n_trees * k * factor
            if n_trees == start_trees and search_k <= start_search_k:
                continue
            found = _probe(index, vectors, search_k, queries, k)
            recall = neighbour_recall(found, truth)
            tuning.append({"n_trees": n_trees, "search_k": search_k, "recall_at_10": recall})
            if recall >= target:
                best = (index, IndexChoice(n_trees, search_k, recall, tuning))
                break
        if best is not None or search_k >= n:  # search_k >= n already inspects everything
            break
    if best is None:
        log.warning("no Annoy setting reached recall %.2f; using the largest tried", target)
        last = tuning[-1]
        best = (index, IndexChoice(int(last["n_trees"]), int(last["search_k"]),
                                   last["recall_at_10"], tuning))
    log.info("index: n_trees=%d search_k=%d recall@10=%.3f", best[1].n_trees, best[1].search_k,
             best[1].recall_at_10)
    return best


def _live_release(releases_dir: Path, encoder: Encoder, seed: int,
                  target: float) -> tuple[Path, Manifest] | None:
    """The live release's directory and manifest, when it was built with the same encoder,
    seed and recall target (so its Annoy setting and vectors carry over); else None."""
    from serving.manifest import read_manifest
    from serving.release import read_pointer

    try:
        pointer = read_pointer(releases_dir)
        if pointer is None:
            return None
        live_dir = releases_dir / pointer.release_id
        live = read_manifest(live_dir, verify_files=False)
    except Exception as exc:  # noqa: BLE001 - no usable live release: build from scratch
        log.info("index: no live release to build on (%s)", exc)
        return None
    spec = live.index
    if (spec.seed, spec.recall_target) != (seed, target) or (
            live.encoder.name, live.encoder.revision, live.encoder.max_tokens) != (
            encoder.name, encoder.revision, encoder.max_length):
        return None
    return live_dir, live


def _tuned_at(live: Manifest) -> int:
    """Items the live release's Annoy grid last ran at."""
    tuning = live.index.tuning
    return int(tuning[-1].get("reused_from_items", live.item_count)) if tuning \
        else live.item_count


def reusable_setting(live: Manifest, n_items: int) -> tuple[int, int, int] | None:
    """(n_trees, search_k, items the grid last ran at) of the ``live`` release (one
    :func:`_live_release` accepted), when its grid ran over a catalogue within
    :data:`REUSE_MAX_SIZE_CHANGE` of ``n_items``; else None."""
    tuned_at = _tuned_at(live)
    if abs(n_items - tuned_at) > REUSE_MAX_SIZE_CHANGE * tuned_at:
        return None
    return live.index.n_trees, live.index.search_k, tuned_at


@dataclass(frozen=True)
class DeltaPlan:
    """How a refresh keeps the live release's Annoy file (see :mod:`serving.vector_index`)."""

    base_release: str          # the release whose build wrote the Annoy file
    annoy_file: Path           # the live release's copy (a link to the base's)
    annoy_entry: FileEntry     # its manifest entry: the same bytes
    index_rows: np.ndarray     # int32 per Annoy item: row in the new release, -1 = gone
    delta_rows: np.ndarray     # int32: new release rows searched exactly
    n_trees: int
    search_k: int
    tuned_at: int

    @property
    def dropped(self) -> int:
        return int((self.index_rows < 0).sum())


def plan_delta(live_dir: Path, live: Manifest, items: pl.DataFrame,
               vectors: np.ndarray) -> DeltaPlan | None:
    """A :class:`DeltaPlan` for ``items``/``vectors`` on top of the live release (one
    :func:`_live_release` accepted), or None when its Annoy file cannot be used here or the
    delta or the dropped items would pass :data:`DELTA_MAX_SHARE` (then Annoy is built afresh).

    An Annoy item stays searchable when its item is still listed with a bit-identical vector;
    every other row of the new release goes to the exact delta.
    """
    if live.libraries.get("annoy") != library_versions()["annoy"] or INDEX_FILE not in live.files:
        return None
    live_items = pl.read_parquet(live_dir / ITEMS_FILE, columns=[ITEM_ID])
    live_vectors = np.load(live_dir / VECTORS_FILE, mmap_mode="r")
    if live_vectors.shape[1] != vectors.shape[1]:
        return None
    pairs = (live_items.with_row_index("live_row")
             .join(items.select(ITEM_ID).with_row_index("new_row"), on=ITEM_ID))
    live_rows = pairs["live_row"].to_numpy().astype(np.int64)
    new_rows = pairs["new_row"].to_numpy().astype(np.int64)
    same = (np.asarray(live_vectors[live_rows]) == vectors[new_rows]).all(axis=1)
    new_of_live = np.full(live.item_count, -1, dtype=np.int32)
    new_of_live[live_rows[same]] = new_rows[same]
    if live.index.base_release is None:
        live_of_base = np.arange(live.item_count, dtype=np.int32)
        base = live.release_id
    else:
        live_of_base = np.load(live_dir / INDEX_ROWS_FILE)
        base = live.index.base_release
    index_rows = np.where(live_of_base >= 0, new_of_live[np.maximum(live_of_base, 0)],
                          -1).astype(np.int32)
    covered = np.zeros(items.height, dtype=bool)
    covered[index_rows[index_rows >= 0]] = True
    delta_rows = np.flatnonzero(~covered).astype(np.int32)
    plan = DeltaPlan(base, live_dir / INDEX_FILE, live.files[INDEX_FILE], index_rows, delta_rows,
                     live.index.n_trees, live.index.search_k, _tuned_at(live))
    limit = DELTA_MAX_SHARE * items.height
    if len(delta_rows) > min(limit, DELTA_MAX_ITEMS) or plan.dropped > DELTA_MAX_SHARE * len(
            index_rows):
        log.info("index: delta of %d items, %d dropped from Annoy's %d: past the %.0f%% limit, "
                 "building Annoy afresh", len(delta_rows), plan.dropped, len(index_rows),
                 100 * DELTA_MAX_SHARE)
        return None
    return plan


def check_delta(plan: DeltaPlan, vectors: np.ndarray, seed: int, target: float,
                k: int = 10, sample: int = DELTA_CHECK_PROBES,
                noise: float = PROBE_NOISE) -> IndexChoice | None:
    """Recall@k of the delta index against exact search on probes like :func:`tune_index`'s;
    an :class:`IndexChoice` when it reaches ``target``, else None."""
    import annoy

    ann = annoy.AnnoyIndex(vectors.shape[1], "angular")
    ann.load(str(plan.annoy_file))
    try:
        index = VectorIndex.delta(ann, vectors, plan.search_k, plan.index_rows, plan.delta_rows)
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
        queries = vectors[pick] + rng.normal(0, noise, size=(len(pick), vectors.shape[1]))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        truth = exact_top_k(vectors, queries, k)
        recall = neighbour_recall([rows for rows, _ in index.nearest_many(queries, k)], truth)
    finally:
        ann.unload()
    point = {"n_trees": plan.n_trees, "search_k": plan.search_k, "recall_at_10": recall,
             "reused_from_items": plan.tuned_at, "delta_items": len(plan.delta_rows),
             "dropped_items": plan.dropped, "probes": len(pick)}
    log.info("index: delta of %d items beside %s's Annoy (%d dropped): recall@10=%.3f",
             len(plan.delta_rows), plan.base_release, plan.dropped, recall)
    return IndexChoice(plan.n_trees, plan.search_k, recall, [point]) if recall >= target \
        else None


def release_id_for(items: pl.DataFrame, encoder_version: str, seed: int, target: float) -> str:
    """Deterministic from the inputs: same catalogue state + encoder + settings, same id."""
    rows = items.select(ITEM_ID, CONTENT_HASH, "price", "in_stock").rows()
    return hashlib.sha256(json.dumps([BUNDLE_LAYOUT, encoder_version, seed, target, rows])
                          .encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    return {name: pkg_version(name) for name in ("annoy", "numpy", "polars", "duckdb",
                                                  "torch", "transformers")}


def build_lexical(items: pl.DataFrame, directory: Path,
                  warehouse: Path | None = None) -> list[str]:
    """BM25 over the same item text the vectors were computed from; returns the bundle-relative
    names of the files written.

    With ``warehouse``, each item's text analysis (tokens and surface words, the costly part)
    is read from and added to its ``lexical_analysis`` table, keyed by content hash and
    analysis signature, so a refresh analyses only new and changed items; the index built from
    cached analyses is the same as one built from scratch.
    """
    directory.mkdir(parents=True)
    if warehouse is None:
        LexicalIndex.build([item_text(t, b, c, d) for t, b, c, d in
                            items.select("title", "brand", "category", "description")
                            .iter_rows()]).save(directory)
    else:
        LexicalIndex.from_analysis(_cached_analysis(items, warehouse)).save(directory)
    return sorted(f"{directory.name}/{p.name}" for p in directory.iterdir())


def _cached_analysis(items: pl.DataFrame, warehouse: Path) -> pl.DataFrame:
    """Each item's :func:`serving.lexical.analyse` result (columns ``tokens``, ``words``, in
    item order), from the warehouse where its content was analysed before (same signature),
    computed and stored otherwise."""
    sig = lexical_signature()
    con = connect(warehouse)
    try:
        con.register("wanted", items.select(pl.col(CONTENT_HASH).unique()))
        cached = query_frame(con, """SELECT a.content_hash, a.tokens, a.words
            FROM lexical_analysis a JOIN wanted w USING (content_hash)
            WHERE a.analysis = ?""", [sig])
        rows = items.select(CONTENT_HASH, "title", "brand", "category", "description").join(
            cached, on=CONTENT_HASH, how="left", maintain_order="left")
        missing = rows["tokens"].null_count()
        todo = rows.filter(pl.col("tokens").is_null()).unique(CONTENT_HASH,
                                                              maintain_order=True)
        if todo.height:
            fresh = analysis_frame(analyse([item_text(t, b, c, d) for t, b, c, d in todo.select(
                "title", "brand", "category", "description").iter_rows()]))
            fresh = fresh.with_columns(todo[CONTENT_HASH])
            con.register("fresh", fresh)
            con.execute("""INSERT OR IGNORE INTO lexical_analysis
                           SELECT content_hash, ?, tokens, words FROM fresh""", [sig])
            # analyses of content no item has any more (and of other signatures) go
            con.execute("""DELETE FROM lexical_analysis WHERE analysis <> ?
                           OR content_hash NOT IN (SELECT content_hash FROM items)""", [sig])
            rows = rows.drop("tokens", "words").join(fresh.vstack(cached.select(
                "tokens", "words", CONTENT_HASH)), on=CONTENT_HASH, how="left",
                maintain_order="left")
        log.info("BM25 analysis: %d items analysed, %d from the warehouse", missing,
                 items.height - missing)
    finally:
        con.close()
    return rows.select("tokens", "words")


def build_index(warehouse: Path, releases_dir: Path, encoder: Encoder, seed: int = 42,
                recall_target: float = 0.95) -> Path:
    """Build a release bundle for the current catalogue into ``releases_dir/.staging``.

    Returns the staged bundle directory (or the published one, when this exact release was
    already published: a retried run does not build it twice).
    """
    items, vectors = load_vectors(warehouse, encoder.version)
    if items.height == 0:
        raise ValueError("the warehouse has no active items; ingest a catalogue first")
    release_id = release_id_for(items, encoder.version, seed, recall_target)
    final = releases_dir / release_id
    if (final / "manifest.json").is_file():
        log.info("release %s already published; nothing to build", release_id)
        return final
    live = _live_release(releases_dir, encoder, seed, recall_target)
    reuse = reusable_setting(live[1], items.height) if live is not None else None
    delta = plan_delta(*live, items, vectors) if live is not None else None
    return write_bundle(items, vectors, releases_dir / ".staging" / release_id, release_id,
                        encoder, seed, recall_target, reuse, warehouse, delta)


def write_bundle(items: pl.DataFrame, vectors: np.ndarray, staged: Path, release_id: str,
                 encoder: Encoder, seed: int = 42, recall_target: float = 0.95,
                 reuse: tuple[int, int, int] | None = None,
                 warehouse: Path | None = None, delta: DeltaPlan | None = None) -> Path:
    """Write a complete release bundle for ``items`` (the warehouse's item columns, sorted by
    id) and their ``vectors`` into ``staged``: the tuned Annoy index, the vectors, BM25, the
    item table and the manifest. ``warehouse`` caches BM25 text analysis (see
    :func:`build_lexical`). With ``delta`` (see :func:`plan_delta`), the bundle links the live
    release's Annoy file and searches the delta exactly, when their recall on probes reaches
    ``recall_target``; otherwise Annoy is tuned and built as without it. Returns ``staged``."""
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    choice = check_delta(delta, vectors, seed, recall_target) if delta is not None else None
    if choice is not None:
        _link_or_copy(delta.annoy_file, staged / INDEX_FILE)
        np.save(staged / INDEX_ROWS_FILE, delta.index_rows)
        np.save(staged / DELTA_ROWS_FILE, delta.delta_rows)
        delta_files = [INDEX_ROWS_FILE, DELTA_ROWS_FILE]
        annoy_entry = {INDEX_FILE: delta.annoy_entry}
        delta_spec = {"base_release": delta.base_release, "delta_items": len(delta.delta_rows),
                      "dropped_items": delta.dropped}
    else:
        if delta is not None:
            log.info("index: the delta fell short of recall %.2f; building Annoy afresh",
                     recall_target)
        index, choice = tune_index(vectors, seed, recall_target, reuse=reuse)
        index.save(str(staged / INDEX_FILE))
        index.unload()
        delta_files, annoy_entry, delta_spec = [], file_entries(staged, [INDEX_FILE]), {}
    np.save(staged / VECTORS_FILE, vectors)
    lexical_files = build_lexical(items, staged / LEXICAL_DIR, warehouse)
    items.select(ITEM_ID, "title", "category", "brand", "price", "in_stock",
                 CONTENT_HASH).write_parquet(staged / ITEMS_FILE)
    digest = hashlib.sha256(b"".join(
        f"{i}:{h}".encode() for i, h in items.select(ITEM_ID, CONTENT_HASH).iter_rows()
    )).hexdigest()[:16]
    manifest = Manifest(
        release_id=release_id,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        item_count=items.height,
        catalogue_digest=digest,
        encoder=EncoderSpec(name=encoder.name, revision=encoder.revision, dim=encoder.dim,
                            max_tokens=encoder.max_length,
                            path=None if encoder.name == DEFAULT_ENCODER_NAME
                            else str(encoder.path.resolve())),
        index=IndexSpec(n_trees=choice.n_trees, search_k=choice.search_k, seed=seed,
                        recall_at_10=choice.recall_at_10, recall_target=recall_target,
                        tuning=choice.tuning, **delta_spec),
        lexical=LexicalSpec(),
        files=annoy_entry | file_entries(staged, [VECTORS_FILE, ITEMS_FILE, *delta_files,
                                                  *lexical_files]),
        libraries=library_versions(),
    )
    write_manifest(staged, manifest)
    log.info("staged release %s with %d items at %s", release_id, items.height, staged)
    return staged


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` (releases are immutable, so sharing the bytes is safe and costs
    nothing); copy where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
