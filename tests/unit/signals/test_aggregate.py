"""Properties of aggregation: bounds, up/down symmetry, monotonic in confidence, abstention."""

import numpy as np
import pytest
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
    np.testing.assert_allclose(weighted.strength, [(0.8 + 0.7 - 0.9) / 3])  # the opposite vote subtracts
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


def test_weighted_strength_is_the_absolute_score():
    # an up model at 0.4622 (weight 2) against a down model at 0.4655 (weight 1), both past 0.45
    p = np.array([[0.4622, 0.4655]])
    a = aggregate(p, np.array([1.0, -1.0]), np.array([2.0, 1.0]), np.full(2, 0.45), Aggregation.WEIGHTED)
    assert a.direction[0] == 1
    assert a.strength[0] == pytest.approx((2 * 0.4622 - 0.4655) / 3, abs=1e-15)  # 0.15297, not 0.308
    assert round(a.strength[0], 3) == 0.153
    assert a.confidence[0] == pytest.approx(0.4622)  # the agreeing model's output


@settings(max_examples=400, deadline=None)
@given(ensembles(min_models=2), RULES, st.data())
def test_an_opposing_vote_never_raises_strength(ens, rule, data):
    """A model against the signal that starts to vote (or votes more) weakens it or leaves it."""
    p, d, w, t = ens
    a = aggregate(p, d, w, t, rule)
    row = data.draw(st.integers(0, p.shape[0] - 1))
    if a.direction[row] == 0:
        return
    opposing = np.flatnonzero(d == -a.direction[row])
    if opposing.size == 0:
        return
    j = data.draw(st.sampled_from(list(opposing)))
    q = p.copy()
    q[row, j] = data.draw(st.floats(max(p[row, j], t[j]), 1.0))  # now votes against, at least as much
    b = aggregate(q, d, w, t, rule)
    if b.direction[row] == a.direction[row]:
        assert b.strength[row] <= a.strength[row] + 1e-12
        if rule is Aggregation.WEIGHTED and p[row, j] < t[j]:  # a new opposing vote subtracts
            assert b.strength[row] < a.strength[row]


@settings(max_examples=300, deadline=None)
@given(ensembles(), RULES)
def test_strength_at_most_the_agreeing_weight(ens, rule):
    """Votes against the direction can only take strength away from what the agreeing models give."""
    p, d, w, t = ens
    a = aggregate(p, d, w, t, rule)
    agreeing = (w[None, :] * np.where(a.agree, p, 0.0)).sum(axis=1) / w.sum()
    assert (a.strength <= agreeing + 1e-12).all()
