"""Seeded synthetic bars: a regime-switching random walk with structure a model can learn.

The series of one (symbol, timeframe, start, seed) is fixed: bar k (k >= 1) ends at
start + k * timeframe, around the clock (crypto-like). A request for (start, end] returns the bars
whose end time lies in that interval, so a later `end` only appends bars and `chunk_bars` only
changes how they are cut. This holds because bars are made in fixed blocks of BLOCK_BARS, each from
its own RNG seeded by (symbol seed, block index), with the regime, the AR state and the last close
carried from block to block.

Regimes (geometric durations, tens to hundreds of bars) are trends with a persistent drift of
either sign, mean-reverting stretches (an AR(1) deviation around an anchor) and neutral random
walks, each with its own volatility level. The log price is pulled back to its start level with a
30-day half-life, so prices stay around 100 for years. Volume is lognormal, scaled by
|return| / volatility. A LightGBM classifier of "12-bar forward log return > x" on the 15 features
reaches a validation AUC of about 0.62 (x = 0) to 0.75 (x = one std of that return) on 5m bars.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
from scipy.signal import lfilter

from signalgen.config.models import timeframe_delta
from signalgen.data.schema import BAR_SCHEMA

BLOCK_BARS = 2**14
_YEAR_S = 365 * 86_400
_ANNUAL_VOL = 0.5           # base volatility; per-bar sigma scales with sqrt(bar length)
_MIN_SEGMENT = 20           # shortest regime, in bars
_MEAN_EXTRA = 130           # regime length = _MIN_SEGMENT + geometric(mean _MEAN_EXTRA)
_TREND, _DOWN, _REVERT, _NEUTRAL = 0, 1, 2, 3
_PHI = 0.9                  # AR(1) coefficient of the mean-reverting deviation
_LEVEL_HALF_LIFE_S = 30 * 86_400  # the log price reverts slowly to its start: stays ~100 for years
# Enough segments per block to cover it even if every one has the minimum length.
_SEGMENTS_PER_BLOCK = BLOCK_BARS // _MIN_SEGMENT + 1


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def symbol_seed(symbol: str, timeframe: str, seed: int) -> int:
    """Stable 64-bit seed of one series (hashlib, so it does not change between processes)."""
    digest = hashlib.blake2b(f"{seed}|{symbol}|{timeframe}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class _Carry:
    """What one block hands to the next so that the series continues seamlessly."""

    log_close: float
    close: float
    y: float              # AR(1) deviation state
    seg_left: int         # bars left in the current regime
    seg: tuple[int, float, float]  # (kind, volatility multiplier, drift in sigmas)


def _draw_segments(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    kind = rng.integers(0, 4, n)
    volmult = np.exp(rng.normal(0.0, 0.45, n))
    drift = rng.uniform(0.1, 0.3, n)
    drift = np.where(kind == _TREND, drift, np.where(kind == _DOWN, -drift, 0.0))
    length = _MIN_SEGMENT + rng.geometric(1.0 / _MEAN_EXTRA, n)
    return kind, volmult, drift, length


class _Series:
    """Generates the blocks of one series in order."""

    def __init__(self, symbol: str, timeframe: str, seed: int) -> None:
        self.seed = symbol_seed(symbol, timeframe, seed)
        tf_s = timeframe_delta(timeframe).total_seconds()
        self.sigma = _ANNUAL_VOL * np.sqrt(tf_s / _YEAR_S)
        self.base_volume = 1e4 * tf_s / 60.0
        self.keep = 0.5 ** (tf_s / _LEVEL_HALF_LIFE_S)  # share of the level deviation kept per bar
        init = np.random.default_rng([self.seed, 2**32])  # outside the block index range
        price = float(100.0 * np.exp(init.uniform(-0.7, 0.7)))
        self.log_start = np.log(price)
        kind, volmult, drift, length = _draw_segments(init, 1)
        self.carry = _Carry(np.log(price), price, 0.0, int(length[0]),
                            (int(kind[0]), float(volmult[0]), float(drift[0])))
        self.block = 0

    def next_block(self) -> dict[str, np.ndarray]:
        """OHLCV arrays of the next BLOCK_BARS bars."""
        c, n = self.carry, BLOCK_BARS
        rng = np.random.default_rng([self.seed, self.block])
        self.block += 1
        kind, volmult, drift, length = _draw_segments(rng, _SEGMENTS_PER_BLOCK)
        kind = np.concatenate(([c.seg[0]], kind))
        volmult = np.concatenate(([c.seg[1]], volmult))
        drift = np.concatenate(([c.seg[2]], drift))
        length = np.concatenate(([c.seg_left], length))
        ends = np.cumsum(length)
        last = int(np.searchsorted(ends, n))  # segment holding the block's last bar
        k_bar = np.repeat(kind[: last + 1], length[: last + 1])[:n]
        sigma = self.sigma * np.repeat(volmult[: last + 1], length[: last + 1])[:n]
        mu = sigma * np.repeat(drift[: last + 1], length[: last + 1])[:n]

        z = rng.standard_normal(n)
        e = rng.standard_normal(n)
        vol_noise = rng.standard_normal(n)
        up = rng.standard_exponential(n)
        down = rng.standard_exponential(n)

        y = lfilter([1.0], [1.0, -_PHI], e, zi=[_PHI * c.y])[0]
        dy = np.diff(y, prepend=c.y)
        shock = np.where(k_bar == _REVERT, sigma * dy, mu + sigma * z)
        # level deviation x_t = keep * x_{t-1} + shock_t
        level = lfilter([1.0], [1.0, -self.keep], shock, zi=[self.keep * (c.log_close - self.log_start)])[0]
        log_close = self.log_start + level
        ret = np.diff(log_close, prepend=c.log_close)
        close = np.exp(log_close)
        open_ = np.empty(n)
        open_[0] = c.close
        open_[1:] = close[:-1]
        # exp(x >= 0) >= 1, so high >= max(open, close) and low <= min(open, close) survive rounding.
        high = np.maximum(open_, close) * np.exp(0.5 * sigma * up)
        low = np.minimum(open_, close) * np.exp(-0.5 * sigma * down)
        volume = self.base_volume * np.exp(0.5 * vol_noise) * (0.3 + np.abs(ret) / self.sigma)

        self.carry = _Carry(float(log_close[-1]), float(close[-1]), float(y[-1]),
                            int(ends[last] - n), (int(kind[last]), float(volmult[last]), float(drift[last])))
        return {"open": open_, "high": high, "low": low, "close": close, "volume": volume}


def _frame(symbol: str, timeframe: str, times_us: np.ndarray, cols: dict[str, np.ndarray]) -> pl.DataFrame:
    times = pl.Series(times_us, dtype=pl.Int64).cast(BAR_SCHEMA["bar_time"])
    df = pl.DataFrame({"bar_time": times, **cols})
    return df.select(pl.lit(symbol).alias("symbol"), pl.lit(timeframe).alias("timeframe"), pl.all())


def _bar_count(timeframe: str, start: datetime, end: datetime) -> tuple[int, int, int]:
    tf = timeframe_delta(timeframe)
    start, end = _utc(start), _utc(end)
    n = max(0, (end - start) // tf)
    start_us = (start - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    return n, start_us, tf // timedelta(microseconds=1)


def iter_synthetic_chunks(symbol: str, timeframe: str, start: datetime, end: datetime, seed: int,
                          chunk_bars: int) -> Iterator[pl.DataFrame]:
    """Yield the bars of one symbol in (start, end] as consecutive frames of `chunk_bars` rows.

    Memory stays bounded by one block plus one chunk, whatever the range.
    """
    if chunk_bars < 1:
        raise ValueError(f"chunk_bars must be >= 1, got {chunk_bars}")
    total, start_us, tf_us = _bar_count(timeframe, start, end)
    series = _Series(symbol, timeframe, seed)
    buf: dict[str, np.ndarray] = {}
    buffered, done = 0, 0  # rows waiting in buf; rows yielded
    while done < total:
        rows = min(chunk_bars, total - done)
        if buffered < rows:
            blocks = [series.next_block() for _ in range(-(-(rows - buffered) // BLOCK_BARS))]
            buf = {c: np.concatenate(([buf[c]] if buffered else []) + [b[c] for b in blocks])
                   for c in blocks[0]}
            buffered = len(buf["close"])
        k = np.arange(done + 1, done + rows + 1, dtype=np.int64)
        yield _frame(symbol, timeframe, start_us + k * tf_us, {c: v[:rows] for c, v in buf.items()})
        buf = {c: v[rows:] for c, v in buf.items()}  # views: no copy per chunk
        buffered -= rows
        done += rows


def synthetic_bars(symbols: Sequence[str], timeframe: str, start: datetime, end: datetime,
                   seed: int) -> pl.DataFrame:
    """Bars of every symbol in (start, end] (BAR_SCHEMA), sorted by symbol then bar_time."""
    frames = [chunk for s in sorted(set(symbols))
              for chunk in iter_synthetic_chunks(s, timeframe, start, end, seed, chunk_bars=1 << 30)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=BAR_SCHEMA)
