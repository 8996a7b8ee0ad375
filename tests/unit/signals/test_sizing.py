"""Properties of sizing: bounds, caps, monotonic in strength, zero without strength."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.config.models import SizingConfig
from signalgen.signals.sizing import size

SIZINGS = st.builds(
    SizingConfig,
    method=st.sampled_from(["fixed_fraction", "volatility_target"]),
    fraction=st.floats(0.01, 1.0),
    target_volatility=st.floats(1e-4, 0.05),
    max_position=st.floats(0.01, 1.0),
)
unit = st.floats(0, 1)
vol = st.one_of(st.floats(0, 0.2), st.just(float("nan")))


@settings(max_examples=300, deadline=None)
@given(SIZINGS, st.lists(st.tuples(unit, vol), min_size=1, max_size=20), st.floats(0.001, 2))
def test_weight_within_caps(sizing, rows, budget):
    strength, v = (np.array(c) for c in zip(*rows))
    w = size(strength, v, sizing, budget)
    assert ((w >= 0) & (w <= min(sizing.max_position, budget) + 1e-15)).all()
    assert (w[strength == 0] == 0).all()


@settings(max_examples=300, deadline=None)
@given(SIZINGS, unit, unit, vol, st.floats(0.001, 2))
def test_monotonic_in_strength(sizing, a, b, v, budget):
    lo, hi = sorted((a, b))
    w = size(np.array([lo, hi]), np.array([v, v]), sizing, budget)
    assert w[1] >= w[0]


def test_volatility_target_scales_inversely_with_volatility():
    s = SizingConfig(method="volatility_target", target_volatility=0.01, max_position=1.0)
    w = size(np.array([0.5, 0.5, 0.5]), np.array([0.01, 0.02, 0.0]), s, budget=1.0)
    np.testing.assert_allclose(w, [0.5, 0.25, 0.0])


def test_fixed_fraction_capped_by_budget():
    s = SizingConfig(method="fixed_fraction", fraction=0.5, max_position=0.4)
    np.testing.assert_allclose(size(np.array([1.0]), np.array([0.01]), s, budget=0.1), [0.1])
    np.testing.assert_allclose(size(np.array([1.0]), np.array([0.01]), s, budget=1.0), [0.4])
