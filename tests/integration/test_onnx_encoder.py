"""The ONNX Runtime query path against the real encoder: same vectors, cached export."""

from __future__ import annotations

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
    assert [p.name for p in onnx_dir.iterdir()] == [path.name]  # no temp files left behind
    stamp = path.stat().st_mtime_ns
    again = OnnxQueryEncoder(encoder.path, encoder.revision, 128, onnx_dir)
    assert not again.exported and again.path == path and path.stat().st_mtime_ns == stamp
    assert model_file(onnx_dir, "another-revision", 128) != path
    assert model_file(onnx_dir, encoder.revision, 64) != path


def test_damaged_cached_model_is_exported_again(onnx_encoder):
    assert onnx_encoder.backend == "onnx" and onnx_encoder._onnx.exported
