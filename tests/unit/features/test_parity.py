"""Batch (polars/numpy) and incremental (per bar) features agree after warm-up."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from signalgen.data.files import FilesSource
from signalgen.data.sample import import_sample
from signalgen.data.synthetic import synthetic_bars
from signalgen.features.batch import compute_features
from signalgen.features.spec import FEATURE_NAMES, WARMUP_BARS

from .helpers import T0, assert_close, incremental_matrix, with_flat_stretches


def check_parity(bars) -> None:
    batch = compute_features(bars).select(FEATURE_NAMES).to_numpy()
    incremental = incremental_matrix(bars)
    assert_close(batch[WARMUP_BARS - 1:], incremental[WARMUP_BARS - 1:])
    assert not np.isnan(batch[WARMUP_BARS - 1:]).any()
    # Warm-up too: the same features are defined (or NaN) at the same bars.
    assert np.array_equal(np.isnan(batch), np.isnan(incremental))


@pytest.mark.parametrize("timeframe, bars", [("1m", 6_000), ("1h", 4_000)])
def test_synthetic_with_flat_stretches(timeframe, bars):
    delta = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1)}[timeframe]
    raw = synthetic_bars(["BTCUSD"], timeframe, T0, T0 + bars * delta, seed=21)
    check_parity(with_flat_stretches(raw))


def test_synthetic_without_changes():
    check_parity(synthetic_bars(["ETHUSD"], "5m", T0, T0 + timedelta(days=10), seed=4))


@pytest.mark.parametrize("ticker", ["AAPL", "MSFT"])
def test_real_sample_bars(tmp_path, ticker):
    import_sample(tmp_path)
    bars = FilesSource(tmp_path).load(ticker, "1d")
    assert bars.height == 3270
    check_parity(bars)
