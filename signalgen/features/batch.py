"""The features of `spec.py`, vectorized over whole series (numpy under a polars frame).

Rolling sums come from prefix sums that restart every _BLOCK bars and are centred on the first value
of their block; a window (w <= _BLOCK) is the current block's prefix plus the previous block's
suffix, re-centred. The rounding error therefore scales with the spread of values over two blocks,
not with the price level (polars' rolling_std loses ~1e-6 relative on near-flat prices, far above
the 1e-7 parity tolerance with `incremental.py`); the rare windows whose variance is still tiny next
to that spread are recomputed two-pass. A window of equal values is detected exactly (no change
inside it) and gets std 0, which is what the 0 / 0.5 / 1 fallbacks of the spec test.

Each value at bar t depends on bars <= t only, and on the bar's position from the first bar of its
symbol, so truncating or changing the series after t leaves it bit-identical.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from signalgen.features.spec import FEATURE_NAMES

_BLOCK = 64  # >= the longest window
# Below this ratio of (sum of squared deviations) to (size of the terms that produced it), the fast
# path could lose more than ~1e-11 relative: recompute those windows exactly.
_ILL_CONDITIONED = 1e-4


class _Blocks:
    """Block-wise prefix sums of x[start:] (positions before `start` are warm-up NaN).

    centred=False (reference 0) suits values that are not offset far from zero relative to their
    spread (returns, volumes, ranges); prices need centred=True.
    """

    def __init__(self, x: np.ndarray, start: int = 0, squares: bool = False, centred: bool = False) -> None:
        self.n_all, self.start, self.centred = len(x), start, centred
        self.x = x = x[start:]
        self.n = n = len(x)
        if n == 0:
            return
        self.nb = nb = -(-n // _BLOCK)
        size = nb * _BLOCK
        dev = np.empty(size)
        dev[:n] = x
        dev[n:] = x[-1]
        if centred:
            self.ref = np.repeat(dev[::_BLOCK], _BLOCK)  # each block's first value, at every position
            dev -= self.ref
            # Per position of block k: previous block's reference minus this one's.
            self.delta = np.zeros(size)
            np.subtract(self.ref[:-_BLOCK], self.ref[_BLOCK:], out=self.delta[_BLOCK:])
        self.p2 = np.cumsum(np.square(dev).reshape(nb, _BLOCK), axis=1).reshape(-1) if squares else None
        self.p1 = np.cumsum(dev.reshape(nb, _BLOCK), axis=1, out=dev.reshape(nb, _BLOCK)).reshape(-1)
        self._changes: np.ndarray | None = None

    def flat(self, w: int) -> np.ndarray:
        """True where the w values ending at each position are all equal."""
        n, out = self.n, np.zeros(self.n, dtype=bool)
        if n >= w:
            if self._changes is None:  # number of changes between neighbours up to each position
                changes = np.zeros(n, dtype=np.int64)
                np.not_equal(self.x[1:], self.x[:-1], out=changes[1:], casting="unsafe")
                self._changes = np.cumsum(changes, out=changes)
            np.equal(self._changes[w - 1:], self._changes[: n - w + 1], out=out[w - 1:])
        return out

    def _window_sums(self, prefix: np.ndarray, w: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window sums about each block's own reference (before re-centring), and the block totals
        they include."""
        out = np.empty(len(prefix))
        out[:w] = prefix[:w]
        np.subtract(prefix[w:], prefix[:-w], out=out[w:])
        # Where the window starts in block k-1, prefix[t-w] was inside it: add that block's total.
        totals = np.zeros((self.nb, _BLOCK))
        totals[1:] = prefix[_BLOCK - 1::_BLOCK][:-1, None]
        totals *= mask
        totals = totals.reshape(-1)
        out += totals
        return out, totals

    def window(self, w: int, var: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Rolling mean and sample variance (ddof=1) over w values; NaN before w values."""
        mean = np.full(self.n_all, np.nan)
        variance = np.full(self.n_all, np.nan) if var else None
        n, first = self.n, self.start + w - 1
        if n < w:
            return mean, variance
        pos = np.arange(_BLOCK)
        mask = (pos < w).astype(np.float64)  # the window reaches into the previous block
        s1, _ = self._window_sums(self.p1, w, mask)
        if self.centred:
            # The previous block's `left` values are d about its reference: d + delta about ours.
            left = np.where(pos < w, w - 1 - pos, 0).astype(np.float64)
            left_delta = (self.delta.reshape(self.nb, _BLOCK) * left).reshape(-1)
            if var:
                cross = ((s1 - self.p1).reshape(self.nb, _BLOCK) * mask).reshape(-1)  # sum of d
            s1 += left_delta
        np.divide(s1[w - 1:n], w, out=mean[first:])
        if self.centred:
            mean[first:] += self.ref[w - 1:n]
        if not var:
            return mean, variance
        s2, totals = self._window_sums(self.p2, w, mask)
        scale = self.p2 + totals  # size of what was summed: the rounding error is ~eps times this
        if self.centred:
            # sum (d + delta)^2 = sum d^2 + delta * (2 sum d + left * delta)
            cross *= 2.0
            cross += left_delta
            cross *= self.delta
            s2 += cross
            left_delta *= self.delta
            scale += left_delta
        q = s2[:n]
        q -= s1[:n] ** 2 / w
        flat = self.flat(w)
        # Ill-conditioned (spread tiny next to what was summed): redo those windows two-pass.
        redo = np.flatnonzero((q < _ILL_CONDITIONED * scale[:n]) & ~flat)
        redo = redo[redo >= w - 1]
        if len(redo):
            q[redo] = _two_pass(np.lib.stride_tricks.sliding_window_view(self.x, w)[redo - (w - 1)])
        np.maximum(q, 0.0, out=q)
        q /= w - 1
        q[flat] = 0.0
        variance[first:] = q[w - 1:]
        flat_at = np.flatnonzero(flat)
        mean[self.start + flat_at] = self.x[flat_at]
        return mean, variance


def _two_pass(windows: np.ndarray) -> np.ndarray:
    """Sum of squared deviations of each row, corrected two-pass (error ~ w * eps, any level)."""
    dev = windows - windows.mean(axis=1, keepdims=True)
    return (dev * dev).sum(axis=1) - dev.sum(axis=1) ** 2 / windows.shape[1]


def _log_return(log_c: np.ndarray, k: int) -> np.ndarray:
    """log(c_t / c_{t-k}) as a difference of logs: one log per bar for all four horizons."""
    out = np.full(len(log_c), np.nan)
    if len(log_c) > k:
        np.subtract(log_c[k:], log_c[:-k], out=out[k:])
    return out


def _series_features(h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    n = len(c)
    log_c = np.log(c)
    ret_1 = _log_return(log_c, 1)
    returns = _Blocks(ret_1, start=1, squares=True)
    _, var_20 = returns.window(20, var=True)
    _, var_60 = returns.window(60, var=True)
    vol_20, vol_60 = np.sqrt(var_20), np.sqrt(var_60)
    closes, volumes = _Blocks(c, squares=True, centred=True), _Blocks(v, squares=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        vol_ratio = np.where(vol_60 == 0.0, 0.0, vol_20 / vol_60)

        diff = np.full(n, np.nan)
        diff[1:] = c[1:] - c[:-1]
        gain_mean, _ = _Blocks(np.maximum(diff, 0.0), start=1).window(14)
        loss_mean, _ = _Blocks(np.maximum(-diff, 0.0), start=1).window(14)
        # Flat = all 14 changes are zero, i.e. 15 equal closes (exact, unlike gain + loss == 0).
        total = gain_mean + loss_mean
        rsi = np.clip(np.where(closes.flat(15) | (total == 0.0), 0.5, gain_mean / total), 0.0, 1.0)

        c_mean_20, c_var_20 = closes.window(20, var=True)
        c_std_20 = np.sqrt(c_var_20)
        zclose = np.where(c_std_20 == 0.0, 0.0, (c - c_mean_20) / c_std_20)
        v_mean_20, v_var_20 = volumes.window(20, var=True)
        v_std_20 = np.sqrt(v_var_20)
        zvolume = np.where(v_std_20 == 0.0, 0.0, (v - v_mean_20) / v_std_20)
        v_mean_5, _ = volumes.window(5)
        volume_ratio = np.where(v_mean_20 == 0.0, 1.0, v_mean_5 / v_mean_20)

        hl_range = (h - lo) / c
        hl_range_20, _ = _Blocks(hl_range).window(20)
        close_location = np.where(h == lo, 0.5, (c - lo) / (h - lo))
        sma_10, _ = closes.window(10)
        sma_50, _ = closes.window(50)
        sma_ratio = sma_10 / sma_50 - 1.0

    # NaN, not a fallback, while a window is still filling.
    for arr, defined in ((vol_ratio, vol_60), (zclose, c_mean_20), (zvolume, v_mean_20),
                         (volume_ratio, v_mean_20)):
        arr[np.isnan(defined)] = np.nan
    return [ret_1, _log_return(log_c, 5), _log_return(log_c, 15), _log_return(log_c, 60),
            vol_20, vol_60, vol_ratio, rsi, zclose, zvolume, volume_ratio, hl_range, hl_range_20,
            close_location, sma_ratio]


def _feature_columns(bars: pl.DataFrame) -> list[np.ndarray]:
    n = bars.height
    symbols = bars["symbol"]
    run_ids = symbols.rle_id()
    n_runs = int(run_ids[-1]) + 1
    if n_runs != symbols.n_unique():
        raise ValueError("compute_features needs each symbol's bars contiguous (sort by symbol, bar_time)")
    cols = [bars[name].cast(pl.Float64).to_numpy() for name in ("high", "low", "close", "volume")]
    bounds = np.flatnonzero(np.diff(run_ids.to_numpy())) + 1
    per_symbol = [_series_features(*(col[lo:hi] for col in cols))
                  for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, n])]
    return per_symbol[0] if n_runs == 1 else [np.concatenate(parts) for parts in zip(*per_symbol)]


def compute_features(bars: pl.DataFrame) -> pl.DataFrame:
    """Add the FEATURE_NAMES columns (Float64, NaN during warm-up) to bars.

    Args:
        bars: BAR_SCHEMA rows of one or more symbols, each symbol's rows contiguous and in
            bar_time order (as sorted by symbol, bar_time).

    Raises:
        ValueError: a symbol's rows are not contiguous.
    """
    if bars.height == 0:
        return bars.with_columns([pl.lit(None, pl.Float64).alias(f) for f in FEATURE_NAMES])
    return bars.with_columns([pl.Series(name, arr, dtype=pl.Float64, nan_to_null=False)
                              for name, arr in zip(FEATURE_NAMES, _feature_columns(bars))])


def feature_array(bars: pl.DataFrame) -> np.ndarray:
    """`feature_matrix(compute_features(bars))` without building the frame: (n, 15) float32."""
    out = np.empty((bars.height, len(FEATURE_NAMES)), dtype=np.float32)
    if bars.height:
        for j, column in enumerate(_feature_columns(bars)):
            out[:, j] = column
    return out


def feature_matrix(df: pl.DataFrame) -> np.ndarray:
    """The FEATURE_NAMES columns of `df` as a C-contiguous float32 array of shape (n, 15)."""
    return np.ascontiguousarray(df.select(FEATURE_NAMES).to_numpy(), dtype=np.float32)
