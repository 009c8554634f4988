"""The dense channel's nearest-neighbour search: an Annoy index, plus, in a delta release, an
exact search over the items the index does not hold.

A full release's Annoy index holds every item, Annoy item i == row i. A refresh that changes a
small share of the catalogue keeps the previous release's Annoy file (hard-linked, not rebuilt)
and writes two small arrays beside it:

* ``index_rows.npy`` (int32, one per Annoy item): the release row of that Annoy item, or -1
  when the item is delisted or its vector changed since the index was built;
* ``delta_rows.npy`` (int32): the release rows the index does not hold (new items and items
  whose vector changed), searched exactly (one small matrix product per query).

Every release row is either an Annoy item's image or a delta row, never both; the loader checks
this. Rebuilding Annoy from scratch is left to the refresh that finds the delta or the dropped
items past their limits (:mod:`pipelines.catalogue.index`).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VectorIndex:
    annoy: object                  # annoy.AnnoyIndex, memory-mapped
    vectors: np.ndarray            # float32 (n, dim) unit vectors of the release, row order
    search_k: int
    index_rows: np.ndarray | None = None   # int32 (annoy items,): release row or -1
    delta_rows: np.ndarray | None = None   # int32 (d,): rows searched exactly
    delta_vectors: np.ndarray | None = None  # float32 (d, dim), vectors[delta_rows]
    dropped: int = 0               # Annoy items no longer in the release (delisted or changed)

    @classmethod
    def full(cls, annoy: object, vectors: np.ndarray, search_k: int) -> VectorIndex:
        return cls(annoy, vectors, search_k)

    @classmethod
    def delta(cls, annoy: object, vectors: np.ndarray, search_k: int, index_rows: np.ndarray,
              delta_rows: np.ndarray) -> VectorIndex:
        """A delta index; raises ValueError when the rows do not partition the release."""
        n = vectors.shape[0]
        index_rows = np.asarray(index_rows, dtype=np.int32)
        delta_rows = np.asarray(delta_rows, dtype=np.int32)
        if index_rows.shape != (annoy.get_n_items(),):
            raise ValueError(f"index_rows has {index_rows.shape[0]} entries, the Annoy index "
                             f"{annoy.get_n_items()} items")
        live = index_rows[index_rows >= 0]
        if ((live >= n).any() or (index_rows < -1).any() or (delta_rows < 0).any()
                or (delta_rows >= n).any()):
            raise ValueError(f"index_rows/delta_rows name rows outside 0..{n - 1}")
        cover = np.bincount(np.concatenate([live, delta_rows]), minlength=n)
        if (cover != 1).any():
            bad = int(np.flatnonzero(cover != 1)[0])
            raise ValueError(f"release row {bad} is covered {int(cover[bad])} times by the "
                             "Annoy index and the delta (must be exactly once)")
        return cls(annoy, vectors, search_k, index_rows, delta_rows,
                   np.ascontiguousarray(vectors[delta_rows], dtype=np.float32),
                   int((index_rows < 0).sum()))

    @property
    def n_items(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def delta_size(self) -> int:
        return 0 if self.delta_rows is None else len(self.delta_rows)

    def nearest(self, qvec: np.ndarray, fetch: int) -> tuple[list[int], list[float]]:
        """Up to ``fetch`` release rows nearest to the unit vector ``qvec``, best first, with
        their cosine similarities: Annoy's answer (at the release's ``search_k``) merged with
        the exact answer over the delta."""
        rows, sims = self._annoy_part(qvec, fetch)
        if not self.delta_size:
            return rows, sims
        return self._merge(rows, sims, self.delta_vectors @ np.asarray(qvec, np.float32), fetch)

    def nearest_many(self, queries: np.ndarray, fetch: int,
                     threads: int | None = None) -> list[tuple[list[int], list[float]]]:
        """:meth:`nearest` for each row of ``queries``: Annoy searches on ``threads`` threads
        (default one per core; Annoy releases the GIL) and the delta is scored for all
        queries in one matrix product. Scoring the delta per query inside the threads made
        BLAS's own threads fight them: 2.4x slower on a 3,505-item delta."""
        queries = np.asarray(queries, dtype=np.float32)
        workers = max(1, min(len(queries), threads or os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(lambda q: self._annoy_part(q, fetch), queries))
        if not self.delta_size:
            return found
        dsims = queries @ self.delta_vectors.T
        return [self._merge(rows, sims, d, fetch)
                for (rows, sims), d in zip(found, dsims, strict=True)]

    def _annoy_part(self, qvec: np.ndarray, fetch: int) -> tuple[list[int], list[float]]:
        """Annoy's nearest release rows (dropped items left out) and their cosines."""
        n_annoy = self.annoy.get_n_items()
        want = fetch
        if self.dropped:
            # ask for enough to make up, on average, for the dropped items among the answers
            want = fetch + math.ceil(2 * fetch * self.dropped / n_annoy) + 8
        want = min(want, n_annoy)
        ids, dists = self.annoy.get_nns_by_vector(qvec, want, search_k=max(self.search_k, want),
                                                  include_distances=True)
        # Annoy's angular distance is sqrt(2 - 2 cos) on unit vectors.
        sims = [1.0 - d * d / 2.0 for d in dists]
        if self.index_rows is None:
            return ids[:fetch], sims[:fetch]
        mapped = self.index_rows[np.asarray(ids, dtype=np.int64)] if ids else np.empty(0, int)
        keep = [i for i, r in enumerate(mapped) if r >= 0][:fetch]
        return [int(mapped[i]) for i in keep], [sims[i] for i in keep]

    def _merge(self, rows: list[int], sims: list[float], dsims: np.ndarray,
               fetch: int) -> tuple[list[int], list[float]]:
        """Annoy's answer merged with the delta's ``fetch`` best by cosine."""
        take = min(fetch, len(dsims))
        top = np.argpartition(-dsims, take - 1)[:take]
        rows = rows + [int(r) for r in self.delta_rows[top]]
        sims = sims + [float(x) for x in dsims[top]]
        order = sorted(range(len(rows)), key=lambda i: -sims[i])[:fetch]
        return [rows[i] for i in order], [sims[i] for i in order]
