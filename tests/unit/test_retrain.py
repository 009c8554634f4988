"""The batch retrain's pieces on synthetic examples: no encoder, no release, no registry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.learning.replay import Example
from pipelines.learning.retrain import evaluate_ranker, split_by_offset, train_ranker
from serving.ranker import Ranker, RankerConfig

DIM, N_ITEMS = 8, 6


def unit(v):
    return v / np.linalg.norm(v)


def synthetic(n_events: int, seed: int = 0) -> list[Example]:
    """Items 0-2 are liked, 3-5 are not, whatever the query: each event is a click on a liked
    item with two disliked items skipped above it. Only the item biases can learn that."""
    rng = np.random.default_rng(seed)
    items = [unit(rng.normal(size=DIM)) for _ in range(N_ITEMS)]
    out = []
    for offset in range(1, n_events + 1):
        q = unit(rng.normal(size=DIM))
        liked = int(rng.integers(0, 3))
        out.append(Example(offset, q, items[liked], None, liked, 1.0, 1.0))
        for bad in rng.choice([3, 4, 5], size=2, replace=False):
            out.append(Example(offset, q, items[bad], None, int(bad), 0.0, 1.0))
    return out


# these examples carry their signal in per-item biases (against dense noise the weights can
# discount), which learn only when enabled
BIAS_LEARNS = RankerConfig(item_bias_online=True, weights_online=True)


def test_shared_ranking_parameters_do_not_learn_by_default():
    trained = train_ranker(synthetic(20), "rel", DIM, N_ITEMS, epochs=2)
    assert not trained.item_bias.any()
    np.testing.assert_array_equal(trained.w, trained.init["w"])
    np.testing.assert_array_equal(trained.U, trained.init["U"])


def fixed_ranker(biases: list[float]) -> Ranker:
    """logit = dense + item bias, with dense = q.x (no adapter) and no intercept."""
    r = Ranker.initial("rel", DIM, len(biases), RankerConfig(rank=2))
    r.w = np.array([1.0, 0.0, 0.0])
    r.b0 = np.array([0.0])
    r.item_bias = np.array(biases, dtype=np.float64)
    return r


def ex(offset: int, row: int, label: float, weight: float = 1.0) -> Example:
    e1 = np.eye(DIM)[0]
    return Example(offset, e1, e1, None, row, label, weight)


def test_training_lowers_held_out_loss_on_a_learnable_signal():
    train, held = split_by_offset(synthetic(200), holdout=0.25)
    initial = evaluate_ranker(Ranker.initial("rel", DIM, N_ITEMS), held)
    trained = evaluate_ranker(train_ranker(train, "rel", DIM, N_ITEMS, epochs=20,
                                           config=BIAS_LEARNS), held)
    assert trained["log_loss"] < initial["log_loss"] / 2
    # the item biases carry the signal; the random dense similarity (x10) is noise they must
    # outweigh, and the frozen query adapter cannot absorb it
    assert trained["pairwise_accuracy"] >= 0.9
    assert initial["pairwise_accuracy"] < 0.7
    assert trained["pairs"] == initial["pairs"] == 50 * 2


def test_training_is_deterministic_in_its_seed_and_more_epochs_fit_better():
    data = synthetic(50)
    a = train_ranker(data, "rel", DIM, N_ITEMS, epochs=3, seed=7, config=BIAS_LEARNS)
    b = train_ranker(data, "rel", DIM, N_ITEMS, epochs=3, seed=7, config=BIAS_LEARNS)
    c = train_ranker(data, "rel", DIM, N_ITEMS, epochs=3, seed=8, config=BIAS_LEARNS)
    np.testing.assert_array_equal(a.item_bias, b.item_bias)
    np.testing.assert_array_equal(a.U, b.U)
    assert not np.array_equal(a.item_bias, c.item_bias)
    one = train_ranker(data, "rel", DIM, N_ITEMS, epochs=1, config=BIAS_LEARNS)
    assert evaluate_ranker(a, data)["log_loss"] < evaluate_ranker(one, data)["log_loss"]
    with pytest.raises(ValueError, match="epochs"):
        train_ranker(data, "rel", DIM, N_ITEMS, epochs=0)


def test_time_split_holds_out_the_last_share_of_event_offsets():
    offsets = [3, 1, 5, 1, 2, 3, 4, 3]           # eight examples from five events, out of order
    examples = [ex(o, 0, 1.0) for o in offsets]
    train, held = split_by_offset(examples, holdout=0.4)
    assert sorted(e.offset for e in train) == [1, 1, 2, 3, 3, 3]
    assert sorted(e.offset for e in held) == [4, 5]
    # rounded up to whole events, and all three examples of event 3 stay together
    train, held = split_by_offset(examples, holdout=0.5)
    assert sorted(e.offset for e in train) == [1, 1, 2]
    assert sorted(e.offset for e in held) == [3, 3, 3, 4, 5]
    assert split_by_offset([], 0.2) == ([], [])
    train, held = split_by_offset([ex(1, 0, 1.0), ex(1, 1, 0.0)], holdout=0.2)
    assert train == [] and len(held) == 2     # one event cannot be split
    with pytest.raises(ValueError, match="holdout"):
        split_by_offset(examples, holdout=1.0)


def test_pairwise_accuracy_known_answer():
    # logits: row0 1, row1 2, row2 0, row3 3, row4 1
    r = fixed_ranker([0.0, 1.0, -1.0, 2.0, 0.0])
    examples = [
        ex(10, 0, 1.0), ex(10, 1, 0.0), ex(10, 2, 0.0),   # 1 < 2 lost, 1 > 0 won
        ex(11, 3, 1.0), ex(11, 0, 0.0),                   # 3 > 1 won
        ex(12, 1, 1.0),                                   # a purchase: no pair
        ex(13, 4, 1.0), ex(13, 0, 0.0),                   # 1 = 1: a tie counts half
        ex(14, 2, 0.0), ex(15, 3, 1.0),                   # pairs never cross events
    ]
    out = evaluate_ranker(r, examples)
    assert out["pairs"] == 4
    assert out["pairwise_accuracy"] == pytest.approx((1 + 1 + 0.5) / 4)
    assert out["examples"] == len(examples)


def test_weighted_log_loss_known_answer_and_limits():
    # row 0 has logit 1 + (-1) = 0; row 1 has logit 1 + (ln 3 - 1) = ln 3
    r = fixed_ranker([-1.0, math.log(3.0) - 1.0])
    out = evaluate_ranker(r, [ex(1, 0, 1.0, weight=3.0), ex(1, 1, 0.0, weight=1.0)])
    # -ln sigmoid(0) = ln 2 (weight 3); -ln(1 - sigmoid(ln 3)) = ln 4 (weight 1)
    assert out["log_loss"] == pytest.approx((3 * math.log(2) + math.log(4)) / 4)
    assert out["pairwise_accuracy"] == 0.0
    confident = evaluate_ranker(fixed_ranker([50.0, -50.0]), [ex(1, 0, 1.0), ex(1, 1, 0.0)])
    assert confident["log_loss"] == pytest.approx(0.0, abs=1e-20)
    assert confident["pairwise_accuracy"] == 1.0
    assert evaluate_ranker(r, []) == {"log_loss": None, "pairwise_accuracy": None, "pairs": 0,
                                      "examples": 0}


def test_feedback_relevance_weights_each_positive_by_its_ranks_inverse_propensity():
    from types import SimpleNamespace

    from pipelines.learning.replay import FeedbackTally
    from pipelines.learning.retrain import MIN_LISTS_PER_QUERY, feedback_relevance

    tally = FeedbackTally()
    for s in range(10):  # ten pages of "drill": A at rank 1, B at rank 5
        tally.impression("drill", f"s{s}", "A", 1)
        tally.impression("drill", f"s{s}", "B", 5)
    tally.positive("drill", "A", 1.0)  # two clicks on A
    tally.positive("drill", "A", 1.0)
    tally.positive("drill", "B", 1.0)  # a click and a purchase on B
    tally.positive("drill", "B", 3.0)
    for s in range(MIN_LISTS_PER_QUERY - 1):  # too few pages to estimate anything
        tally.impression("saw", f"t{s}", "A", 1)
        tally.positive("saw", "A", 1.0)

    ids = np.array(["A", "B", "C"], dtype=object)
    lookup = SimpleNamespace(bundle=SimpleNamespace(items=SimpleNamespace(item_ids=ids)),
                             row_of={"A": 0, "B": 1, "C": 2},
                             features=lambda text, rows: ([0, 1, 2], np.zeros((3, 14))))
    out = feedback_relevance(tally, lookup)
    assert set(out) == {"drill"}
    rows, X, gain, text = out["drill"]
    # only the items shown are estimated: A has 2 clicks over an exposure of 10 pages x 1/1;
    # B a click (1) and a purchase (3) over 10 pages x 1/5; each is shrunk toward the
    # query's mean rate (6 over an exposure of 12) by one examined impression
    assert rows == [0, 1] and X.shape == (2, 14) and text == "drill"
    mean = (2 + 4) / (10 + 2)
    np.testing.assert_allclose(gain, [(2 + mean) / (10 + 1), (4 + mean) / (2 + 1)])
    assert gain[1] > gain[0]  # B, clicked far down the page, is the better item
