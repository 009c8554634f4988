"""What shop applications import: load the live release and answer requests.

The live state (bundle + encoder) is one immutable object; a reload builds the next one aside
and swaps the reference, so requests running on the old state finish undisturbed and a
release that fails to load never replaces a working one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.encoder import Encoder
from serving.errors import FilterError, InvalidInputError, ReleaseError
from serving.manifest import Manifest
from serving.release import Bundle, current_bundle_dir, load_bundle, read_pointer
from serving.settings import Settings
from serving.text import normalise_query

log = logging.getLogger(__name__)

MAX_K = 1000


@dataclass(frozen=True)
class Filters:
    """Business filters. ``categories`` matches exactly (any of); prices are inclusive."""

    categories: frozenset[str] | None = None
    min_price: float | None = None
    max_price: float | None = None
    in_stock: bool | None = None

    FIELDS = ("category", "min_price", "max_price", "in_stock")

    @classmethod
    def parse(cls, raw: Filters | Mapping[str, Any] | None) -> Filters | None:
        """Validate a filter mapping; raises :class:`FilterError` naming the bad field."""
        if raw is None or isinstance(raw, Filters):
            return raw
        if not isinstance(raw, Mapping):
            raise FilterError(f"filters must be a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(cls.FIELDS))
        if unknown:
            raise FilterError(
                f"unknown filter field(s) {unknown}; known fields are {list(cls.FIELDS)}"
            )
        cats = raw.get("category")
        if cats is not None:
            cats = [cats] if isinstance(cats, str) else cats
            if not isinstance(cats, list | tuple | set | frozenset) or not all(
                isinstance(c, str) and c for c in cats
            ):
                raise FilterError("filter 'category' must be a non-empty string or list of them")
            cats = frozenset(cats)
        prices = {}
        for name in ("min_price", "max_price"):
            value = raw.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(
                    value
                ) or value < 0:
                    raise FilterError(f"filter '{name}' must be a non-negative number, got {value!r}")
                prices[name] = float(value)
        if prices.get("min_price", 0.0) > prices.get("max_price", float("inf")):
            raise FilterError(
                f"filter min_price {prices['min_price']} is above max_price {prices['max_price']}"
            )
        stock = raw.get("in_stock")
        if stock is not None and not isinstance(stock, bool):
            raise FilterError(f"filter 'in_stock' must be true or false, got {stock!r}")
        return cls(categories=cats, in_stock=stock, **prices)

    def mask(self, bundle: Bundle) -> np.ndarray:
        items = bundle.items
        keep = np.ones(len(items), dtype=bool)
        if self.categories is not None:
            keep &= np.isin(items.categories, list(self.categories))
        if self.min_price is not None:
            keep &= items.prices >= self.min_price  # NaN (unknown price) fails both bounds
        if self.max_price is not None:
            keep &= items.prices <= self.max_price
        if self.in_stock is not None:
            keep &= items.in_stock == self.in_stock
        return keep


@dataclass(frozen=True)
class Recommendation:
    """One result: the item, its final score, and the signals the score was made of."""

    item_id: str
    title: str
    score: float
    rank: int
    category: str | None
    brand: str | None
    price: float | None
    in_stock: bool
    signals: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id, "title": self.title, "score": self.score, "rank": self.rank,
            "category": self.category, "brand": self.brand, "price": self.price,
            "in_stock": self.in_stock, "signals": dict(self.signals),
        }


@dataclass(frozen=True)
class _State:
    bundle: Bundle
    encoder: Encoder
    generation: int


class Recommender:
    """Answers ``recommend(query, k, filters)`` from the live release; thread-safe.

    Use :meth:`load` for a home directory with a release pointer (hot reload on), or
    :meth:`from_bundle` for one fixed bundle directory (e.g. inside a registered model).
    """

    def __init__(self, state: _State, settings: Settings, releases_dir: Path | None) -> None:
        self._state = state
        self._settings = settings
        self._releases_dir = releases_dir
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.counters: Counter[str] = Counter()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def load(cls, home: Path | str | None = None, *, settings: Settings | None = None,
             encoder: Encoder | None = None, watch: bool = True) -> Recommender:
        """Load the live release under ``home`` (default: settings.home).

        With ``watch``, a background thread follows the release pointer every
        ``settings.reload_interval_s`` seconds and swaps in new releases.
        """
        settings = settings or Settings()
        if home is not None:
            settings = settings.model_copy(update={"home": Path(home)})
        releases_dir = settings.releases_dir
        pointer = read_pointer(releases_dir)
        bundle = load_bundle(current_bundle_dir(releases_dir))
        state = _State(bundle, _encoder_for(bundle, settings, encoder),
                       pointer.generation if pointer else 0)
        rec = cls(state, settings, releases_dir)
        if watch:
            rec._watcher = threading.Thread(target=rec._watch, name="instantrec-reload",
                                            daemon=True)
            rec._watcher.start()
        log.info("serving release %s (%d items)", bundle.release_id, bundle.manifest.item_count)
        return rec

    @classmethod
    def from_bundle(cls, bundle_dir: Path | str, *, settings: Settings | None = None,
                    encoder: Encoder | None = None) -> Recommender:
        """Serve one fixed bundle directory, without following any pointer."""
        settings = settings or Settings()
        bundle = load_bundle(Path(bundle_dir))
        return cls(_State(bundle, _encoder_for(bundle, settings, encoder), 0), settings, None)

    # -- requests -----------------------------------------------------------------------

    @property
    def release_id(self) -> str:
        return self._state.bundle.release_id

    @property
    def bundle(self) -> Bundle:
        """The release being served right now."""
        return self._state.bundle

    @property
    def manifest(self) -> Manifest:
        return self._state.bundle.manifest

    @property
    def settings(self) -> Settings:
        return self._settings

    def recommend(self, query: str, k: int = 10,
                  filters: Filters | Mapping[str, Any] | None = None) -> list[Recommendation]:
        """Top ``k`` items for ``query`` after ``filters``, best first.

        Raises :class:`InvalidInputError` (QueryError / FilterError) naming the problem;
        rejected requests are counted in :attr:`counters`.
        """
        try:
            text = normalise_query(query, self._settings.max_query_chars)
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
                raise InvalidInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
            parsed = Filters.parse(filters)
        except InvalidInputError as exc:
            self.counters[f"rejected_{type(exc).__name__}"] += 1
            raise
        state = self._state  # one consistent snapshot for the whole request
        qvec = state.encoder.encode_query(text)
        rows, sims = _search(state.bundle, qvec, k, parsed)
        self.counters["requests"] += 1
        items = state.bundle.items
        out = []
        for rank, (row, sim) in enumerate(zip(rows, sims, strict=True), start=1):
            price = float(items.prices[row])
            out.append(Recommendation(
                item_id=str(items.item_ids[row]), title=str(items.titles[row]),
                score=float(sim), rank=rank, category=items.categories[row],
                brand=items.brands[row], price=None if np.isnan(price) else price,
                in_stock=bool(items.in_stock[row]),
                signals={"dense_cosine": float(sim)},
            ))
        return out

    # -- hot reload ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Follow the pointer now; returns True if a new release was swapped in.

        A release that fails to load is logged and counted, and the current one keeps serving.
        """
        if self._releases_dir is None:
            return False
        with self._reload_lock:
            try:
                pointer = read_pointer(self._releases_dir)
                if pointer is None or pointer.release_id == self._state.bundle.release_id:
                    return False
                bundle = load_bundle(self._releases_dir / pointer.release_id)
                encoder = _encoder_for(bundle, self._settings, self._state.encoder)
            except Exception as exc:  # noqa: BLE001 - a bad release must never stop serving
                self.counters["reload_failures"] += 1
                log.error("keeping release %s: new release failed to load: %s",
                          self._state.bundle.release_id, exc)
                return False
            self._state = _State(bundle, encoder, pointer.generation)
            self.counters["reloads"] += 1
            log.info("now serving release %s", bundle.release_id)
            return True

    def _watch(self) -> None:
        while not self._stop.wait(self._settings.reload_interval_s):
            self.reload()

    def close(self) -> None:
        """Stop following the pointer (requests keep working on the current release)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def __enter__(self) -> Recommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encoder_for(bundle: Bundle, settings: Settings, current: Encoder | None) -> Encoder:
    """The encoder a bundle was built with: reuse ``current`` when it matches."""
    spec = bundle.manifest.encoder
    encoder = current
    if encoder is None or encoder.revision != spec.revision:
        encoder = Encoder(settings.encoder_path, max_length=spec.max_tokens)
    if encoder.revision != spec.revision or encoder.dim != spec.dim:
        raise ReleaseError(
            f"release {bundle.release_id} was built with encoder {spec.name} rev {spec.revision} "
            f"(dim {spec.dim}); the configured encoder is rev {encoder.revision} (dim {encoder.dim})"
        )
    return encoder


def _search(bundle: Bundle, qvec: np.ndarray, k: int,
            filters: Filters | None) -> tuple[list[int], list[float]]:
    """ANN search with over-fetch under filters; exact search over the filtered subset when
    the filters are too selective for over-fetching to fill ``k``."""
    n = len(bundle.items)
    search_k = bundle.manifest.index.search_k
    mask = filters.mask(bundle) if filters is not None else None
    allowed = n if mask is None else int(mask.sum())
    want = min(k, allowed)
    if want == 0:
        return [], []
    fetch = min(n, k if mask is None else 4 * k)
    while True:
        rows, dists = bundle.index.get_nns_by_vector(
            qvec, fetch, search_k=max(search_k, fetch), include_distances=True)
        if mask is not None:
            kept = [(r, d) for r, d in zip(rows, dists, strict=True) if mask[r]]
        else:
            kept = list(zip(rows, dists, strict=True))
        if len(kept) >= want:
            kept = kept[:want]
            # Annoy's angular distance is sqrt(2 - 2 cos) on unit vectors.
            return [r for r, _ in kept], [1.0 - d * d / 2.0 for _, d in kept]
        if fetch >= n or fetch >= 64 * k:
            break
        fetch = min(n, fetch * 4)
    idx = np.flatnonzero(mask) if mask is not None else np.arange(n)
    sims = np.asarray(bundle.vectors[idx] @ qvec)
    top = np.argsort(-sims, kind="stable")[:want]
    return [int(idx[i]) for i in top], [float(sims[i]) for i in top]
