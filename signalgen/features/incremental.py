"""The features of `spec.py`, one bar at a time: the live and simulation path.

Bit-identical to `batch.py` (and so to historical mode): each window is the same tree of
operations (`kernel.py`) over the same bars, kept here as ring buffers of power-of-two nodes. A new
bar costs O(log w) merges per window, about 40 in all (~7 us per bar in CPython on this machine,
with the merges inlined; the running sums this replaced took ~11 us but rounded differently from
batch), whatever came before.
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


_FULL = WARMUP_BARS + 3  # ring length: from this many values on, every node a window reads exists


class _Nodes:
    """Ring buffers of one series' nodes, one per size, for the windows asked for.

    `add` runs the level merges of `batch._nodes` and `kernel.window` as chains of merges over
    precomputed ring positions (the same merges in the same order; tests compare bit for bit): the
    first chain builds the new node of each size from the one below, each later one folds a
    window's older nodes into its newest. Once the rings are full (`_FULL` values) every node
    exists, and `kernel.merge_pair` runs inlined (the same expressions, so the same bits): ~40
    merges per bar cost about half as much without a call each. The first values go through the
    general path, which marks nodes that would reach before the first value as empty (NaN).
    """

    __slots__ = ("leaf", "chains", "paired", "empty", "count")

    def __init__(self, windows: tuple[int, ...], paired: bool) -> None:
        sizes = kernel.levels(windows)
        rings = {k: deque(maxlen=_FULL) for k in sizes}
        self.leaf = rings[1]
        # a chain: the ring whose newest node it starts from, then per merge (the ring of the older
        # node, its index, the merge weights, the ring the result goes to or None)
        levels = (rings[1], [(rings[k >> 1], -1 - (k >> 1), *kernel.level_weights(k), rings[k]) for k in sizes[1:]])
        self.chains = [levels] + [(rings[kernel.parts(w)[0]],
                                   [(rings[size], -1 - offset, share, cross, None)
                                    for size, offset, share, cross in kernel.plan(w)])
                                  for w in windows]
        self.paired = paired
        self.empty = _NAN_PAIR if paired else _NAN
        self.count = 0  # values pushed, up to the ring length: below it, a node may lie before the start

    def add(self, x: float) -> list:
        """Push the next value; return the node of each window (in the order asked for) ending at it."""
        if self.count < _FULL:
            return self._add_filling(x)
        out = []
        if not self.paired:
            self.leaf.append(x)
            for start, steps in self.chains:
                acc = start[-1]
                for ring, back, _, _, dest in steps:
                    acc = ring[back] + acc
                    if dest is not None:
                        dest.append(acc)
                out.append(acc)
            return out[1:]
        self.leaf.append((x, 0.0, 0.0))
        for start, steps in self.chains:
            m_b, low_b, q_b = start[-1]  # the newer node of kernel.merge_pair, inlined below
            for ring, back, share, cross, dest in steps:
                m_a, low_a, q_a = ring[back]
                d = (m_b - m_a) + (low_b - low_a)
                step = d * share
                m = m_a + step
                t = m - m_a
                m_b, low_b, q_b = m, low_a + ((m_a - (m - t)) + (step - t)), q_a + q_b + d * d * cross
                if dest is not None:
                    dest.append((m_b, low_b, q_b))
            out.append((m_b, low_b, q_b))
        return out[1:]

    def _add_filling(self, x: float) -> list:
        paired, empty = self.paired, self.empty
        self.leaf.append((x, 0.0, 0.0) if paired else x)
        self.count += 1
        out = []
        for start, steps in self.chains:
            acc = start[-1]
            for ring, back, share, cross, dest in steps:
                exists = len(ring) >= -back
                if dest is not None and not exists:
                    acc = empty  # a level node reaching before the first value
                else:  # a window merges an empty node (NaN) like any other
                    older = ring[back] if exists else empty
                    acc = kernel.merge_pair(older, acc, share, cross) if paired else older + acc
                if dest is not None:
                    dest.append(acc)
            out.append(acc)
        return out[1:]


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

    def update(self, open: float, high: float, low: float, close: float, volume: float) -> tuple[float, ...]:
        """Add one bar; return the FEATURE_NAMES values at it (floats, NaN while warming up).

        `kernel.mean` (mean + mean_low of a pair node, sum / w of a sum node) and `kernel.variance`
        (M2 / (w - 1)) are written out: the same operations, one call less each.
        """
        # numpy's log, not math.log: a SIMD log may round differently from libm's, and batch uses numpy.
        log_c = float(np.log(close))
        log_closes = self._log_closes
        log_closes.append(log_c)
        if len(log_closes) == WARMUP_BARS:
            ret_1, ret_5, ret_15, ret_60 = (log_c - log_closes[-2], log_c - log_closes[-6], log_c - log_closes[-16],
                                            log_c - log_closes[-61])
        else:
            n = len(log_closes)
            ret_1, ret_5, ret_15, ret_60 = (log_c - log_closes[-1 - k] if n > k else _NAN for k in (1, 5, 15, 60))
        diff = close - self._prev_close
        self._prev_close = close
        r20, r60 = self._rets.add(ret_1)
        g14, = self._gains.add(diff if diff >= 0.0 or diff != diff else 0.0)  # np.maximum(diff, 0.0)
        diff = -diff
        l14, = self._losses.add(diff if diff >= 0.0 or diff != diff else 0.0)
        c10, c20, c50 = self._closes.add(close)
        v5, v20 = self._volumes.add(volume)
        hl_range = (high - low) / close
        hl20, = self._ranges.add(hl_range)

        vol_20 = math.sqrt(r20[2] / 19)
        vol_60 = math.sqrt(r60[2] / 59)
        vol_ratio = _NAN if vol_60 != vol_60 else 0.0 if vol_60 == 0.0 else vol_20 / vol_60
        gain = g14 / 14
        loss = l14 / 14
        total = gain + loss  # 0 exactly when all 14 changes are 0 (sums of values >= 0)
        rsi = _NAN if total != total else 0.5 if total == 0.0 else min(max(gain / total, 0.0), 1.0)
        mean, std = c20[0] + c20[1], math.sqrt(c20[2] / 19)
        # as in batch: a window whose squares overflow has no defined z-score
        zclose = _NAN if mean != mean or std == math.inf else 0.0 if std == 0.0 else (close - mean) / std
        mean, std = v20[0] + v20[1], math.sqrt(v20[2] / 19)
        zvolume = _NAN if mean != mean or std == math.inf else 0.0 if std == 0.0 else (volume - mean) / std
        volume_ratio = _NAN if mean != mean else 1.0 if mean == 0.0 else (v5[0] + v5[1]) / mean
        hl_range_20 = hl20 / 20
        close_location = 0.5 if high == low else (close - low) / (high - low)
        sma_ratio = (c10[0] + c10[1]) / (c50[0] + c50[1]) - 1.0
        # In FEATURE_NAMES order.
        return (ret_1, ret_5, ret_15, ret_60, vol_20, vol_60, vol_ratio, rsi, zclose, zvolume,
                volume_ratio, hl_range, hl_range_20, close_location, sma_ratio)
