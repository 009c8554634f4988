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
