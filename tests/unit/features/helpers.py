"""Bars and comparisons shared by the feature tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl

from signalgen.data.schema import BAR_SCHEMA
from signalgen.features.incremental import IncrementalFeatures
from signalgen.features.spec import FEATURE_NAMES

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def frame(o, h, lo, c, v, symbol: str = "X", timeframe: str = "1m") -> pl.DataFrame:
    """BAR_SCHEMA bars on a 1-minute grid from OHLCV arrays."""
    n = len(c)
    times = [T0 + timedelta(minutes=i + 1) for i in range(n)]
    return pl.DataFrame({"symbol": [symbol] * n, "timeframe": [timeframe] * n, "bar_time": times,
                         "open": o, "high": h, "low": lo, "close": c, "volume": v}, schema=BAR_SCHEMA)


def with_flat_stretches(bars: pl.DataFrame, every: int = 700) -> pl.DataFrame:
    """Repeated closes (h == l == c), zero- and constant-volume stretches: the fallbacks' cases."""
    c, h, lo, v = (bars[k].to_numpy().copy() for k in ("close", "high", "low", "volume"))
    for a in range(100, len(c), every):
        c[a:a + 90] = h[a:a + 90] = lo[a:a + 90] = c[a]
        v[a + 5:a + 40] = 0.0
        v[a + 50:a + 80] = 1234.5
    return bars.with_columns(open=pl.Series(np.r_[c[0], c[:-1]]), high=h, low=lo, close=c, volume=v)


def incremental_matrix(bars: pl.DataFrame) -> np.ndarray:
    inc = IncrementalFeatures()
    rows = bars.select("open", "high", "low", "close", "volume").iter_rows()
    return np.array([inc.update(*row) for row in rows])


def assert_close(a: np.ndarray, b: np.ndarray, abs_tol: float = 1e-9, rel_tol: float = 1e-7) -> None:
    """|a-b| <= abs_tol or |a-b| / max(|a|,|b|) <= rel_tol everywhere; NaN only where both are NaN."""
    assert a.shape == b.shape
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    assert np.array_equal(nan_a, nan_b), np.argwhere(nan_a != nan_b)[:5]
    ok = ~nan_a
    diff = np.abs(a[ok] - b[ok])
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = diff / np.maximum(np.abs(a[ok]), np.abs(b[ok]))
    bad = (diff > abs_tol) & ~(rel <= rel_tol)
    if bad.any():
        rows, cols = np.nonzero(ok)
        i = np.flatnonzero(bad)[0]
        raise AssertionError(f"{bad.sum()} values differ; first at bar {rows[i]}, "
                             f"{FEATURE_NAMES[cols[i]]}: {a[ok][i]!r} vs {b[ok][i]!r}")


def reference(o, h, lo, c, v) -> np.ndarray:
    """spec.py read literally: one window at a time, two-pass statistics, exact fallbacks."""
    n = len(c)
    out = np.full((n, 15), np.nan)
    ret = np.full(n, np.nan)
    ret[1:] = np.log(c[1:] / c[:-1])
    for t in range(n):
        def win(x, w):
            return x[t - w + 1: t + 1] if t >= w - 1 else None

        def std(x):
            return 0.0 if np.all(x == x[0]) else float(np.std(x, ddof=1))

        def mean(x):  # centred, so the mean is good to the last digit of x, not of sum(x)
            return x[0] + np.mean(x - x[0])

        row = {}
        for k in (1, 5, 15, 60):
            row[f"ret_{k}"] = np.log(c[t] / c[t - k]) if t >= k else np.nan
        r20, r60 = (win(ret, 20) if t >= 20 else None), (win(ret, 60) if t >= 60 else None)
        row["vol_20"] = std(r20) if r20 is not None else np.nan
        row["vol_60"] = std(r60) if r60 is not None else np.nan
        if r60 is None:
            row["vol_ratio"] = np.nan
        else:
            row["vol_ratio"] = 0.0 if row["vol_60"] == 0 else row["vol_20"] / row["vol_60"]
        if t >= 14:
            d = np.diff(c[t - 14: t + 1])
            gains, losses = d[d > 0].sum(), -d[d < 0].sum()
            row["rsi_14"] = 0.5 if gains + losses == 0 else gains / (gains + losses)
        else:
            row["rsi_14"] = np.nan
        c20, v20 = win(c, 20), win(v, 20)
        if c20 is not None:
            s = std(c20)
            row["zclose_20"] = 0.0 if s == 0 else (c[t] - mean(c20)) / s
            s = std(v20)
            row["zvolume_20"] = 0.0 if s == 0 else (v[t] - mean(v20)) / s
            row["volume_ratio_5_20"] = 1.0 if mean(v20) == 0 else mean(win(v, 5)) / mean(v20)
            row["hl_range_20"] = np.mean((h - lo)[t - 19: t + 1] / c[t - 19: t + 1])
        else:
            row.update(zclose_20=np.nan, zvolume_20=np.nan, volume_ratio_5_20=np.nan, hl_range_20=np.nan)
        row["hl_range"] = (h[t] - lo[t]) / c[t]
        row["close_location"] = 0.5 if h[t] == lo[t] else (c[t] - lo[t]) / (h[t] - lo[t])
        row["sma_ratio_10_50"] = mean(win(c, 10)) / mean(win(c, 50)) - 1 if t >= 49 else np.nan
        out[t] = [row[name] for name in FEATURE_NAMES]
    return out
