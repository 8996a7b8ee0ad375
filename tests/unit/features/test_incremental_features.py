from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.features import kernel
from signalgen.features.incremental import IncrementalFeatures, _Nodes
from signalgen.features.spec import FEATURE_NAMES

from .helpers import assert_close, reference


class _Window:
    """One (mean, M2) window of `_Nodes`, read the way the features read it."""

    def __init__(self, w: int) -> None:
        self.w, self.nodes, self.values, self.node = w, _Nodes((w,), paired=True), [], None

    def push(self, x: float) -> None:
        [self.node] = self.nodes.add(x)
        self.values = (self.values + [x])[-self.w:]

    def mean(self) -> float:
        return kernel.mean(self.node, self.w)

    def var(self) -> float:
        return kernel.variance(self.node, self.w)

    @property
    def flat(self) -> bool:
        return len(self.values) == self.w and all(v == self.values[0] for v in self.values)


def test_window_parts_are_binary_digits_newest_first():
    assert kernel.parts(60) == (32, 16, 8, 4) and kernel.parts(20) == (16, 4) and kernel.parts(5) == (4, 1)
    assert all(sum(kernel.parts(w)) == w for w in range(1, 200))
    assert kernel.levels((20, 60)) == (1, 2, 4, 8, 16, 32)


def test_a_flat_window_is_exactly_its_value_with_variance_zero():
    win = _Window(20)
    for x in [3.0, 7.0] + [101.37] * 20:
        win.push(x)
    assert win.mean() == 101.37 and win.var() == 0.0


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 150), level=st.sampled_from([1e-3, 1.0, 100.0, 1e6]),
       steps=st.lists(st.sampled_from([0.0, 0.0, 1e-9, -1e-9, 1e-4, -1e-4, 0.03]), min_size=150,
                      max_size=150))
def test_window_matches_two_pass_statistics(n, level, steps):
    xs = level * np.exp(np.cumsum(steps[:n]))
    win = _Window(20)
    for i, x in enumerate(xs):
        win.push(float(x))
        if i >= 19:
            last = xs[i - 19: i + 1]
            exact = 0.0 if np.all(last == last[0]) else np.var(last, ddof=1)
            assert abs(win.var() - exact) <= 1e-9 * exact + 1e-300, (i, win.var(), exact)
            assert abs(win.mean() - last.mean()) <= 1e-12 * abs(last.mean())
            assert (win.var() == 0.0) == bool(np.all(last == last[0]))


def test_no_drift_over_a_long_run():
    rng = np.random.default_rng(3)
    xs = 1e4 + np.cumsum(rng.normal(0, 1e-3, 200_000))  # far from zero, tiny moves
    win = _Window(60)
    for x in xs:
        win.push(float(x))
    assert abs(win.var() - np.var(xs[-60:], ddof=1)) <= 1e-10 * np.var(xs[-60:], ddof=1)


def test_update_returns_the_spec_values_bar_by_bar():
    rng = np.random.default_rng(8)
    c = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 120)))
    c[70:90] = c[70]  # flat stretch
    h, lo = c * 1.002, c * 0.998
    h[70:90] = lo[70:90] = c[70:90]
    o, v = np.r_[c[0], c[:-1]].clip(lo, h), rng.lognormal(5, 1, 120)
    v[30:55] = 0.0
    inc = IncrementalFeatures()
    got = np.array([inc.update(*bar) for bar in zip(o, h, lo, c, v)])
    assert got.dtype == np.float64 and got.shape == (120, len(FEATURE_NAMES))
    assert_close(got, reference(o, h, lo, c, v))


def test_near_flat_after_big_moves():
    rng = np.random.default_rng(5)
    xs = np.concatenate([50_000 * np.exp(rng.normal(0, 0.02, 37)),
                         50_000 + np.cumsum(rng.choice([0.0, 1e-3, -1e-3], 90))])
    win = _Window(20)
    for i, x in enumerate(xs):
        win.push(float(x))
        if i >= 19 and not win.flat:
            exact = np.var(xs[i - 19: i + 1], ddof=1)
            assert abs(win.var() - exact) <= 1e-9 * exact, (i, win.var(), exact)
