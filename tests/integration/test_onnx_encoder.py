"""The ONNX Runtime query path against the real encoder: same vectors, cached export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.encoder import Encoder
from serving.onnx_encoder import OnnxQueryEncoder, model_file

TEXTS = ["cordless drill", "10 ft. pvc pipe 1/2 in.", "deck over",
         "outdoor patio furniture set with cushions and a very long description " * 3]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, encoder):
    # starts with a damaged file where the model belongs: it must be exported again, not used
    path = tmp_path_factory.mktemp("onnx")
    model_file(path, encoder.revision, 128).write_bytes(b"not an onnx model")
    return path


@pytest.fixture(scope="module")
def onnx_encoder(encoder, onnx_dir):
    return Encoder(max_length=128, backend="onnx", onnx_cache_dir=onnx_dir)


def test_onnx_query_vectors_match_torch(encoder, onnx_encoder):
    assert onnx_encoder.backend == "onnx"
    assert onnx_encoder.version == encoder.version  # stored item vectors stay valid
    for text in TEXTS:
        got = onnx_encoder.encode_query(text)
        want = encoder._forward([text])[0]
        assert got.shape == (encoder.dim,) and got.dtype == np.float32
        assert float(np.linalg.norm(got)) == pytest.approx(1.0, abs=1e-5)
        assert float(got @ want) > 0.999


def test_export_is_keyed_by_revision_and_reused(encoder, onnx_encoder, onnx_dir):
    path = model_file(onnx_dir, encoder.revision, 128)
    assert path.is_file() and encoder.revision in path.name
    # the model and the record of its check against PyTorch; no temp files left behind
    assert sorted(p.name for p in onnx_dir.iterdir()) == [path.name, f"{path.name}.check.json"]
    stamp = path.stat().st_mtime_ns
    again = OnnxQueryEncoder(encoder.path, encoder.revision, 128, onnx_dir)
    assert not again.exported and again.path == path and path.stat().st_mtime_ns == stamp
    assert model_file(onnx_dir, "another-revision", 128) != path
    assert model_file(onnx_dir, encoder.revision, 64) != path


def test_damaged_cached_model_is_exported_again(onnx_encoder):
    assert onnx_encoder.backend == "onnx" and onnx_encoder._onnx.exported


def test_a_recorded_check_spares_the_next_process_pytorch(encoder, onnx_encoder, onnx_dir):
    record = json.loads(onnx_encoder._onnx.check_path.read_text())
    assert record["cosine"] > 0.999 and record["key"]["versions"]["onnxruntime"]
    # the next encoder on the same file and libraries serves queries without loading the
    # PyTorch model; the batch path loads it at its first use
    again = Encoder(max_length=128, backend="onnx", onnx_cache_dir=onnx_dir)
    assert again.backend == "onnx" and again._model is None
    for text in TEXTS:
        assert np.array_equal(again.encode_query(text), onnx_encoder.encode_query(text))
    assert again._model is None
    np.testing.assert_allclose(again.encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)
    assert again._model is not None


def test_a_stale_or_failed_record_decides_again_or_keeps_pytorch(encoder, onnx_encoder,
                                                                 onnx_dir):
    check = onnx_encoder._onnx.check_path
    good = json.loads(check.read_text())
    # another file (or library version) than the record's: checked again, recorded again
    check.write_text(json.dumps({**good, "key": {**good["key"], "size": 1}}))
    again = Encoder(max_length=128, backend="onnx", onnx_cache_dir=onnx_dir)
    assert again.backend == "onnx" and again._model is not None
    assert json.loads(check.read_text()) == good
    # a recorded disagreement for this very file: PyTorch serves, without checking again
    check.write_text(json.dumps({**good, "cosine": 0.5}))
    try:
        assert Encoder(max_length=128, backend="onnx", onnx_cache_dir=onnx_dir).backend == "torch"
        # an unreadable record is no record
        check.write_text("{not json")
        assert Encoder(max_length=128, backend="onnx", onnx_cache_dir=onnx_dir).backend == "onnx"
    finally:
        check.write_text(json.dumps(good))


def test_the_query_tokenizer_is_transformers_own(encoder, shared_data):
    """The ONNX path tokenizes with the encoder's tokenizer.json through the tokenizers library
    (no transformers, no torch): the same ids, masks and type ids as transformers' tokenizer
    for every real query of both data sets, long product texts (truncated) and odd input."""
    import polars as pl

    from serving.onnx_encoder import fast_tokenizer

    texts: list[str] = []
    for name in ("homedepot", "crowdflower"):
        texts += sorted(set(pl.read_parquet(shared_data / name / "judgments.parquet")["query"]
                            .cast(pl.Utf8).to_list()))
    products = pl.read_parquet(shared_data / "crowdflower" / "products.parquet").head(300)
    texts += [f"{t} {d or ''}" for t, d in zip(products["title"].to_list(),
                                               products["description"].to_list(), strict=True)]
    texts += ["", " ", "Ünïcödé café 12\u00bd in.", "emoji \U0001F6E0 drill", "x" * 2000,
              "[CLS] [SEP] [PAD] [UNK] [MASK]", "tab\tnew\nline"]
    fast = fast_tokenizer(encoder.path, 128)
    for i in range(0, len(texts), 256):
        chunk = texts[i:i + 256]
        want = encoder.tokenizer(chunk, padding=True, truncation=True, max_length=128,
                                 return_tensors="np")
        got = fast.encode_batch(chunk)
        for key, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                          ("token_type_ids", "type_ids")):
            assert np.array_equal(np.array([getattr(e, attr) for e in got]), want[key]), (key, i)


def test_the_int8_query_model_is_its_own_file_and_close_to_pytorch(encoder, onnx_encoder,
                                                                    onnx_dir):
    """int8 (per-channel weights of the matrix products) is quantised from the cached fp32
    export into a file of its own, checked against PyTorch with its own bar, and its vectors
    stay close to PyTorch's; the fp32 file and its record are left as they were."""
    from serving.onnx_encoder import INT8_SCHEME, MIN_PROBE_COSINE

    fp32 = model_file(onnx_dir, encoder.revision, 128)
    stamp = fp32.stat().st_mtime_ns
    int8 = Encoder(max_length=128, backend="onnx", onnx_cache_dir=onnx_dir,
                   query_precision="int8")
    assert int8.backend == "onnx" and int8._onnx.variant == "int8"
    path = model_file(onnx_dir, encoder.revision, 128, "int8")
    assert int8._onnx.path == path != fp32 and INT8_SCHEME in path.name
    assert path.stat().st_size < 0.8 * fp32.stat().st_size  # the weights are int8
    assert fp32.stat().st_mtime_ns == stamp
    record = json.loads(int8._onnx.check_path.read_text())
    assert record["key"]["variant"] == "int8"
    assert MIN_PROBE_COSINE["int8"] <= record["cosine"] < 1.0
    want = encoder._forward(TEXTS)
    got = int8.encode_queries(TEXTS)
    assert all(np.array_equal(got[i], int8.encode_query(t)) for i, t in enumerate(TEXTS))
    assert float(np.min(np.sum(got * want, axis=1))) > 0.97
    # not the fp32 model's vectors: the arithmetic really is another
    assert not np.allclose(got, onnx_encoder.encode_queries(TEXTS), atol=1e-4)
    with pytest.raises(ValueError, match="variant"):
        model_file(onnx_dir, encoder.revision, 128, "int4")  # type: ignore[arg-type]
