"""The features of `spec.py`, one bar at a time in O(1) amortized: the live and simulation path.

Each rolling window keeps a ring buffer and running sums of (x - K), where the reference K is reset
to the newest value and the sums recomputed from the buffer every w updates. The sums therefore
never drift, and their rounding scales with the spread of recent values rather than with the price
level. As in `batch.py`, a window of equal values is detected exactly (run length of equal values),
and a variance tiny next to its running sums is recomputed two-pass from the buffer.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

_NAN = math.nan
_ILL_CONDITIONED = 1e-4  # same threshold as batch.py


class _Window:
    """Rolling mean and sample variance of the last w values."""

    __slots__ = ("w", "buf", "i", "n", "k", "s1", "s2", "mag", "since", "run", "last")

    def __init__(self, w: int) -> None:
        self.w = w
        self.buf: list[float] = []
        self.i = self.n = self.since = self.run = 0
        self.k = self.s1 = self.s2 = self.mag = 0.0
        self.last = _NAN

    def push(self, x: float) -> None:
        w, k = self.w, self.k
        if self.n < w:
            if self.n == 0:
                self.k = k = x
            self.buf.append(x)
            self.n += 1
        else:
            old = self.buf[self.i] - k
            self.buf[self.i] = x
            self.i = (self.i + 1) % w
            self.s1 -= old
            self.s2 -= old * old
            self.mag += old * old
        d = x - k
        self.s1 += d
        self.s2 += d * d
        self.mag += d * d  # size of everything summed since the recompute: the error is ~eps * mag
        self.run = self.run + 1 if x == self.last else 1
        self.last = x
        self.since += 1
        if self.since >= w:  # exact recompute around the newest value: no drift can build up
            self.since = 0
            self.k = x
            devs = [v - x for v in self.buf]
            self.s1 = math.fsum(devs)
            self.s2 = self.mag = math.fsum(d * d for d in devs)

    @property
    def full(self) -> bool:
        return self.n == self.w

    @property
    def flat(self) -> bool:
        """All w values equal (exact)."""
        return self.run >= self.w

    def mean(self) -> float:
        return self.last if self.run >= self.w else self.k + self.s1 / self.n

    def var(self) -> float:
        if self.run >= self.w:
            return 0.0
        n = self.n
        q = self.s2 - self.s1 * self.s1 / n
        if q < _ILL_CONDITIONED * self.mag:
            m = math.fsum(self.buf) / n
            devs = [v - m for v in self.buf]
            q = math.fsum(d * d for d in devs) - math.fsum(devs) ** 2 / n
        return max(q, 0.0) / (n - 1)


class IncrementalFeatures:
    """Feature vector of one symbol's bars, fed in bar_time order; equals `batch.compute_features`.

    Prices must be positive (validated bars): a log return of a zero price raises.
    """

    def __init__(self) -> None:
        self._log_closes: deque[float] = deque(maxlen=61)
        self._prev_close = _NAN
        self._r20, self._r60 = _Window(20), _Window(60)
        self._gain, self._loss = _Window(14), _Window(14)
        self._c10, self._c20, self._c50 = _Window(10), _Window(20), _Window(50)
        self._v5, self._v20 = _Window(5), _Window(20)
        self._hl20 = _Window(20)

    def update(self, open: float, high: float, low: float, close: float, volume: float) -> np.ndarray:
        """Add one bar; return the FEATURE_NAMES values at it (float64, NaN while warming up)."""
        # log(c_t / c_{t-k}) as a difference of logs, as batch.py computes it.
        log_closes = self._log_closes
        log_c = math.log(close)
        log_closes.append(log_c)
        n = len(log_closes)
        ret_1 = ret_5 = ret_15 = ret_60 = vol_20 = vol_60 = vol_ratio = rsi = _NAN
        if n > 1:
            ret_1 = log_c - log_closes[-2]
            self._r20.push(ret_1)
            self._r60.push(ret_1)
            diff = close - self._prev_close
            self._gain.push(diff if diff > 0.0 else 0.0)
            self._loss.push(-diff if diff < 0.0 else 0.0)
            if n > 5:
                ret_5 = log_c - log_closes[-6]
            if n > 15:
                ret_15 = log_c - log_closes[-16]
            if n > 60:
                ret_60 = log_c - log_closes[-61]
        self._prev_close = close
        c20, v20, hl20 = self._c20, self._v20, self._hl20
        for win in (self._c10, c20, self._c50):
            win.push(close)
        self._v5.push(volume)
        v20.push(volume)
        hl_range = (high - low) / close
        hl20.push(hl_range)

        if self._r20.full:
            vol_20 = math.sqrt(self._r20.var())
        if self._r60.full:
            vol_60 = math.sqrt(self._r60.var())
            vol_ratio = 0.0 if vol_60 == 0.0 else vol_20 / vol_60
        if self._gain.full:
            if c20.run >= 15:  # 14 zero changes
                rsi = 0.5
            else:
                g, lo = self._gain.mean(), self._loss.mean()
                rsi = 0.5 if g + lo == 0.0 else min(max(g / (g + lo), 0.0), 1.0)
        zclose = zvolume = volume_ratio = hl_range_20 = sma_ratio = _NAN
        if c20.full:
            std = math.sqrt(c20.var())
            zclose = 0.0 if std == 0.0 else (close - c20.mean()) / std
            std = math.sqrt(v20.var())
            zvolume = 0.0 if std == 0.0 else (volume - v20.mean()) / std
            mean_20 = v20.mean()
            volume_ratio = 1.0 if mean_20 == 0.0 else self._v5.mean() / mean_20
            hl_range_20 = hl20.mean()
        if self._c50.full:
            sma_ratio = self._c10.mean() / self._c50.mean() - 1.0
        close_location = 0.5 if high == low else (close - low) / (high - low)
        # In FEATURE_NAMES order.
        return np.array((ret_1, ret_5, ret_15, ret_60, vol_20, vol_60, vol_ratio, rsi, zclose, zvolume,
                         volume_ratio, hl_range, hl_range_20, close_location, sma_ratio))

