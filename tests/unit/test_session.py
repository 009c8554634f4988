from __future__ import annotations

import numpy as np
import pytest

from serving.session import (
    MemorySessionStore,
    SessionConfig,
    SessionState,
    blend_query,
    interest_vector,
)

VECTORS = np.eye(4, dtype=np.float32)
ROWS = {"a": 0, "b": 1, "c": 2, "d": 3}
CFG = SessionConfig(half_life_s=100.0, ttl_s=1000.0, max_interactions=3)


def test_interest_decays_with_a_half_life_and_weights_by_event_type():
    state = SessionState().add("a", 1.0, ts=0.0, cfg=CFG).add("b", 3.0, ts=100.0, cfg=CFG)
    v = interest_vector(state, VECTORS, ROWS, now=100.0, cfg=CFG)
    np.testing.assert_allclose(v, [0.5, 3.0, 0.0, 0.0])


def test_old_interactions_expire_and_only_the_last_few_are_kept():
    state = SessionState()
    for i, item in enumerate("abcd"):
        state = state.add(item, 1.0, ts=float(i), cfg=CFG)
    assert [it.item_id for it in state.interactions] == ["b", "c", "d"]
    assert interest_vector(state, VECTORS, ROWS, now=2000.0, cfg=CFG) is None


def test_blend_leans_toward_interest_and_browsing_uses_interest_alone():
    q = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    interest = np.array([0.8, 0.6, 0.0, 0.0], dtype=np.float32)
    vec, shifted = blend_query(q, interest, CFG)
    assert not shifted and vec[1] > 0 and np.linalg.norm(vec) == pytest.approx(1.0)
    alone, _ = blend_query(None, interest, CFG)
    np.testing.assert_allclose(alone, [0.8, 0.6, 0.0, 0.0], rtol=1e-6)
    with pytest.raises(ValueError):
        blend_query(None, None, CFG)


def test_a_query_far_from_the_interest_is_an_intent_shift():
    q = np.array([0.0, 0.0, 1.0, 0.0], dtype=np.float32)
    interest = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    vec, shifted = blend_query(q, interest, CFG)
    assert shifted
    # old interest keeps only shift_factor of its pull
    near, _ = blend_query(q, interest, SessionConfig(shift_threshold=-1.0))
    assert vec[0] < near[0]
    state = SessionState().add("a", 1.0, 0.0, CFG).shifted(5.0, CFG).add("b", 1.0, 0.0, CFG)
    np.testing.assert_allclose(interest_vector(state, VECTORS, ROWS, 0.0, CFG),
                               [CFG.shift_factor, 1.0, 0, 0])
    # a second shift fades the older intent further; client timestamps play no part
    twice = state.shifted(1.0, CFG)
    np.testing.assert_allclose(interest_vector(twice, VECTORS, ROWS, 0.0, CFG),
                               [CFG.shift_factor ** 2, CFG.shift_factor, 0, 0])


def test_memory_store_is_bounded_and_expires():
    store = MemorySessionStore(max_sessions=2, ttl_s=1000.0)
    for s in ("s1", "s2", "s3"):
        store.put(s, SessionState(last_ts=1.0))
    assert store.get("s1") is None and store.get("s3") is not None and len(store) == 2
    short = MemorySessionStore(ttl_s=0.0)
    short.put("s", SessionState())
    assert short.get("s") is None
