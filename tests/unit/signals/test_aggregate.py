"""Properties of aggregation: bounds, up/down symmetry, monotonic in confidence, abstention."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.config.models import Aggregation
from signalgen.signals.aggregate import aggregate, votes

RULES = st.sampled_from(list(Aggregation))


@st.composite
def ensembles(draw, min_models=1, max_models=5):
    k = draw(st.integers(min_models, max_models))
    n = draw(st.integers(1, 8))
    p = np.array(draw(st.lists(st.floats(0, 1), min_size=n * k, max_size=n * k))).reshape(n, k)
    d = np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=k, max_size=k)))
    w = np.array(draw(st.lists(st.floats(0.01, 10), min_size=k, max_size=k)))
    t = np.array(draw(st.lists(st.floats(0.05, 0.95), min_size=k, max_size=k)))
    return p, d, w, t


@settings(max_examples=300, deadline=None)
@given(ensembles(), RULES)
def test_outputs_within_bounds(ens, rule):
    p, d, w, t = ens
    a = aggregate(p, d, w, t, rule)
    assert set(np.unique(a.direction)) <= {-1, 0, 1}
    assert ((a.confidence >= 0) & (a.confidence <= 1)).all()
    assert ((a.strength >= 0) & (a.strength <= 1)).all()
    assert (a.strength[a.direction == 0] == 0).all()
    assert (a.confidence[a.direction == 0] == 0).all()


@settings(max_examples=300, deadline=None)
@given(ensembles(), RULES)
def test_symmetric_under_flipping_up_and_down(ens, rule):
    p, d, w, t = ens
    a, b = aggregate(p, d, w, t, rule), aggregate(p, -d, w, t, rule)
    np.testing.assert_array_equal(b.direction, -a.direction)
    np.testing.assert_allclose(b.strength, a.strength, atol=1e-12)
    np.testing.assert_allclose(b.confidence, a.confidence, atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(ensembles(), RULES, st.data())
def test_monotonic_in_confidence(ens, rule, data):
    """Raising the output of a model that agrees with the signal never weakens it or flips it."""
    p, d, w, t = ens
    a = aggregate(p, d, w, t, rule)
    row = data.draw(st.integers(0, p.shape[0] - 1))
    agreeing = np.flatnonzero(a.agree[row])
    if agreeing.size == 0:
        return
    j = data.draw(st.sampled_from(list(agreeing)))
    q = p.copy()
    q[row, j] = data.draw(st.floats(p[row, j], 1.0))
    b = aggregate(q, d, w, t, rule)
    assert b.direction[row] == a.direction[row]
    assert b.strength[row] >= a.strength[row] - 1e-12


@settings(max_examples=200, deadline=None)
@given(ensembles(), RULES)
def test_all_abstaining_gives_no_direction(ens, rule):
    p, d, w, t = ens
    below = np.minimum(p, t[None, :] - 1e-6)  # every model strictly under its threshold
    a = aggregate(below, d, w, t, rule)
    assert (a.direction == 0).all() and (a.strength == 0).all() and not a.any_vote.any()


def test_rules_on_a_known_case():
    # three models: two up (weights 1, 1), one down (weight 1); all above threshold
    p = np.array([[0.8, 0.7, 0.9]])
    d, w, t = np.array([1.0, 1.0, -1.0]), np.ones(3), np.full(3, 0.6)
    weighted = aggregate(p, d, w, t, Aggregation.WEIGHTED)
    assert weighted.direction[0] == 1  # (0.8 + 0.7 - 0.9) / 3 = 0.2 > 0
    np.testing.assert_allclose(weighted.strength, [(0.8 + 0.7) / 3])
    np.testing.assert_allclose(weighted.confidence, [0.75])
    assert aggregate(p, d, w, t, Aggregation.MAJORITY).direction[0] == 1  # 2/3 of the voting weight
    assert aggregate(p, d, w, t, Aggregation.UNANIMOUS).direction[0] == 0


def test_majority_counts_only_voting_models():
    # two up models and two down models; only one up model is confident: it is the whole vote
    p = np.array([[0.9, 0.3, 0.2, 0.1]])
    d, w, t = np.array([1.0, 1.0, -1.0, -1.0]), np.ones(4), np.full(4, 0.6)
    a = aggregate(p, d, w, t, Aggregation.MAJORITY)
    assert a.direction[0] == 1
    np.testing.assert_allclose(a.strength, [0.9 / 4])
    assert aggregate(p, d, w, t, Aggregation.UNANIMOUS).direction[0] == 0


def test_a_tie_is_not_a_majority():
    p = np.array([[0.9, 0.9]])
    a = aggregate(p, np.array([1.0, -1.0]), np.ones(2), np.full(2, 0.5), Aggregation.MAJORITY)
    assert a.direction[0] == 0


def test_nan_output_abstains():
    v = votes(np.array([[np.nan, 0.9]]), np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    assert v.tolist() == [[0, 1]]
