"""The learned ranker: a logistic model over retrieval candidates, trained online on top of a
batch-trained relevance model.

For query vector q, candidate item x (both unit vectors), session interest s and the item's
BM25 score for the query relative to the query's best BM25 score (``lex``, in [0, 1])::

    dense(q, x)  = q.x + (V^T q).(U^T x)          low-rank query adapter, identity at U = 0
    z            = w_dense * dense + w_session * (s.x) + w_lexical * lex
                   + b_item + b_query,item + b0

    p(click)     = sigmoid(z)

Once the batch retrain has fitted a relevance model on judged queries
(:mod:`serving.relevance`: a learned fusion of the two channels, then ridge and trees over the
channel and match features), its score ``rel`` (in logits) stands in for the zero-shot
channel terms::

    z            = rel(q, x) + w_session * (s.x) + b_item + b_query,item + b0

and the online terms learn on top of it. ``instantrec eval`` reports that model as ``ranker``.

``b_query,item`` is a sparse memory keyed by (normalised query, item): what shoppers who typed
exactly this query chose. It moves a seen query's results without touching any other query's,
which the shared parameters cannot do. Measured with simulated feedback (``instantrec
simulate``), every shared parameter that ranks learned from clicks cost, on some data set, the
queries that never got feedback: the query adapter (CrowdFlower unseen -0.060 nDCG@10), the
per-item biases (CrowdFlower -0.004) and the channel weights ``w`` (Home Depot -0.017, while
they helped CrowdFlower by +0.003). Clicks on a page are position-biased, and a shared
parameter carries that bias to every query, so by default online learning moves only the
(query, item) memory and the intercept ``b0`` (which ranks nothing but keeps p(click)
calibrated); ``adapter_online``, ``item_bias_online`` and ``weights_online`` turn the others on.

Trained with binary cross-entropy; each online step is
``theta <- theta - eta_t * (grad L + lambda * (theta - theta0))`` with AdaGrad per-coordinate
step sizes ``eta_t = eta / sqrt(G_t + eps)``, regularised toward the starting point theta0 (the
zero-shot model), so sparse feedback cannot drag it far from what retrieval already knows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import ReleaseError, StorageError
from serving.failpoints import failpoint
from serving.relevance import RelevanceModel

PARAMS = ("U", "V", "w", "b0", "item_bias")
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class RankerConfig:
    rank: int = 8
    lr: float = 0.05
    l2: float = 1e-4
    eps: float = 1e-8
    init_w_dense: float = 10.0
    init_w_session: float = 3.0
    # Zero-shot fusion of the two channels: 10 * cosine against 4 * relative BM25 weighs them
    # about as the data README's 50/50 min-max fusion does (cosines of a query's candidates
    # spread over ~0.4), which beat either channel alone on the development queries.
    init_w_lexical: float = 4.0
    adapter_online: bool = False     # update U, V in step(); see the module docstring
    item_bias_online: bool = False   # update item_bias in step(); see the module docstring
    weights_online: bool = False     # update the channel weights w in step(); likewise
    max_query_items: int = 2_000_000 # bound on the (query, item) memory
    # The memory learns faster than the shared parameters: each entry sees only its own
    # query's feedback, so it cannot hurt other queries. Measured with simulated feedback on
    # CrowdFlower (the only parameter learning online): seen queries +0.097 at 0.3, +0.108 at
    # 0.5, +0.091 at 1.0 (overshoots).
    query_item_lr: float = 0.5
    init_b0: float = -5.0
    seed: int = 0


@dataclass
class CheckpointMeta:
    """What a ranker checkpoint records beside its parameters (JSON inside the checkpoint)."""

    offset: int | None = None           # the last event-log offset the parameters include
    applied: int = 0                    # events applied since the ranker started
    ledger: str = ""                    # running sha256 over the applied event ids, in order
    counters: dict[str, int] = field(default_factory=dict)   # the updater's counters
    warm_from: int | None = None        # a restarted updater replays from here, learning nothing
    published_at: float | None = None   # when the updater published it (unix seconds)
    retrain_offset: int | None = None   # a batch retrain: the log offset it trained up to,
    retrain_version: int | None = None  # its MLflow model version,
    retrain_examples: int | None = None  # and how many examples it trained on
    extra: dict[str, Any] = field(default_factory=dict)      # anything else (e.g. a benchmark's)

    def to_json(self) -> dict[str, Any]:
        named = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "extra" and getattr(self, f.name) is not None}
        return {**self.extra, **named}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointMeta:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def copy(self) -> CheckpointMeta:
        return dataclasses.replace(self, counters=dict(self.counters), extra=dict(self.extra))


@dataclass
class Ranker:
    """Parameters, their starting point and AdaGrad accumulators, for one release's items."""

    release_id: str
    U: np.ndarray          # (d, r)
    V: np.ndarray          # (d, r)
    w: np.ndarray          # (3,) [dense, session, lexical]
    b0: np.ndarray         # (1,)
    item_bias: np.ndarray  # (n_items,)
    init: dict[str, np.ndarray]
    accum: dict[str, np.ndarray]
    config: RankerConfig = field(default_factory=RankerConfig)
    meta: CheckpointMeta = field(default_factory=lambda: CheckpointMeta())
    # (query key, item row) -> [value, AdaGrad accumulator]
    query_item: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    # trained by the batch retrain on judged queries; None: the zero-shot channel fusion
    relevance: RelevanceModel | None = None

    @classmethod
    def initial(cls, release_id: str, dim: int, n_items: int,
                config: RankerConfig | None = None) -> Ranker:
        cfg = config or RankerConfig()
        rng = np.random.default_rng(cfg.seed)
        params = {
            "U": np.zeros((dim, cfg.rank)),
            "V": rng.normal(0.0, 1.0 / np.sqrt(dim), size=(dim, cfg.rank)),
            "w": np.array([cfg.init_w_dense, cfg.init_w_session, cfg.init_w_lexical]),
            "b0": np.array([cfg.init_b0]),
            "item_bias": np.zeros(n_items),
        }
        return cls(release_id=release_id, **params,
                   init={k: v.copy() for k, v in params.items()},
                   accum={k: np.zeros_like(v) for k, v in params.items()}, config=cfg)

    # -- scoring ------------------------------------------------------------------------

    def features(self, q: np.ndarray, X: np.ndarray, s: np.ndarray | None,
                 lex: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-candidate signals for query ``q`` (d,), candidates ``X`` (n, d), session ``s``
        and relative BM25 scores ``lex`` (n,)."""
        cos = X @ q
        adapter = (X @ self.U) @ (self.V.T @ q)
        session = X @ s if s is not None else np.zeros(len(X))
        lexical = np.asarray(lex, dtype=np.float64) if lex is not None else np.zeros(len(X))
        return {"dense_cosine": cos, "adapter": adapter, "session_affinity": session,
                "lexical": lexical}

    def logits(self, q: np.ndarray, X: np.ndarray, s: np.ndarray | None, rows: np.ndarray,
               lex: np.ndarray | None = None, qkey: int | None = None,
               rel: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of candidates ``rows``; ``rel`` is the relevance model's score of each
        (:meth:`serving.relevance.RelevanceModel.score`), which then stands in for the
        zero-shot dense and lexical terms."""
        f = self.features(q, X, s, lex)
        qi = np.array([self._qi(qkey, int(r)) for r in rows]) if qkey is not None and \
            self.query_item else np.zeros(len(rows))
        z = (self._retrieval(f["dense_cosine"] + f["adapter"], f["lexical"], rel)
             + self.w[1] * f["session_affinity"] + self.item_bias[rows] + qi + self.b0[0])
        if rel is not None:
            f["relevance"] = np.asarray(rel, dtype=np.float64)
        f["item_bias"] = self.item_bias[rows]
        f["query_item_bias"] = qi
        return z, f

    def _retrieval(self, dense: Any, lex: Any, rel: Any) -> Any:
        """What the query says about the candidate: the relevance model's score, or the
        zero-shot fusion of the dense and lexical channels."""
        if rel is not None:
            return rel
        return self.w[0] * dense + self.w[2] * lex

    def _qi(self, qkey: int | None, row: int) -> float:
        if qkey is None:
            return 0.0
        hit = self.query_item.get((qkey, row))
        return hit[0] if hit is not None else 0.0

    # -- learning -----------------------------------------------------------------------

    def gradients(self, q: np.ndarray, x: np.ndarray, s: np.ndarray | None, row: int,
                  label: float, weight: float = 1.0, lex: float = 0.0,
                  qkey: int | None = None,
                  rel: float | None = None) -> tuple[float, dict[str, np.ndarray]]:
        """Weighted BCE loss of one example and its gradient w.r.t. each parameter
        (item_bias and query_item as the scalar for ``row``). With a relevance score
        ``rel`` the channel terms are replaced by it, and U, V and w get no gradient."""
        a = self.V.T @ q
        b = self.U.T @ x
        dense = float(x @ q + a @ b)
        sess = float(x @ s) if s is not None else 0.0
        z = (self._retrieval(dense, lex, rel) + self.w[1] * sess + self.item_bias[row]
             + self._qi(qkey, row) + self.b0[0])
        p = 1.0 / (1.0 + np.exp(-z))
        loss = -weight * (label * np.log(p + 1e-12) + (1 - label) * np.log(1 - p + 1e-12))
        g = weight * (p - label)
        channel = 0.0 if rel is not None else 1.0  # the relevance score replaces them
        return float(loss), {
            "U": channel * g * self.w[0] * np.outer(x, a),
            "V": channel * g * self.w[0] * np.outer(q, b),
            "w": g * np.array([channel * dense, sess, channel * lex]),
            "b0": np.array([g]),
            "item_bias": np.array([g]),
            "query_item": np.array([g]),
        }

    def step(self, q: np.ndarray, x: np.ndarray, s: np.ndarray | None, row: int,
             label: float, weight: float = 1.0, lex: float = 0.0,
             qkey: int | None = None, rel: float | None = None) -> float:
        """One online AdaGrad step on one example; returns its loss before the step."""
        loss, grads = self.gradients(q, x, s, row, label, weight, lex, qkey, rel)
        cfg = self.config
        for name, g in grads.items():
            if name in ("U", "V") and not cfg.adapter_online:
                continue
            if name == "w" and not cfg.weights_online:
                continue
            if name == "query_item":
                if qkey is None:
                    continue
                entry = self.query_item.get((qkey, row))
                if entry is None:
                    if len(self.query_item) >= cfg.max_query_items:
                        continue
                    entry = self.query_item[(qkey, row)] = [0.0, 0.0]
                gq = g[0] + cfg.l2 * entry[0]
                entry[1] += gq * gq
                entry[0] -= cfg.query_item_lr * gq / np.sqrt(entry[1] + cfg.eps)
                continue
            if name == "item_bias":
                if not cfg.item_bias_online:
                    continue
                g = g[0] + cfg.l2 * (self.item_bias[row] - self.init["item_bias"][row])
                self.accum[name][row] += g * g
                self.item_bias[row] -= cfg.lr * g / np.sqrt(self.accum[name][row] + cfg.eps)
                continue
            param = getattr(self, name)
            g = g + cfg.l2 * (param - self.init[name])
            acc = self.accum[name]
            acc += g * g
            param -= cfg.lr * g / np.sqrt(acc + cfg.eps)
        return loss

    # -- persistence --------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in PARAMS}
        out.update({f"init_{k}": v for k, v in self.init.items()})
        out.update({f"accum_{k}": v for k, v in self.accum.items()})
        keys = list(self.query_item)
        out["qi_keys"] = np.array(keys, dtype=np.int64).reshape(len(keys), 2)
        out["qi_values"] = np.array([self.query_item[k] for k in keys],
                                    dtype=np.float64).reshape(len(keys), 2)
        if self.relevance is not None:
            out.update(self.relevance.to_arrays())
        return out

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        meta = {**self.meta.to_json(), "release_id": self.release_id, "format": CHECKPOINT_FORMAT,
                "config": self.config.__dict__}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as fh:
                np.savez(fh, meta=np.array(json.dumps(meta, sort_keys=True)), **self.to_arrays())
                fh.flush()
                os.fsync(fh.fileno())
            failpoint("checkpoint.saved")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write ranker checkpoint {path}: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> Ranker:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k].copy() for k in data.files if k != "meta"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            # a truncated or overwritten file is a bad checkpoint, not a crash
            raise ReleaseError(f"ranker checkpoint {path} cannot be read: "
                               f"{type(exc).__name__}: {exc}") from exc
        try:
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ReleaseError(f"ranker checkpoint {path} has format {meta.get('format')}")
            config = RankerConfig(**meta.pop("config"))
            if arrays["w"].shape == (2,):  # written before the lexical channel: start it at init
                for key, fill in (("w", config.init_w_lexical), ("init_w", config.init_w_lexical),
                                  ("accum_w", 0.0)):
                    arrays[key] = np.append(arrays[key], fill)
            release_id = meta.pop("release_id")
            meta.pop("format")
            query_item = {}
            if "qi_keys" in arrays:
                query_item = {(int(a), int(b)): [float(v), float(g)] for (a, b), (v, g) in
                              zip(arrays["qi_keys"], arrays["qi_values"], strict=True)}
            return cls(release_id=release_id, **{k: arrays[k] for k in PARAMS},
                       init={k: arrays[f"init_{k}"] for k in PARAMS},
                       accum={k: arrays[f"accum_{k}"] for k in PARAMS}, config=config,
                       meta=CheckpointMeta.from_json(meta),
                       query_item=query_item, relevance=RelevanceModel.from_arrays(arrays))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:  # not a checkpoint
            raise ReleaseError(f"ranker checkpoint {path} is malformed: "
                               f"{type(exc).__name__}: {exc}") from exc

    def for_release(self, release_id: str, old_ids: np.ndarray, new_ids: np.ndarray) -> Ranker:
        """The same model carried over to another release: item biases follow item ids; items
        new to the catalogue start at zero."""
        pos = {item: i for i, item in enumerate(old_ids.tolist())}
        idx = np.array([pos.get(item, -1) for item in new_ids.tolist()], dtype=np.int64)
        known = idx >= 0

        def remap(arr: np.ndarray) -> np.ndarray:
            out = np.zeros(len(new_ids))
            out[known] = arr[idx[known]]
            return out

        shared = {k: getattr(self, k).copy() for k in ("U", "V", "w", "b0")}
        new_row = {int(o): n for n, o in enumerate(idx.tolist()) if o >= 0}
        query_item = {(qk, new_row[r]): list(v) for (qk, r), v in self.query_item.items()
                      if r in new_row}
        return Ranker(
            release_id=release_id, **shared, item_bias=remap(self.item_bias),
            init={**{k: self.init[k].copy() for k in ("U", "V", "w", "b0")},
                  "item_bias": np.zeros(len(new_ids))},
            accum={**{k: self.accum[k].copy() for k in ("U", "V", "w", "b0")},
                   "item_bias": remap(self.accum["item_bias"])},
            config=self.config, meta=self.meta.copy(), query_item=query_item,
            relevance=self.relevance,  # item-agnostic: it scores features, not ids
        )


def query_key(text: str) -> int:
    """A stable 63-bit key of a normalised query, for the (query, item) memory."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))
