"""The relevance model the served ranker carries: fitting, scoring, persistence inside a ranker
checkpoint, and how the online ranker uses its score."""

from __future__ import annotations

import numpy as np
import pytest

from serving.errors import ReleaseError
from serving.ranker import Ranker
from serving.relevance import (
    DEPTH,
    LOGIT_SCALE,
    N_CHANNEL_FEATURES,
    MatchFeatures,
    RelevanceModel,
    channel_signals,
    on_top,
    query_features,
)

TITLES = [f"item {i} drill 18v" if i % 3 == 0 else f"item {i} hammer" for i in range(400)]


def judged_queries(n_queries: int, n_cands: int = 30, seed: int = 0):
    """Synthetic queries whose gain rises with cosine and with lexical coverage."""
    rng = np.random.default_rng(seed)
    match = MatchFeatures(TITLES)
    features, gains = [], []
    for _ in range(n_queries):
        rows = rng.choice(len(TITLES), n_cands, replace=False)
        cos = rng.uniform(0.1, 0.8, n_cands)
        cover = rng.uniform(0, 1, n_cands)
        bm25 = cover * rng.uniform(1, 10)
        X = query_features(channel_signals(cos, bm25, cover, 3), match, "18v drill", rows)
        features.append(X)
        gains.append(np.clip(3 * cos + 1.5 * cover + rng.normal(0, 0.2, n_cands), 0, 3))
    return features, gains


def test_the_model_learns_what_the_judgments_reward_and_scores_in_logits():
    features, gains = judged_queries(60)
    model = RelevanceModel.fit(features, gains)
    assert model.trees is None and model.meta["queries"] == 60  # few queries: linear only
    X, y = judged_queries(1, seed=1)[0][0], judged_queries(1, seed=1)[1][0]
    score = model.score(X)
    assert np.corrcoef(score, y)[0, 1] > 0.9
    # logits: the training predictions' spread is LOGIT_SCALE
    all_scores = np.concatenate([model.score(x) for x in features])
    assert np.std(all_scores) == pytest.approx(LOGIT_SCALE, rel=0.05)


def test_the_ranker_stage_reorders_only_the_hybrids_top():
    features, gains = judged_queries(40, n_cands=DEPTH + 20)
    model = RelevanceModel.fit(features, gains)
    X = features[0]
    hybrid = model.hybrid_score(X)
    top = set(np.argsort(-hybrid, kind="stable")[:DEPTH].tolist())
    served = model.score(X)
    assert set(np.argsort(-served, kind="stable")[:DEPTH].tolist()) == top
    expected = on_top(model.ranker_score(X), hybrid)
    np.testing.assert_allclose(served, LOGIT_SCALE * expected / model.spread)


def test_a_checkpoint_carries_the_model_with_its_trees_and_refuses_a_tampered_one(tmp_path):
    features, gains = judged_queries(1000, n_cands=8)
    model = RelevanceModel.fit(features, gains, judgments="j.parquet")
    assert model.trees is not None
    ranker = Ranker.initial("rel-1", dim=4, n_items=len(TITLES))
    ranker.relevance = model
    path = tmp_path / "ckpt.npz"
    ranker.save(path)
    loaded = Ranker.load(path)
    np.testing.assert_array_equal(loaded.relevance.score(features[3]), model.score(features[3]))
    assert loaded.relevance.meta["judgments"] == "j.parquet"
    # carried to another release: the model scores features, not item ids
    moved = loaded.for_release("rel-2", np.array(TITLES, dtype=object),
                               np.array(TITLES[:10], dtype=object))
    assert moved.relevance is loaded.relevance

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    tampered = {**arrays, "rel_tree_leaf": arrays["rel_tree_leaf"] + 0.5}
    with pytest.raises(ReleaseError, match="checksum"):
        RelevanceModel.from_arrays(tampered)
    arrays = {**arrays, "rel_meta": np.array(str(arrays["rel_meta"]).replace(
        '"features_version": 1', '"features_version": 99'))}
    with pytest.raises(ReleaseError, match="features version"):
        RelevanceModel.from_arrays(arrays)


def test_compiled_trees_predict_what_scikit_learn_predicts():
    from sklearn.ensemble import HistGradientBoostingRegressor

    from serving.relevance import MAX_CODED_DEPTH, TREE_DEPTH, CompiledTrees

    rng = np.random.default_rng(3)
    X = rng.normal(size=(4000, 6))
    X[:, 5] = rng.integers(0, 3, 4000)  # a coarse feature: ties at thresholds, short trees
    y = np.sin(X[:, 0]) + (X[:, 1] > 0.3) * X[:, 5] + rng.normal(0, 0.1, 4000)
    # 1500 samples a leaf: many trees stop above the full depth
    for depth, leaf in ((TREE_DEPTH, 20), (TREE_DEPTH, 1500), (1, 20), (MAX_CODED_DEPTH, 20)):
        model = HistGradientBoostingRegressor(max_depth=depth, max_iter=60,
                                              min_samples_leaf=leaf, random_state=0).fit(X, y)
        compiled = CompiledTrees.from_sklearn(model, depth)
        test = np.vstack([rng.normal(size=(500, 6)), X[:200], X[:1]])
        np.testing.assert_allclose(compiled.predict(test), model.predict(test), rtol=0,
                                   atol=1e-9)
        np.testing.assert_allclose(compiled.predict(X[:1]), model.predict(X[:1]), rtol=0,
                                   atol=1e-9)
    with pytest.raises(ValueError, match="depth"):
        CompiledTrees.from_sklearn(model, MAX_CODED_DEPTH + 1)


def test_compiling_trees_of_an_unknown_scikit_learn_layout_names_the_version():
    import sklearn

    from serving.relevance import CompiledTrees

    class Moved:  # what a scikit-learn release that renamed its private tree list would give
        pass

    with pytest.raises(TypeError, match=f"scikit-learn {sklearn.__version__}"):
        CompiledTrees.from_sklearn(Moved())


def test_the_relevance_score_replaces_the_channel_terms_and_the_memory_learns_on_top():
    rng = np.random.default_rng(0)
    d, n = 8, 5
    ranker = Ranker.initial("r", d, n)
    q = rng.normal(size=d)
    X = rng.normal(size=(n, d))
    rows = np.arange(n)
    rel = np.array([2.0, -1.0, 0.5, 0.0, 1.0])
    z, f = ranker.logits(q, X, None, rows, np.full(n, 0.7), qkey=7, rel=rel)
    np.testing.assert_allclose(z, rel + ranker.b0[0])
    np.testing.assert_array_equal(f["relevance"], rel)
    # a click on row 1 under the relevance score: the memory moves, the channel weights and
    # the adapter get no gradient
    _, grads = ranker.gradients(q, X[1], None, 1, 1.0, lex=0.7, qkey=7, rel=float(rel[1]))
    assert grads["w"][0] == 0.0 and grads["w"][2] == 0.0
    assert not grads["U"].any() and not grads["V"].any()
    before = ranker.logits(q, X, None, rows, None, qkey=7, rel=rel)[0][1]
    for _ in range(5):
        ranker.step(q, X[1], None, 1, 1.0, lex=0.7, qkey=7, rel=float(rel[1]))
    after = ranker.logits(q, X, None, rows, None, qkey=7, rel=rel)[0][1]
    assert after > before + 0.5


def test_fitting_checks_its_input():
    with pytest.raises(ValueError, match="at least one judged query"):
        RelevanceModel.fit([], [])
    with pytest.raises(ValueError, match="features"):
        RelevanceModel.fit([np.zeros((3, N_CHANNEL_FEATURES))], [np.zeros(3)])
