"""ONNX Runtime for the query path: the same transformer, exported once, run without PyTorch.

One short query through PyTorch eager costs ~20 ms on 2 cores, mostly framework overhead;
the same graph in ONNX Runtime costs a third of that. Only the transformer is exported (with
dynamic batch and sequence axes); mean pooling and L2 normalisation stay in numpy, as in
:class:`serving.encoder.Encoder`, so the vectors agree with PyTorch's within float error and
the encoder version (and every stored item vector) stays valid.

The exported file is cached on disk, keyed by the encoder revision, the token budget and the
variant, and written atomically (temp file + ``os.replace``), so processes starting at the
same time at worst export twice and never read a half-written file. A model is checked
against PyTorch on a few probe texts before it is used; the check's outcome is recorded beside
the file (``<file>.check.json``), keyed by the file's size and mtime and the versions of ONNX
Runtime, PyTorch and transformers, so the next process that loads the same file with the same
libraries takes the recorded outcome and needs no PyTorch at all.

The ``int8`` variant quantises the weights of the transformer's matrix products to int8, per
output channel (dynamic quantisation: activations are quantised per call); the token
embeddings stay fp32. One short query runs about twice as fast as in fp32, its vectors agree
with PyTorch's to a cosine of 0.97 or more (0.993 on average over 8,255 Home Depot queries),
and dense nDCG@10 moved by +0.0003 on Home Depot and -0.0003 on CrowdFlower (``instantrec
bench serving --repeats 0 --quality``). Per-tensor quantisation of every operator, the
embeddings included, cost 0.005-0.014 nDCG@10 and is not offered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, Literal

import numpy as np

from serving.errors import EncoderError

log = logging.getLogger(__name__)

Variant = Literal["fp32", "int8"]
VARIANTS: tuple[Variant, ...] = ("fp32", "int8")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
# Texts a loaded model must encode like PyTorch does (cosine >= MIN_PROBE_COSINE[variant]).
PROBES = ("cordless drill", "10 ft pvc pipe 1/2 in.", "a", "outdoor patio furniture set with cushions")
# fp32 is the same arithmetic (measured 1.0); int8 measured 0.992 on the probes, so 0.98 still
# tells a sound quantised model from a broken one
MIN_PROBE_COSINE: dict[Variant, float] = {"fp32": 0.999, "int8": 0.98}
# In the int8 file's name: a file quantised by another scheme (the former per-tensor one) is
# not mistaken for this one.
INT8_SCHEME = "int8-matmul-per-channel"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/instantrec/onnx`` (or ``~/.cache/...``) when no directory is given."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "instantrec" / "onnx"


def model_file(cache_dir: Path, revision: str, max_length: int, variant: Variant = "fp32") -> Path:
    """Where the exported model for this encoder revision, token budget and variant lives."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ONNX query model variant {variant!r} (one of {VARIANTS})")
    tag = INT8_SCHEME if variant == "int8" else variant
    return Path(cache_dir) / f"encoder-{revision}-len{max_length}-{tag}.onnx"


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def export_model(model_dir: Path, out: Path) -> Path:
    """Export the transformer under ``model_dir`` (last hidden state) to ``out``, atomically.

    A fresh copy of the model is loaded for the export, with eager attention (the traced
    graph of the plain attention path is the most portable), so a serving model is never
    touched by the tracer.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class _Hidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    # two texts of different lengths, so the example batch has padding
    example = tokenizer(["cordless drill", "ten foot pvc pipe with fittings"], padding=True,
                        return_tensors="pt")
    args = tuple(example[name] for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(out)
    try:
        with torch.inference_mode():
            # dynamo=False: the TorchScript exporter needs no onnxscript and works offline
            torch.onnx.export(_Hidden(model), args, str(tmp), input_names=list(INPUTS),
                              output_names=["last_hidden_state"], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s to ONNX at %s", model_dir, out)
    return out


def quantize_model(fp32: Path, out: Path) -> Path:
    """Dynamic int8 quantisation of the matrix products' weights of ``fp32`` (per output
    channel) into ``out``, atomically; the token embeddings stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = _tmp_beside(out)
    try:
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def ensure_model(model_dir: Path, revision: str, max_length: int, cache_dir: Path,
                 variant: Variant = "fp32") -> tuple[Path, bool]:
    """The cached ONNX file for this encoder, exporting it first if missing.

    Returns the path and whether it was created by this call.
    """
    path = model_file(cache_dir, revision, max_length, variant)
    if path.is_file():
        return path, False
    if variant == "fp32":
        return export_model(model_dir, path), True
    fp32, _ = ensure_model(model_dir, revision, max_length, cache_dir, "fp32")
    return quantize_model(fp32, path), True


