"""Validation of candidates: completeness, staleness, feature finiteness, model health, consistency.

Pure and vectorized: arrays in, boolean masks out. One bar may be evaluated alone (live) or a
million at once (historical) through the same functions.
"""

from __future__ import annotations

import numpy as np



def window_complete(bar_time_us: np.ndarray, lookback: int, max_gap_us: int) -> np.ndarray:
    """True where the `lookback` bars ending at each bar exist and no gap inside exceeds `max_gap_us`.

    `bar_time_us` is one symbol's bar end times in ascending order; the first `lookback - 1` rows
    cannot be complete because their window starts before the data does.
    """
    n = bar_time_us.size
    gap = np.zeros(n, dtype=np.int64)
    gap[1:] = np.diff(bar_time_us) > max_gap_us
    gaps_before = np.cumsum(gap)  # gaps between row 0 and row i
    ok = np.zeros(n, dtype=bool)
    if lookback <= n:
        start = np.arange(lookback - 1, n) - (lookback - 1)
        ok[lookback - 1:] = gaps_before[lookback - 1:] == gaps_before[start]
    return ok


class WindowCheck:
    """`window_complete` one bar at a time: True once `lookback` bars in a row (from the first bar
    pushed) have no gap above `max_gap_us` between neighbours. Equal to `window_complete` over the
    same bars from the same first bar."""

    __slots__ = ("lookback", "max_gap_us", "run", "last")

    def __init__(self, lookback: int, max_gap_us: int) -> None:
        self.lookback, self.max_gap_us = lookback, max_gap_us
        self.run, self.last = 0, None

    def push(self, bar_time_us: int) -> bool:
        gap = self.last is not None and bar_time_us - self.last > self.max_gap_us
        self.run = 1 if gap else self.run + 1
        self.last = bar_time_us
        return self.run >= self.lookback


def stale(bar_time_us: np.ndarray, now_us: np.ndarray | int, max_staleness_us: int) -> np.ndarray:
    """True where the newest bar is older than allowed at evaluation time `now_us`."""
    return (np.asarray(now_us, dtype=np.int64) - bar_time_us) > max_staleness_us


def non_finite_rows(features: np.ndarray) -> np.ndarray:
    """True where any feature of the row is NaN or infinite."""
    return ~np.isfinite(features).all(axis=1)


def bad_outputs(p: np.ndarray) -> np.ndarray:
    """Boolean mask of outputs that are not finite probabilities in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(p) | (p < 0.0) | (p > 1.0)


def bad_model_rows(predictions: np.ndarray, model_ok: np.ndarray) -> np.ndarray:
    """True where any model is unhealthy for the run or produced a non-finite / out-of-range output."""
    return (bad_outputs(predictions) | ~model_ok[None, :]).any(axis=1)


def duplicate_rows(bar_time_us: np.ndarray) -> np.ndarray:
    """True for every repeat of an earlier bar time: one bar never yields two signals."""
    _, first = np.unique(bar_time_us, return_index=True)
    dup = np.ones(bar_time_us.size, dtype=bool)
    dup[first] = False
    return dup
