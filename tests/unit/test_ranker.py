from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.ranker import Ranker, RankerConfig, query_key


def unit(v):
    return v / np.linalg.norm(v)


@pytest.fixture
def trained_ranker():
    rng = np.random.default_rng(3)
    r = Ranker.initial("rel", dim=16, n_items=5, config=RankerConfig(rank=4))
    # move away from the starting point so every gradient term is non-trivial
    r.U = rng.normal(0, 0.3, size=r.U.shape)
    r.item_bias = rng.normal(0, 0.5, size=5)
    return r


@pytest.mark.parametrize("label, session", [(1.0, True), (0.0, True), (1.0, False)])
def test_gradients_match_torch_autograd(trained_ranker, label, session):
    rng = np.random.default_rng(5)
    q, x = unit(rng.normal(size=16)), unit(rng.normal(size=16))
    s = unit(rng.normal(size=16)) if session else None
    r = trained_ranker
    loss, grads = r.gradients(q, x, s, row=2, label=label, weight=2.0, lex=0.6)

    t = {k: torch.tensor(getattr(r, k), requires_grad=True) for k in ("U", "V", "w", "b0")}
    bias = torch.tensor(r.item_bias, requires_grad=True)
    tq, tx = torch.tensor(q), torch.tensor(x)
    dense = tx @ tq + (t["V"].T @ tq) @ (t["U"].T @ tx)
    sess = tx @ torch.tensor(s) if s is not None else torch.tensor(0.0, dtype=torch.float64)
    z = t["w"][0] * dense + t["w"][1] * sess + t["w"][2] * 0.6 + bias[2] + t["b0"][0]
    tloss = 2.0 * torch.nn.functional.binary_cross_entropy_with_logits(
        z, torch.tensor(label, dtype=torch.float64))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-6)
    for k in ("U", "V", "w", "b0"):
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-6, atol=1e-10)
    assert grads["item_bias"][0] == pytest.approx(bias.grad[2].item())
    assert np.count_nonzero(bias.grad.numpy()) == 1


def test_step_is_adagrad_with_l2_toward_the_start():
    r = Ranker.initial("rel", dim=4, n_items=3, config=RankerConfig(rank=2, lr=0.1, l2=0.5))
    r.b0[0] = r.init["b0"][0] + 1.0  # displaced by 1 from its starting point
    q = x = unit(np.ones(4))
    _, grads = r.gradients(q, x, None, 0, 1.0)
    g = grads["b0"][0] + 0.5 * 1.0
    expected = r.b0[0] - 0.1 * g / np.sqrt(g * g + 1e-8)
    r.step(q, x, None, 0, 1.0)
    assert r.b0[0] == pytest.approx(expected)
    assert r.accum["b0"][0] == pytest.approx(g * g)
    # second step: the accumulated squared gradient shrinks the step size
    _, grads2 = r.gradients(q, x, None, 0, 1.0)
    g2 = grads2["b0"][0] + 0.5 * (r.b0[0] - r.init["b0"][0])
    before = r.b0[0]
    r.step(q, x, None, 0, 1.0)
    assert r.b0[0] == pytest.approx(before - 0.1 * g2 / np.sqrt(g * g + g2 * g2 + 1e-8))


def test_initial_ranker_is_the_identity_adapter():
    r = Ranker.initial("rel", dim=8, n_items=4)
    rng = np.random.default_rng(0)
    q, X = unit(rng.normal(size=8)), rng.normal(size=(4, 8))
    z, f = r.logits(q, X, None, np.arange(4))
    np.testing.assert_allclose(f["adapter"], 0.0)
    np.testing.assert_allclose(z, 10.0 * (X @ q) - 5.0)
    lex = np.array([0.0, 0.5, 1.0, 0.25])
    z, f = r.logits(q, X, None, np.arange(4), lex)
    np.testing.assert_allclose(z, 10.0 * (X @ q) + 4.0 * lex - 5.0)


