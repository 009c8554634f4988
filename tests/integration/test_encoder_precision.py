"""The batch encoder in bfloat16: the same vectors as fp32 to within 1e-4 cosine, chosen by a
setting, and never used for queries."""

from __future__ import annotations

import numpy as np
import pytest

from serving.encoder import Encoder, native_bf16, resolve_precision
from serving.errors import EncoderError

TEXTS = ["cordless drill", "10 ft. pvc pipe 1/2 in.", "behr premium plus ultra 1 gal. flat white",
         "outdoor patio furniture set with cushions and a very long description " * 8]


def test_bf16_batch_vectors_agree_with_fp32(encoder):
    assert encoder.precision == "fp32"
    fp32 = encoder.encode(TEXTS)
    bf16 = encoder.encode(TEXTS, precision="bf16")
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    cosine = (fp32 * bf16).sum(1)
    assert cosine.min() > 0.9999
    assert not np.array_equal(fp32, bf16)  # it really ran in another precision


def test_precision_setting_reaches_the_batch_path_only(encoder):
    bf16 = Encoder(max_length=128, precision="bf16")
    assert bf16.precision == "bf16" and bf16.version == encoder.version
    np.testing.assert_array_equal(bf16.encode(TEXTS), encoder.encode(TEXTS, precision="bf16"))
    # an explicit fp32 batch (e.g. the evaluation's queries) and the query path stay fp32
    np.testing.assert_array_equal(bf16.encode(TEXTS, precision="fp32"), encoder.encode(TEXTS))
    np.testing.assert_array_equal(bf16.encode_query(TEXTS[0]), encoder.encode_query(TEXTS[0]))


def test_auto_precision_follows_the_cpu_and_bad_values_are_named():
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    with pytest.raises(EncoderError, match="fp16"):
        resolve_precision("fp16")  # type: ignore[arg-type]


def test_settings_read_the_precision_from_the_environment(monkeypatch, tmp_path):
    from pydantic import ValidationError

    from pipelines.steps import configured_encoder
    from serving.settings import load_settings

    monkeypatch.setenv("INSTANTREC_EMBED_PRECISION", "fp32")
    assert configured_encoder(load_settings(home=tmp_path)).precision == "fp32"
    monkeypatch.setenv("INSTANTREC_EMBED_PRECISION", "half")
    with pytest.raises(ValidationError, match="embed_precision"):
        load_settings(home=tmp_path)
