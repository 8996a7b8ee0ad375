"""The features of `spec.py`, vectorized over whole series (numpy under a polars frame).

Bit-identical to `incremental.py` (the simulation and live path), for any chunking and any history
start: every window is the same tree of IEEE operations over the window's own bars (`kernel.py`),
run here over whole arrays, one vector operation per node level and per merge (about 150 per
series), in tiles of `_TILE` bars so that each tile's arrays stay in cache. A value at bar t depends
on bars t-60 .. t only, never on where the series, chunk or history began.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from signalgen.features import kernel
from signalgen.features.spec import FEATURE_NAMES

_TILE = 16384  # bars per tile
_PAD = 63      # bars before each tile: >= the longest window (60) - 1


def _nodes(xp: np.ndarray, windows: tuple[int, ...], paired: bool):
    """`node(size, offset)` over positions _PAD.. of xp: the nodes of `kernel`, as arrays."""
    n_all = len(xp)
    by_size = {1: (xp, np.zeros(n_all), np.zeros(n_all)) if paired else xp}
    for k in kernel.levels(windows)[1:]:
        h = k >> 1
        half = by_size[h]
        lo, hi = (tuple(a[:n_all - h] for a in half), tuple(a[h:] for a in half)) if paired \
            else (half[:n_all - h], half[h:])
        merged = kernel.merge_pair(lo, hi, *kernel.level_weights(k)) if paired else lo + hi
        full = tuple(np.concatenate([np.full(h, np.nan), a]) for a in merged) if paired \
            else np.concatenate([np.full(h, np.nan), merged])
        by_size[k] = full

    def node(size: int, offset: int):
        part = by_size[size]
        cut = slice(_PAD - offset, n_all - offset)
        return tuple(a[cut] for a in part) if paired else part[cut]
    return node


def _windows(x: np.ndarray, windows: tuple[int, ...], paired: bool) -> list:
    """The window nodes of each w in `windows` at every position of x (NaN where a window reaches
    before x), computed tile by tile."""
    xp = np.concatenate([np.full(_PAD, np.nan), x])
    n = len(x)
    if n <= _TILE:
        return [kernel.window(_nodes(xp, windows, paired), w, paired) for w in windows]
    # each tile's windows are copied into whole-series arrays (one copy, no list of tiles to join)
    out = [tuple(np.empty(n) for _ in range(3)) if paired else np.empty(n) for _ in windows]
    for a in range(0, n, _TILE):
        b = min(a + _TILE, n)
        node = _nodes(xp[a: b + _PAD], windows, paired)
        for dest, w in zip(out, windows):
            got = kernel.window(node, w, paired)
            for d, g in zip(dest, got) if paired else ((dest, got),):
                d[a:b] = g
    return out


def _series_features(h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    n = len(c)
    log_c = np.log(c)
    rets = [np.full(n, np.nan) for _ in range(4)]
    for out, k in zip(rets, (1, 5, 15, 60)):  # log(c_t / c_{t-k}) as a difference of logs
        if n > k:
            np.subtract(log_c[k:], log_c[:-k], out=out[k:])
    ret_1 = rets[0]
    diff = np.full(n, np.nan)
    diff[1:] = c[1:] - c[:-1]
    hl_range = (h - lo) / c

    r20, r60 = _windows(ret_1, (20, 60), paired=True)
    g14, = _windows(np.maximum(diff, 0.0), (14,), paired=False)
    l14, = _windows(np.maximum(-diff, 0.0), (14,), paired=False)
    c10, c20, c50 = _windows(c, (10, 20, 50), paired=True)
    v5, v20 = _windows(v, (5, 20), paired=True)
    hl20, = _windows(hl_range, (20,), paired=False)
    var_20, var_60 = kernel.variance(r20, 20), kernel.variance(r60, 60)
    gain_mean, loss_mean = kernel.mean(g14, 14), kernel.mean(l14, 14)
    sma_10, c_mean_20, sma_50 = kernel.mean(c10, 10), kernel.mean(c20, 20), kernel.mean(c50, 50)
    c_var_20, v_var_20 = kernel.variance(c20, 20), kernel.variance(v20, 20)
    v_mean_5, v_mean_20 = kernel.mean(v5, 5), kernel.mean(v20, 20)
    hl_range_20 = kernel.mean(hl20, 20)

    with np.errstate(divide="ignore", invalid="ignore"):
        vol_20, vol_60 = np.sqrt(var_20), np.sqrt(var_60)
        vol_ratio = np.where(vol_60 == 0.0, 0.0, vol_20 / vol_60)
        total = gain_mean + loss_mean  # 0 exactly when all 14 changes are 0 (the sums are of values >= 0)
        rsi = np.clip(np.where(total == 0.0, 0.5, gain_mean / total), 0.0, 1.0)
        c_std_20, v_std_20 = np.sqrt(c_var_20), np.sqrt(v_var_20)
        zclose = np.where(c_std_20 == 0.0, 0.0, (c - c_mean_20) / c_std_20)
        zvolume = np.where(v_std_20 == 0.0, 0.0, (v - v_mean_20) / v_std_20)
        volume_ratio = np.where(v_mean_20 == 0.0, 1.0, v_mean_5 / v_mean_20)
        close_location = np.where(h == lo, 0.5, (c - lo) / (h - lo))
        sma_ratio = sma_10 / sma_50 - 1.0

    # NaN, not a fallback, while a window is still filling.
    for arr, defined in ((vol_ratio, vol_60), (rsi, total), (zclose, c_mean_20), (zvolume, v_mean_20),
                         (volume_ratio, v_mean_20)):
        arr[np.isnan(defined)] = np.nan
    # A window whose squares overflow (values near 1e308, beyond MAX_BAR_VALUE) has no defined z-score.
    zclose[np.isinf(c_std_20)] = np.nan
    zvolume[np.isinf(v_std_20)] = np.nan
    return [*rets, vol_20, vol_60, vol_ratio, rsi, zclose, zvolume, volume_ratio, hl_range, hl_range_20,
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