def fast_tokenizer(model_dir: Path, max_length: int) -> Any | None:
    """The encoder's own fast tokenizer (its ``tokenizer.json``) through the ``tokenizers``
    library, truncating to ``max_length`` (special tokens included) and padding to the longest
    text of a call: what transformers' ``AutoTokenizer`` runs for it, without importing
    transformers, whose configuration module imports torch. None without a ``tokenizer.json``."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)
    pad = "[PAD]"
    try:
        config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
        pad = str(config.get("pad_token") or pad)
    except (OSError, ValueError):
        pass
    pad_id = tokenizer.token_to_id(pad)
    tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token=pad)
    return tokenizer


class OnnxQueryEncoder:
    """Embed one text at a time with ONNX Runtime; thread-safe.

    ``threads`` is ONNX Runtime's intra-op thread count. The default, 1 with no spinning, is
    what measured best on 2 busy cores: a second (spinning) pool thread competes with the
    request's own ANN, BM25 and ranker work and with other requests, and made a whole
    ``recommend()`` twice as slow under load. ``InferenceSession.run`` is thread-safe; the fast
    tokenizer is not, so it has its own lock (and its own instance, so a long batch on the
    PyTorch path never holds up a query).
    """

    def __init__(self, model_dir: Path, revision: str, max_length: int,
                 cache_dir: Path | None = None, variant: Variant = "fp32",
                 threads: int = 1) -> None:
        import onnxruntime as ort

        self.max_length = max_length
        self.variant = variant
        self.path, self.exported = ensure_model(Path(model_dir), revision, max_length,
                                                Path(cache_dir or default_cache_dir()), variant)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(self.path), opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged cached file: rebuild it once
            if self.exported:
                raise EncoderError(f"cannot load the ONNX encoder {self.path}: {exc}") from exc
            log.warning("cached ONNX encoder %s does not load (%s); exporting it again",
                        self.path, exc)
            self.path.unlink(missing_ok=True)
            self.path, self.exported = ensure_model(Path(model_dir), revision, max_length,
                                                    Path(cache_dir or default_cache_dir()), variant)
            try:
                self._session = ort.InferenceSession(str(self.path), opts,
                                                     providers=["CPUExecutionProvider"])
            except Exception as again:
                raise EncoderError(f"cannot load the ONNX encoder {self.path}: {again}") from again
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._fast = fast_tokenizer(Path(model_dir), max_length)
        if self._fast is None:  # no tokenizer.json: transformers' tokenizer (imports torch)
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, float32 (len(texts), dim): mean pooling over real tokens."""
        with self._lock:
            if self._fast is not None:
                encodings = self._fast.encode_batch(texts)
                batch = {"input_ids": [e.ids for e in encodings],
                         "attention_mask": [e.attention_mask for e in encodings],
                         "token_type_ids": [e.type_ids for e in encodings]}
            else:
                batch = self._tokenizer(texts, padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="np")
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in self._inputs}
        hidden = self._session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (pooled / norms).astype(np.float32, copy=False)

    def embed(self, text: str) -> np.ndarray:
        return self.encode([text])[0]

    def check_against(self, reference: np.ndarray, texts: tuple[str, ...] = PROBES) -> float:
        """Smallest cosine between this model's vectors of ``texts`` and ``reference``."""
        return float(np.min(np.sum(self.encode(list(texts)) * reference, axis=1)))

    @property
    def min_probe_cosine(self) -> float:
        """The smallest probe cosine to PyTorch this variant must reach to serve."""
        return MIN_PROBE_COSINE[self.variant]

    @property
    def check_path(self) -> Path:
        """Where the outcome of the check against PyTorch is recorded."""
        return self.path.with_name(f"{self.path.name}.check.json")

    def _check_key(self) -> dict[str, Any]:
        stat = self.path.stat()
        versions = {}
        for dist in ("onnxruntime", "torch", "transformers"):
            try:
                versions[dist] = dist_version(dist)
            except PackageNotFoundError:
                versions[dist] = None
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "variant": self.variant,
                "versions": versions,
                "probes": hashlib.sha256("\n".join(PROBES).encode()).hexdigest()[:16]}

    def recorded_check(self) -> float | None:
        """The smallest probe cosine recorded for this very file and these libraries, or None
        (no record, another file or library version, or an unreadable record)."""
        try:
            record = json.loads(self.check_path.read_text())
            return float(record["cosine"]) if record["key"] == self._check_key() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_check(self, cosine: float) -> None:
        """Record the outcome of a check (atomically; a failure to write is only logged)."""
        tmp = _tmp_beside(self.check_path)
        try:
            tmp.write_text(json.dumps({"key": self._check_key(), "cosine": cosine}))
            os.replace(tmp, self.check_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cannot record the ONNX check at %s: %s", self.check_path, exc)
