"""Encoder fine-tune end to end on a small CrowdFlower subset: judged pairs -> query split ->
a few in-batch-negative steps -> encoder directory -> held-out evaluation -> MLflow registry ->
promotion exactly when the held-out metrics improved -> the pipeline and serving load it; and
a few training steps on the real encoder lower the in-batch loss."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import polars as pl
import pytest
import torch

from pipelines.encoder.finetune import finetune_encoder
from pipelines.encoder.register import encoder_model_name, register_encoder
from pipelines.encoder.train import TrainConfig, champion_encoder_path, pairs_loss, train_model
from pipelines.offline.metrics import MIN_NDCG_GAIN
from serving.encoder import Encoder
from serving.errors import ReleaseError
from serving.manifest import EncoderSpec
from serving.recommender import release_encoder
from tests.conftest import make_settings


def small_crowdflower(shared_data, root):
    """The first 40 judged queries and 500 of the products judged for them."""
    judgments = pl.read_parquet(shared_data / "crowdflower" / "judgments.parquet")
    products = pl.read_parquet(shared_data / "crowdflower" / "products.parquet")
    qids = sorted(judgments["query_id"].unique().to_list())[:40]
    judgments = judgments.filter(pl.col("query_id").is_in(qids))
    products = (products.filter(pl.col("product_id").is_in(judgments["product_id"].to_list()))
                .sort("product_id").head(500))
    root.mkdir(parents=True, exist_ok=True)
    judgments.write_parquet(root / "judgments.parquet")
    products.write_parquet(root / "products.parquet")
    return root / "products.parquet", root / "judgments.parquet"


def champion_version(settings) -> int | None:
    client = mlflow.MlflowClient()
    try:
        return int(client.get_model_version_by_alias(encoder_model_name(settings),
                                                     "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def test_finetune_registers_and_promotes_only_on_a_held_out_gain(tmp_path, shared_data,
                                                                  encoder):
    products, judgments = small_crowdflower(shared_data, tmp_path / "data")
    settings = make_settings(tmp_path / "home", item_max_tokens=64)
    cfg = TrainConfig(batch_size=8, max_steps=3, item_max_tokens=64, query_max_tokens=16,
                      threads=1)
    result = finetune_encoder(settings, products, judgments, holdout=0.2, cfg=cfg)

    pairs, trained, evaluation = result["pairs"], result["train"], result["evaluation"]
    assert pairs["heldout_queries"] > 0 and pairs["train_queries"] > pairs["heldout_queries"]
    assert trained["steps"] == 3
    tuned = Encoder(trained["encoder_dir"], max_length=64)
    assert tuned.revision == trained["revision"] != encoder.revision

    judged = evaluation["sets"]["judged"]
    assert judged["scored_queries"] > 0
    improved = (judged["gain"]["ndcg@10"] >= MIN_NDCG_GAIN
                and judged["gain"]["recall@100"] >= -MIN_NDCG_GAIN)
    registered = result["register"]
    assert result["promoted"] is registered["promoted"] is improved
    assert (champion_encoder_path(settings.home) is not None) is improved
    assert (champion_version(settings) == registered["version"]) is improved

    version = mlflow.MlflowClient().get_model_version(encoder_model_name(settings),
                                                      str(registered["version"]))
    assert version.tags["encoder_id"] == trained["encoder_id"]
    run = mlflow.get_run(registered["run_id"])
    assert run.data.metrics["judged_candidate_ndcg_at_10"] == pytest.approx(
        judged["candidate"]["ndcg@10"])
    assert run.data.params["train_pairs"] == str(trained["train_pairs"])

    # With a threshold every candidate passes, the same version (no second registration) is
    # promoted: alias, pointer, and the pipeline's encoder follow it.
    forced = register_encoder(settings, trained, evaluation, pairs, min_gain=-1.0,
                              max_recall_drop=1.0)
    assert forced["promoted"] and forced["version"] == registered["version"]
    assert champion_version(settings) == registered["version"]
    assert champion_encoder_path(settings.home) == tmp_path / "home" / "encoders" / \
        trained["encoder_id"]
    from pipelines.steps import configured_encoder

    assert configured_encoder(settings).revision == trained["revision"]

    # Serving loads the encoder a release records, and refuses a revision that differs.
    spec = EncoderSpec(name=tuned.name, revision=tuned.revision, dim=tuned.dim, max_tokens=64,
                       path=trained["encoder_dir"])
    bundle = SimpleNamespace(release_id="r1", manifest=SimpleNamespace(encoder=spec))
    assert release_encoder(bundle, settings, None).revision == trained["revision"]
    wrong = SimpleNamespace(release_id="r2", manifest=SimpleNamespace(
        encoder=spec.model_copy(update={"revision": "0" * 16})))
    with pytest.raises(ReleaseError, match="rev 0000"):
        release_encoder(wrong, settings, None)


def test_training_lowers_the_loss_on_a_tiny_batch(encoder):
    from transformers import AutoModel, AutoTokenizer

    queries = ["cordless drill", "espresso machine", "wool socks", "yoga mat"]
    items = ["Compact 20V brushless driver kit", "Stainless steel 15-bar coffee maker",
             "Merino hiking stockings, 3 pairs", "Non-slip exercise pad, 6 mm"]
    cfg = TrainConfig(batch_size=4, epochs=4, max_steps=4, lr=1e-4, warmup=0.0,
                      item_max_tokens=16, query_max_tokens=8, seed=0, threads=1)
    tokenizer = AutoTokenizer.from_pretrained(str(encoder.path))
    model = AutoModel.from_pretrained(str(encoder.path)).eval()
    with torch.no_grad():
        before = float(pairs_loss(model, tokenizer, queries, items, None, cfg))
    stats = train_model(model, tokenizer, queries, items, [1.0] * 4, cfg)
    with torch.no_grad():
        after = float(pairs_loss(model, tokenizer, queries, items, None, cfg))
    assert stats["steps"] == 4
    assert after < before
