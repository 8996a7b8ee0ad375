"""Per-bar (incremental) and batch features are bit-identical, whatever came before.

Simulation and live prepare features one bar at a time, historical over whole chunks; a decision
depends on the features through float32 casts and filter thresholds, so 1 ulp could flip it. The
two paths share `kernel.py`, and every comparison here is of the float64 bits (NaN where NaN).
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.data.sample import sample_bars
from signalgen.data.synthetic import synthetic_bars
from signalgen.features import batch
from signalgen.features.batch import compute_features, feature_array
from signalgen.features.spec import FEATURE_NAMES, WARMUP_BARS

from .helpers import T0, incremental_matrix, with_flat_stretches


def assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Same shape, NaN at the same places, and every other value the same 64 bits (so +0 != -0)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float64
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    assert np.array_equal(nan_a, nan_b), np.argwhere(nan_a != nan_b)[:5]
    assert np.array_equal(a, b, equal_nan=True)
    differ = np.argwhere((a.view(np.int64) != b.view(np.int64)) & ~nan_a)
    assert differ.size == 0, [(int(i), FEATURE_NAMES[j], a[i, j], b[i, j]) for i, j in differ[:5]]


def batch_matrix(bars: pl.DataFrame) -> np.ndarray:
    return compute_features(bars).select(FEATURE_NAMES).to_numpy()


def check_parity(bars: pl.DataFrame) -> np.ndarray:
    full = batch_matrix(bars)
    assert_bits_equal(full, incremental_matrix(bars))
    assert not np.isnan(full[WARMUP_BARS - 1:]).any()
    return full


@pytest.mark.parametrize("timeframe, bars", [("1m", 6_000), ("1h", 4_000)])
def test_synthetic_with_flat_stretches(timeframe, bars):
    delta = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1)}[timeframe]
    raw = synthetic_bars(["BTCUSD"], timeframe, T0, T0 + bars * delta, seed=21)
    check_parity(with_flat_stretches(raw))


def test_synthetic_without_changes():
    check_parity(synthetic_bars(["ETHUSD"], "5m", T0, T0 + timedelta(days=10), seed=4))


def test_bars_with_gaps():
    """Validated bars with holes in time: the features count bars, not minutes, on both paths."""
    bars = synthetic_bars(["BTCUSD"], "1m", T0, T0 + timedelta(minutes=5_000), seed=8)
    rng = np.random.default_rng(8)
    keep = rng.random(bars.height) > 0.2
    keep[1_000:1_300] = False  # and one long gap
    check_parity(bars.filter(pl.Series(keep)))


def test_across_tiles():
    """Longer than batch's tile: values on both sides of every tile edge match per-bar ones."""
    n = 2 * batch._TILE + 500
    check_parity(synthetic_bars(["SOLUSD"], "1m", T0, T0 + n * timedelta(minutes=1), seed=2))


def test_real_daily_sample():
    bars = sample_bars()
    sizes = []
    for (symbol,), part in bars.group_by("symbol", maintain_order=True):
        sizes.append(part.height)
        check_parity(part.sort("bar_time"))
    assert len(sizes) >= 2 and max(sizes) > 3_000


GAPPY = with_flat_stretches(synthetic_bars(["BTCUSD"], "1m", T0, T0 + timedelta(minutes=3_000), seed=5),
                            every=500)
GAPPY_FULL = batch_matrix(GAPPY)


@settings(max_examples=30, deadline=None)
@given(start=st.integers(0, GAPPY.height - WARMUP_BARS - 1))
def test_any_history_start_gives_the_same_bits(start):
    """A series cut anywhere: once its first WARMUP_BARS have passed, batch and per-bar values equal
    those of the uncut series bit for bit (history is loaded by bar count from anywhere)."""
    cut = GAPPY.slice(start)
    settled = slice(WARMUP_BARS - 1, None)
    assert_bits_equal(batch_matrix(cut)[settled], GAPPY_FULL[start:][settled])
    if start % 5 == 0:  # per-bar on a fifth of them: it is the slow path
        assert_bits_equal(incremental_matrix(cut)[settled], GAPPY_FULL[start:][settled])


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, GAPPY.height - 1), max_size=8, unique=True),
       history=st.integers(WARMUP_BARS, 3 * WARMUP_BARS))
def test_any_chunking_gives_the_same_bits(cuts, history):
    """Chunks each preceded by `history` bars of context, as the batch runner feeds them."""
    bounds = [0, *sorted(cuts), GAPPY.height]
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        ctx = max(0, lo - history)
        parts.append(feature_array(GAPPY.slice(ctx, hi - ctx))[lo - ctx:])
    assert np.array_equal(np.concatenate(parts), GAPPY_FULL.astype(np.float32), equal_nan=True)


def test_overflowing_windows_are_nan_on_both_paths():
    """Values beyond MAX_BAR_VALUE (validation removes them) overflow the squares: no z-score, and
    NaN at the same bars per bar and in batch."""
    bars = synthetic_bars(["X"], "1m", T0, T0 + timedelta(minutes=200), seed=5)
    spike = pl.int_range(pl.len()) == 100
    bars = bars.with_columns(*(pl.when(spike).then(1e308).otherwise(c).alias(c) for c in ("high", "close", "volume")))
    with np.errstate(over="ignore", invalid="ignore"):
        full = batch_matrix(bars)
        assert_bits_equal(full, incremental_matrix(bars))
    z = FEATURE_NAMES.index("zclose_20")
    assert np.isnan(full[100:120, z]).all() and np.isfinite(full[120:, z]).all()
