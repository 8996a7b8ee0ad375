import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from signalgen.errors import ConfigError
from signalgen.features.spec import FEATURE_NAMES
from signalgen.models.backends import MockPredictor, load_predictor
from signalgen.models.registry import ModelRegistry

from .helpers import register_fake

MOMENTUM, VOL = FEATURE_NAMES.index("ret_15"), FEATURE_NAMES.index("vol_20")


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    reg = ModelRegistry(tmp_path_factory.mktemp("registry"))
    return register_fake(reg, "swing_high"), register_fake(reg, "swing_low", payload=b"l", direction=-1)


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURE_NAMES))).astype(np.float32)
    x[:, VOL] = np.abs(x[:, VOL]) * 0.002 + 1e-4
    x[:, MOMENTUM] *= 0.002 * np.sqrt(15)
    return x


def test_deterministic_and_in_open_unit_interval(cards):
    x = _rows(10_000)
    p = MockPredictor(cards[0], seed=3).predict(x)
    assert p.dtype == np.float64 and p.shape == (10_000,)
    assert np.array_equal(p, MockPredictor(cards[0], seed=3).predict(x))
    assert ((p > 0) & (p < 1)).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 2**31))
def test_chunking_does_not_change_outputs(cards, a, b, seed):
    x = _rows(300, seed=seed % 1000)
    a, b = min(a, b), max(a, b)
    m = MockPredictor(cards[0], seed=seed)
    assert np.array_equal(m.predict(x)[a:b], m.predict(x[a:b]))


@given(arrays(np.float32, st.tuples(st.integers(1, 20), st.just(len(FEATURE_NAMES)))))
def test_any_values_give_probabilities(cards, x):
    # NaN, inf and zero volatility included: a mock must never emit a bad output
    p = MockPredictor(cards[0], seed=1).predict(x)
    assert ((p > 0) & (p < 1)).all()


def test_predict_one_equals_predict_bit_for_bit(cards):
    """The per-bar path's scalar predict_one gives predict's float64 exactly, bad values included."""
    x = _rows(5_000, seed=7)
    x[:40, VOL] = 0.0                 # zero volatility: x/0 -> no lean
    x[40:80, MOMENTUM] = np.nan
    x[80:120, VOL] = np.inf
    x[120:160, 5] = np.nan            # NaN elsewhere only changes the hash
    x[160:200, MOMENTUM] = -np.inf
    x[200:240, MOMENTUM], x[200:240, VOL] = 0.0, 0.0   # 0/0
    for card in cards:
        for seed in (0, 5):
            m = MockPredictor(card, seed=seed)
            whole = m.predict(x)
            one = np.array([m.predict_one(row) for row in x])
            assert np.array_equal(whole.view(np.uint64), one.view(np.uint64))
    m = MockPredictor(cards[0], seed=1)  # a float64 or strided row is converted as predict converts it
    assert m.predict_one(x[3].astype(np.float64)) == m.predict(x[3:4])[0] == m.predict_one(x[:, :][3])
    assert m.predict_one(np.asfortranarray(x)[3]) == m.predict(x[3:4])[0]


@given(arrays(np.float32, st.just(len(FEATURE_NAMES))))
def test_predict_one_equals_predict_for_any_row(cards, row):
    m = MockPredictor(cards[1], seed=2)
    assert np.float64(m.predict_one(row)).view(np.uint64) == m.predict(row[None, :]).view(np.uint64)[0]


def test_output_depends_on_row_content_seed_and_model(cards):
    x = _rows(2_000)
    high, low = cards
    p = MockPredictor(high, seed=1).predict(x)
    assert np.array_equal(p[::-1], MockPredictor(high, seed=1).predict(x[::-1]))  # row order irrelevant
    assert np.mean(p == MockPredictor(high, seed=2).predict(x)) < 0.01
    assert np.mean(p == MockPredictor(low, seed=1).predict(x)) < 0.01
    x2 = x.copy()
    x2[:, 3] = np.nextafter(x2[:, 3], np.float32(np.inf))  # one ulp in one feature
    assert np.mean(p == MockPredictor(high, seed=1).predict(x2)) < 0.01


def test_roughly_uniform_with_a_lean_toward_the_direction(cards):
    x = _rows(200_000)
    high, low = (MockPredictor(c, seed=5).predict(x) for c in cards)
    hist = np.histogram(high, bins=10, range=(0, 1))[0] / len(x)
    assert hist.min() > 0.05 and hist.max() < 0.15  # no bin far from 10%
    rising = x[:, MOMENTUM] > 0
    assert high[rising].mean() > high[~rising].mean() + 0.05
    assert low[~rising].mean() > low[rising].mean() + 0.05
    assert 0.2 < (high >= 0.6).mean() < 0.6  # signals at a 0.6 threshold


def test_at_least_a_million_rows_per_second(cards):
    x = _rows(1_000_000)
    m = MockPredictor(cards[0], seed=0)
    m.predict(x[:1000])
    t = time.perf_counter()
    m.predict(x)
    assert time.perf_counter() - t < 1.0


def test_load_mock_needs_the_card(tmp_path):
    reg = ModelRegistry(tmp_path)
    register_fake(reg)
    assert isinstance(load_predictor(reg, "swing_high", "mock", seed=2), MockPredictor)
    with pytest.raises(ConfigError, match="swing_low"):
        load_predictor(reg, "swing_low", "mock")
