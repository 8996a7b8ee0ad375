"""The feature set, defined once. `batch.py` (whole series) and `incremental.py` (one bar at a
time) implement it with the same window arithmetic (`kernel.py`), so they agree bit for bit.

Every feature is a function of a finite window of past bars (no EWM state), and every rolling
statistic is a fixed tree of operations over its window's own bars, so a value at bar t depends
only on bars t-WARMUP_BARS+1 .. t: chunked batch runs, bar-by-bar replay and full-series runs
agree exactly, whatever bar they started from.
"""

from __future__ import annotations

FEATURE_NAMES: tuple[str, ...] = (
    "ret_1",            # log(c_t / c_{t-1})
    "ret_5",            # log(c_t / c_{t-5})
    "ret_15",           # log(c_t / c_{t-15})
    "ret_60",           # log(c_t / c_{t-60})
    "vol_20",           # sample std (ddof=1) of ret_1 over 20 bars: realized volatility per bar
    "vol_60",           # sample std of ret_1 over 60 bars
    "vol_ratio",        # vol_20 / vol_60 (0 when vol_60 == 0)
    "rsi_14",           # simple (Cutler) RSI over 14 close changes, scaled to [0, 1]; 0.5 when flat
    "zclose_20",        # (c - mean(c, 20)) / std(c, 20); 0 when std == 0
    "zvolume_20",       # (v - mean(v, 20)) / std(v, 20); 0 when std == 0
    "volume_ratio_5_20",  # mean(v, 5) / mean(v, 20); 1 when mean(v, 20) == 0
    "hl_range",         # (h - l) / c
    "hl_range_20",      # mean(hl_range, 20)
    "close_location",   # (c - l) / (h - l); 0.5 when h == l
    "sma_ratio_10_50",  # mean(c, 10) / mean(c, 50) - 1: the trend feature
)

# Bars needed before every feature is defined: ret_60 needs 61 closes.
WARMUP_BARS = 61
