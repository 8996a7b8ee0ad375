from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.data.synthetic import synthetic_bars
from signalgen.features.batch import compute_features, feature_array, feature_matrix
from signalgen.features.spec import FEATURE_NAMES, WARMUP_BARS

from .helpers import T0, assert_close, frame, reference, with_flat_stretches

# First bar (0-based) at which each feature is defined.
FIRST_DEFINED = {"ret_1": 1, "ret_5": 5, "ret_15": 15, "ret_60": 60, "vol_20": 20, "vol_60": 60,
                 "vol_ratio": 60, "rsi_14": 14, "zclose_20": 19, "zvolume_20": 19, "volume_ratio_5_20": 19,
                 "hl_range": 0, "hl_range_20": 19, "close_location": 0, "sma_ratio_10_50": 49}


@st.composite
def bar_arrays(draw):
    """Random OHLCV with repeats (flat stretches) and zero volumes mixed in."""
    n = draw(st.integers(0, 260))
    level = draw(st.sampled_from([0.01, 1.0, 100.0, 50_000.0]))
    def series(choices):
        return np.asarray(draw(st.lists(st.sampled_from(choices), min_size=n, max_size=n)), dtype=float)

    moves = series([0.0, 0.0, 0.001, -0.001, 0.02, -0.02, 1e-9])
    c = level * np.exp(np.cumsum(moves))
    spread = series([0.0, 0.001, 0.01])
    h, lo = c * (1 + spread), c * (1 - spread)
    o = np.r_[c[:1], c[:-1]].clip(lo, h)
    v = series([0.0, 0.0, 1.0, 250.0, 1e6])
    return o, h, lo, c, v


@settings(max_examples=60, deadline=None)
@given(bar_arrays())
def test_matches_the_spec_read_literally(arrays):
    got = compute_features(frame(*arrays)).select(FEATURE_NAMES).to_numpy()
    assert_close(got, reference(*arrays).reshape(got.shape))


def test_warm_up_is_nan_then_every_feature_is_defined():
    bars = synthetic_bars(["BTCUSD"], "5m", T0, T0 + timedelta(days=1), seed=2)
    out = compute_features(bars)
    for name, first in FIRST_DEFINED.items():
        col = out[name].to_numpy()
        assert np.isnan(col[:first]).all() and not np.isnan(col[first:]).any(), name
        assert out[name].null_count() == 0  # NaN, not null
    assert max(FIRST_DEFINED.values()) == WARMUP_BARS - 1


def test_fallbacks_on_flat_bars():
    n = 80
    c = np.full(n, 100.0)
    out = compute_features(frame(c, c, c, c, np.zeros(n))).row(-1, named=True)
    assert out["vol_20"] == out["vol_60"] == out["vol_ratio"] == 0.0
    assert out["rsi_14"] == 0.5 and out["zclose_20"] == 0.0 and out["zvolume_20"] == 0.0
    assert out["volume_ratio_5_20"] == 1.0 and out["close_location"] == 0.5
    assert out["hl_range"] == out["hl_range_20"] == out["sma_ratio_10_50"] == out["ret_60"] == 0.0


def test_output_columns_types_and_matrix():
    bars = synthetic_bars(["BTCUSD", "ETHUSD"], "5m", T0, T0 + timedelta(days=1), seed=2)
    out = compute_features(bars)
    assert out.columns == bars.columns + list(FEATURE_NAMES)
    assert all(out.schema[name] == pl.Float64 for name in FEATURE_NAMES)
    m = feature_matrix(out)
    assert m.dtype == np.float32 and m.flags["C_CONTIGUOUS"] and m.shape == (bars.height, 15)
    assert np.array_equal(m[:, 4], out["vol_20"].to_numpy().astype(np.float32), equal_nan=True)


def test_symbols_are_computed_independently():
    bars = synthetic_bars(["BTCUSD", "ETHUSD"], "1m", T0, T0 + timedelta(hours=30), seed=2)
    bars = pl.concat([with_flat_stretches(g) for _, g in bars.group_by("symbol", maintain_order=True)])
    together = compute_features(bars)
    apart = pl.concat([compute_features(g) for _, g in bars.group_by("symbol", maintain_order=True)])
    assert together.equals(apart)


def test_interleaved_symbols_are_refused():
    bars = synthetic_bars(["BTCUSD", "ETHUSD"], "1h", T0, T0 + timedelta(hours=5), seed=2).sort("bar_time")
    with pytest.raises(ValueError, match="contiguous"):
        compute_features(bars)


def test_empty_frame():
    out = compute_features(frame([], [], [], [], []))
    assert out.height == 0 and out.columns[-15:] == list(FEATURE_NAMES)
    assert feature_matrix(out).shape == (0, 15)


def test_near_flat_prices_after_big_moves_keep_full_precision():
    # Big swings, then closes moving by 2e-8 relative: the variance is ~1e-12 of the block's
    # spread, where sums of squares lose most digits unless the window is recomputed exactly.
    rng = np.random.default_rng(5)
    parts = []
    for _ in range(6):
        parts.append(50_000 * np.exp(rng.normal(0, 0.02, 37)))
        parts.append(50_000 + np.cumsum(rng.choice([0.0, 1e-3, -1e-3], 90)))
    c = np.concatenate(parts)
    v = np.concatenate([rng.lognormal(8, 1, 37) if i % 2 == 0 else 1e6 + rng.choice([0.0, 1.0], 90)
                        for i in range(12)])
    arrays = (c, c, c, c, v)
    got = compute_features(frame(*arrays)).select(FEATURE_NAMES).to_numpy()
    assert_close(got, reference(*arrays))


def test_feature_array_equals_the_frame_route():
    bars = synthetic_bars(["BTCUSD", "ETHUSD"], "5m", T0, T0 + timedelta(days=2), seed=3)
    np.testing.assert_array_equal(feature_array(bars), feature_matrix(compute_features(bars)))
    assert feature_array(bars.head(0)).shape == (0, 15)
