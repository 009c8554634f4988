"""Embedding shards with the real encoder: an empty shard never loads it, a busy one logs its
progress, and the version known without loading is the loaded encoder's."""

from __future__ import annotations

import logging

import numpy as np

from pipelines.catalogue.embed import EncoderLoader, embed_items, encode_logged, store_vectors
from pipelines.steps import run_ingest
from serving.encoder import encoder_version
from tests.conftest import make_settings


def test_encoder_version_without_loading_matches_the_loaded_encoder(encoder):
    assert encoder_version(None, 128) == encoder.version
    assert encoder_version(encoder.path, 128) != encoder.version  # named by its directory
    assert encoder_version(None, 64) == encoder.version.replace("/len128", "/len64")


def test_empty_shard_never_loads_the_encoder(tmp_path, encoder, caplog):
    settings = make_settings(tmp_path / "home")
    run_ingest(settings)
    loads = []

    def load():
        loads.append(1)
        return encoder

    loader = EncoderLoader(encoder.version, load)
    caplog.set_level(logging.INFO, logger="pipelines.catalogue.embed")
    busy = embed_items(settings.warehouse_path, settings.work_dir, loader, 0, 2,
                       batch_size=16, log_every_s=0.0)
    assert busy.embedded > 0 and loads == [1]
    progress = [r.getMessage() for r in caplog.records if "items/s, ETA" in r.getMessage()]
    assert len(progress) == -(-busy.embedded // 32)  # one line per chunk of two batches
    assert progress[-1].startswith(f"embed shard 0/2: {busy.embedded}/{busy.embedded} items")

    assert store_vectors(settings.warehouse_path, settings.work_dir, encoder.version) > 0
    idle = embed_items(settings.warehouse_path, settings.work_dir, loader, 0, 2)
    assert (idle.embedded, idle.output) == (0, None)
    assert loads == [1]  # not loaded again for a shard with nothing pending


def test_logged_chunks_embed_what_one_call_embeds(encoder):
    texts = [f"item {i} " + "word " * (i % 17) for i in range(70)]
    whole = encoder.encode(texts, batch_size=8)
    chunked = encode_logged(encoder, texts, batch_size=8, label="embed", every_s=0.0)
    assert chunked.shape == whole.shape
    assert np.min(np.sum(whole * chunked, axis=1)) > 0.9999