@pytest.mark.parametrize("item_bias_online", [False, True])
def test_clicks_raise_the_clicked_items_score(item_bias_online):
    r = Ranker.initial("rel", dim=8, n_items=4,
                       config=RankerConfig(item_bias_online=item_bias_online))
    rng = np.random.default_rng(1)
    q, X = unit(rng.normal(size=8)), np.array([unit(v) for v in rng.normal(size=(4, 8))])
    qkey = query_key("espresso machine")
    # with the query: through its (query, item) memory; without one, only through item biases
    key = None if item_bias_online else qkey
    before, _ = r.logits(q, X, None, np.arange(4), qkey=key)
    for _ in range(20):
        r.step(q, X[3], None, 3, 1.0, qkey=key)
        r.step(q, X[0], None, 0, 0.0, qkey=key)
    after, f = r.logits(q, X, None, np.arange(4), qkey=key)
    assert after[3] - after[0] > before[3] - before[0]
    assert bool(f["item_bias"][3] > 0) == item_bias_online


def test_checkpoints_from_before_the_lexical_channel_still_load(tmp_path):
    r = Ranker.initial("rel", dim=4, n_items=2)
    arrays = r.to_arrays()
    for key in ("w", "init_w", "accum_w"):
        arrays[key] = arrays[key][:2]
    meta = {"release_id": "rel", "format": 1, "config": {k: v for k, v in r.config.__dict__.items()
                                                         if k != "init_w_lexical"}}
    import json

    np.savez(tmp_path / "old.npz", meta=np.array(json.dumps(meta)), **arrays)
    old = Ranker.load(tmp_path / "old.npz")
    np.testing.assert_allclose(old.w, [10.0, 3.0, 4.0])
    np.testing.assert_allclose(old.accum["w"], [0.0, 0.0, 0.0])


def test_query_item_memory_moves_only_that_query():
    r = Ranker.initial("rel", dim=8, n_items=4)
    rng = np.random.default_rng(2)
    q, X = unit(rng.normal(size=8)), np.array([unit(v) for v in rng.normal(size=(4, 8))])
    U_before = r.U.copy()
    for _ in range(10):
        r.step(q, X[2], None, 2, 1.0, qkey=111)
    z_seen, f = r.logits(q, X, None, np.arange(4), qkey=111)
    z_other, g = r.logits(q, X, None, np.arange(4), qkey=222)
    assert f["query_item_bias"][2] > 0 and np.all(g["query_item_bias"] == 0)
    assert z_seen[2] - z_other[2] == pytest.approx(f["query_item_bias"][2])
    np.testing.assert_array_equal(r.U, U_before)  # the adapter is not trained online


def test_save_load_round_trip_and_release_carry_over(tmp_path):
    r = Ranker.initial("rel-a", dim=6, n_items=3)
    r.item_bias[:] = [0.1, 0.2, 0.3]
    r.query_item[(7, 0)] = [0.5, 1.0]
    r.query_item[(7, 1)] = [0.25, 1.0]
    r.meta.offset = 42
    r.save(tmp_path / "c.npz")
    back = Ranker.load(tmp_path / "c.npz")
    assert back.release_id == "rel-a" and back.meta.offset == 42
    for k in ("U", "V", "w", "b0", "item_bias"):
        np.testing.assert_array_equal(getattr(back, k), getattr(r, k))
    moved = back.for_release("rel-b", np.array(["x", "y", "z"], dtype=object),
                             np.array(["z", "new", "x"], dtype=object))
    assert back.query_item == r.query_item
    assert moved.release_id == "rel-b"
    np.testing.assert_allclose(moved.item_bias, [0.3, 0.0, 0.1])
    assert moved.query_item == {(7, 2): [0.5, 1.0]}  # "x" moved to row 2; "y" left
    np.testing.assert_array_equal(moved.V, r.V)
    assert moved.meta == back.meta and moved.meta is not back.meta


def test_checkpoint_meta_is_typed_and_keeps_what_it_does_not_know():
    from serving.ranker import CheckpointMeta

    meta = CheckpointMeta.from_json({"offset": 7, "applied": 5, "ledger": "ab",
                                     "counters": {"click": 2}, "warm_from": 3,
                                     "bench_setup": "s1"})
    assert (meta.offset, meta.applied, meta.ledger, meta.warm_from) == (7, 5, "ab", 3)
    assert meta.counters == {"click": 2} and meta.extra == {"bench_setup": "s1"}
    assert meta.retrain_version is None
    # the JSON keeps the key names checkpoints always had, and leaves unset ones out
    assert meta.to_json() == {"offset": 7, "applied": 5, "ledger": "ab",
                              "counters": {"click": 2}, "warm_from": 3, "bench_setup": "s1"}
    copy = meta.copy()
    copy.counters["click"] += 1
    copy.extra["x"] = 1
    assert meta.counters == {"click": 2} and "x" not in meta.extra
