"""The features of `spec.py`, one bar at a time: the live and simulation path.

Bit-identical to `batch.py` (and so to historical mode): each window is the same tree of
operations (`kernel.py`) over the same bars, kept here as ring buffers of power-of-two nodes. A new
bar costs O(log w) merges per window, about 40 in all (p50 ~20 us in CPython on this machine; the
running sums this replaced took ~11 us but rounded differently from batch), whatever came before.
A running sum would be O(1) but its rounding would depend on where it started (the first bar, or
the last recompute), so per-bar and batch values could differ in the last bit and flip a filter
threshold or a float32 cast of a feature.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from signalgen.features import kernel
from signalgen.features.spec import WARMUP_BARS

_NAN = math.nan
_NAN_PAIR = (_NAN, _NAN, _NAN)


def maximum(a: float, b: float) -> float:
    """np.maximum for two floats: NaN propagates, and a is kept when a == b (signed zeros)."""
    return a if a >= b or a != a else b


_merge_pair = kernel.merge_pair  # a module global: one lookup less per merge, ~40 merges per bar


class _Nodes:
    """Ring buffers of one series' nodes, one per size, for the windows asked for.

    `push` and `window` are `kernel.window` and the level merges of `batch._nodes`, unrolled over
    precomputed ring positions (the same merges in the same order; tests compare bit for bit).
    """

    __slots__ = ("rings", "ups", "plans", "paired", "empty", "count")

    def __init__(self, windows: tuple[int, ...], paired: bool) -> None:
        sizes = kernel.levels(windows)
        self.rings = rings = {k: deque(maxlen=WARMUP_BARS + 3) for k in sizes}
        # per size above 1: its ring, its halves' ring, the older half's index, merge weights
        self.ups = [(rings[k], rings[k >> 1], -1 - (k >> 1), *kernel.level_weights(k)) for k in sizes[1:]]
        self.plans = {w: (rings[kernel.parts(w)[0]],
                          [(rings[size], -1 - offset, share, cross) for size, offset, share, cross in kernel.plan(w)])
                      for w in windows}
        self.paired = paired
        self.empty = _NAN_PAIR if paired else _NAN
        self.count = 0  # values pushed, up to the ring length: below it, a node may lie before the start

    def push(self, x: float) -> None:
        paired, empty = self.paired, self.empty
        self.rings[1].append((x, 0.0, 0.0) if paired else x)
        warm = self.count >= WARMUP_BARS + 3
        if not warm:
            self.count += 1
        for ring, half, back, share, cross in self.ups:
            if not warm and len(half) < -back:
                ring.append(empty)
            elif paired:
                ring.append(_merge_pair(half[back], half[-1], share, cross))
            else:
                ring.append(half[back] + half[-1])

    def window(self, w: int):
        newest, steps = self.plans[w]
        acc = newest[-1]
        warm, paired, empty = self.count >= WARMUP_BARS + 3, self.paired, self.empty
        for ring, back, share, cross in steps:
            older = ring[back] if warm or len(ring) >= -back else empty
            acc = _merge_pair(older, acc, share, cross) if paired else older + acc
        return acc


class IncrementalFeatures:
    """Feature vector of one symbol's bars, fed in bar_time order; bit-equal to `batch.compute_features`
    over the same bars, whatever bars came before the last WARMUP_BARS.

    Prices must be positive (validated bars): a log of a zero price is -inf, as in batch.
    """

    def __init__(self) -> None:
        self._log_closes: deque[float] = deque(maxlen=WARMUP_BARS)
        self._prev_close = _NAN
        self._rets = _Nodes((20, 60), paired=True)
        self._closes = _Nodes((10, 20, 50), paired=True)
        self._volumes = _Nodes((5, 20), paired=True)
        self._gains, self._losses = _Nodes((14,), paired=False), _Nodes((14,), paired=False)
        self._ranges = _Nodes((20,), paired=False)

    def update(self, open: float, high: float, low: float, close: float, volume: float) -> np.ndarray:
        """Add one bar; return the FEATURE_NAMES values at it (float64, NaN while warming up)."""
        # numpy's log, not math.log: a SIMD log may round differently from libm's, and batch uses numpy.
        log_c = float(np.log(close))
        log_closes = self._log_closes
        log_closes.append(log_c)
        n = len(log_closes)
        ret_1, ret_5, ret_15, ret_60 = (log_c - log_closes[-1 - k] if n > k else _NAN for k in (1, 5, 15, 60))
        diff = close - self._prev_close
        self._prev_close = close
        self._rets.push(ret_1)
        self._gains.push(maximum(diff, 0.0))
        self._losses.push(maximum(-diff, 0.0))
        self._closes.push(close)
        self._volumes.push(volume)
        hl_range = (high - low) / close
        self._ranges.push(hl_range)

        vol_20 = math.sqrt(kernel.variance(self._rets.window(20), 20))
        vol_60 = math.sqrt(kernel.variance(self._rets.window(60), 60))
        vol_ratio = _NAN if vol_60 != vol_60 else 0.0 if vol_60 == 0.0 else vol_20 / vol_60
        gain = kernel.mean(self._gains.window(14), 14)
        loss = kernel.mean(self._losses.window(14), 14)
        total = gain + loss  # 0 exactly when all 14 changes are 0 (sums of values >= 0)
        rsi = _NAN if total != total else 0.5 if total == 0.0 else min(max(gain / total, 0.0), 1.0)
        c20 = self._closes.window(20)
        mean, std = kernel.mean(c20, 20), math.sqrt(kernel.variance(c20, 20))
        # as in batch: a window whose squares overflow has no defined z-score
        zclose = _NAN if mean != mean or std == math.inf else 0.0 if std == 0.0 else (close - mean) / std
        v20 = self._volumes.window(20)
        mean, std = kernel.mean(v20, 20), math.sqrt(kernel.variance(v20, 20))
        zvolume = _NAN if mean != mean or std == math.inf else 0.0 if std == 0.0 else (volume - mean) / std
        volume_ratio = _NAN if mean != mean else 1.0 if mean == 0.0 else kernel.mean(self._volumes.window(5), 5) / mean
        hl_range_20 = kernel.mean(self._ranges.window(20), 20)
        close_location = 0.5 if high == low else (close - low) / (high - low)
        sma_ratio = kernel.mean(self._closes.window(10), 10) / kernel.mean(self._closes.window(50), 50) - 1.0
        # In FEATURE_NAMES order.
        return np.array((ret_1, ret_5, ret_15, ret_60, vol_20, vol_60, vol_ratio, rsi, zclose, zvolume,
                         volume_ratio, hl_range, hl_range_20, close_location, sma_ratio))
