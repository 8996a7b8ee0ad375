"""Bar validation: remove bad bars before anything uses them, and say why.

Input is the bars of one symbol x timeframe in arrival order. A bar is removed for the first of
these that applies: the `problem` a source marked while reading it (UNPARSABLE, SYMBOL_MISMATCH,
TIMEFRAME_MISMATCH, or NON_FINITE for an empty bar_time; see BAR_PROBLEM_SCHEMA), NON_FINITE (null,
NaN or inf in OHLCV, or a null bar_time), TOO_LARGE (|value| > MAX_BAR_VALUE), NON_POSITIVE_PRICE,
HIGH_BELOW_LOW, CLOSE_OUTSIDE_RANGE (close or open outside [low, high]), NEGATIVE_VOLUME, then
DUPLICATE_TIME or OUT_OF_ORDER. A GAP longer than `max_gap` between two kept bars is recorded on the
bar after it, which is kept.

Ordering keeps the longest run of bars in strictly increasing time (the longest increasing
subsequence of the valid bars, O(n log n)), preferring earlier arrivals among equally long ones. So
one row moved 100 places costs that row only, not the 100 it jumped over; a bar whose time equals a
kept bar's is DUPLICATE_TIME (the first arrival wins), any other left-out bar OUT_OF_ORDER. Chunks
(`validate_chunks`) are decided one at a time: a later chunk cannot undo an earlier chunk's bars, so
its bars at or before the last accepted time are rejected; disorder that straddles a chunk boundary
(every `chunk_bars`) may thus cost more than the displaced row.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from signalgen.config.models import default_max_gap
from signalgen.data.schema import (
    BAR_PROBLEM_SCHEMA, BAR_REJECTION_SCHEMA, BAR_SCHEMA, MAX_BAR_VALUE, BarReason,
)

_VALUES = ("open", "high", "low", "close", "volume")
_PRICES = ("open", "high", "low", "close")
_SENTINELS = (int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max))  # "no kept bar before / after"


@dataclass(frozen=True)
class ValidatedBars:
    """The good bars in time order, one row per rejection (BAR_REJECTION_SCHEMA), counts per reason.

    `counts` has every BarReason; all but "gap" are bars removed.
    """

    bars: pl.DataFrame
    rejections: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason != BarReason.GAP)

    @property
    def last_time(self) -> datetime | None:
        """bar_time of the last accepted bar, or None."""
        return self.bars["bar_time"][-1] if self.bars.height else None


def _text(*parts: str | pl.Expr) -> pl.Expr:
    """Concatenate literals and values. (pl.format panics on some filtered datetime columns in
    polars 2.1, so it is not used here.)"""
    return pl.concat_str([pl.lit(p) if isinstance(p, str) else p.cast(pl.String) for p in parts])


def _ts(expr: pl.Expr) -> pl.Expr:
    return expr.dt.to_string("%Y-%m-%dT%H:%M:%SZ")


def _fmt(col: str) -> pl.Expr:
    return pl.concat_str(pl.lit(f"{col}="), pl.col(col).cast(pl.String).fill_null("null"))


def _value_reason(problems: bool) -> tuple[pl.Expr, pl.Expr]:
    """(reason, detail) of the first check a row fails, null if none; `problems`: the frame has
    the source's BAR_PROBLEM_SCHEMA columns."""
    bad_number = [pl.col(c).is_null() | ~pl.col(c).is_finite() for c in _VALUES]
    non_finite = pl.any_horizontal(*bad_number) | pl.col("bar_time").is_null()
    non_finite_detail = pl.concat_str(
        [pl.when(bad).then(_fmt(c)) for c, bad in zip(_VALUES, bad_number)]
        + [pl.when(pl.col("bar_time").is_null()).then(pl.lit("bar_time=null"))],
        separator=", ", ignore_nulls=True)
    too_large = [pl.col(c).abs() > MAX_BAR_VALUE for c in _VALUES]
    large_detail = pl.concat_str([pl.when(bad).then(_fmt(c)) for c, bad in zip(_VALUES, too_large)]
                                 + [pl.lit(f"above {MAX_BAR_VALUE:g}")], separator=", ", ignore_nulls=True)
    bad_price = [pl.col(c) <= 0 for c in _PRICES]
    price_detail = pl.concat_str([pl.when(bad).then(_fmt(c)) for c, bad in zip(_PRICES, bad_price)],
                                 separator=", ", ignore_nulls=True)
    high, low = pl.col("high"), pl.col("low")
    outside = [(pl.col(c) < low) | (pl.col(c) > high) for c in ("close", "open")]
    range_detail = pl.concat_str(
        [pl.when(bad).then(_text(f"{c}=", pl.col(c), " outside [", low, ", ", high, "]"))
         for c, bad in zip(("close", "open"), outside)],
        separator=", ", ignore_nulls=True)
    checks = [
        (non_finite, pl.lit(BarReason.NON_FINITE.value), non_finite_detail),
        (pl.any_horizontal(*too_large), pl.lit(BarReason.TOO_LARGE.value), large_detail),
        (pl.any_horizontal(*bad_price), pl.lit(BarReason.NON_POSITIVE_PRICE.value), price_detail),
        (high < low, pl.lit(BarReason.HIGH_BELOW_LOW.value), _text("high=", high, " < low=", low)),
        (pl.any_horizontal(*outside), pl.lit(BarReason.CLOSE_OUTSIDE_RANGE.value), range_detail),
        (pl.col("volume") < 0, pl.lit(BarReason.NEGATIVE_VOLUME.value),
         _text("volume=", pl.col("volume"), " < 0")),
    ]
    if problems:
        checks.insert(0, (pl.col("problem").is_not_null(), pl.col("problem"), pl.col("problem_detail")))
    reason: pl.Expr = pl.lit(None, pl.String)
    detail: pl.Expr = pl.lit(None, pl.String)
    for cond, why, text in reversed(checks):  # build from the last so the first check wins
        reason = pl.when(cond).then(why).otherwise(reason)
        detail = pl.when(cond).then(text).otherwise(detail)
    return reason, detail


def in_order(times: np.ndarray, last: int | None = None) -> np.ndarray:
    """Mask of the bars to keep: the longest strictly increasing subsequence of `times` (arrival
    order, all > `last` unless excluded), earliest arrivals first among equally long ones.

    Most bars are fixed points (later than everything before, earlier than everything after):
    every longest subsequence holds them and is unaffected by them, so the O(m log m) Python pass
    runs only over the m others.
    """
    keep = np.zeros(len(times), dtype=bool)
    eligible = np.arange(len(times)) if last is None else np.flatnonzero(times > last)
    t = times[eligible]
    if not len(t):
        return keep
    low, high = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    before = np.empty_like(t)
    before[0] = low
    np.maximum.accumulate(t[:-1], out=before[1:])
    after = np.empty_like(t)
    after[-1] = high
    after[:-1] = np.minimum.accumulate(t[:0:-1])[::-1]
    fixed = (t > before) & (t < after)
    others = np.flatnonzero(~fixed)
    if len(others):
        fixed[others[_longest_increasing(t[others].tolist())]] = True
    keep[eligible] = fixed
    return keep


def _longest_increasing(values: list[int]) -> np.ndarray:
    """Positions of the longest strictly increasing subsequence, earliest positions first."""
    n = len(values)
    length = [0] * n  # longest increasing run starting at each position, from a backward pass
    tails: list[int] = []  # negated values: a decreasing run backwards is an increasing one here
    for i in range(n - 1, -1, -1):
        x = -values[i]
        p = bisect_left(tails, x)
        if p == len(tails):
            tails.append(x)
        else:
            tails[p] = x
        length[i] = p + 1
    need, last, picked = len(tails), None, []
    for i in range(n):  # the first position that still completes a longest run
        if length[i] == need and (last is None or values[i] > last):
            picked.append(i)
            last, need = values[i], need - 1
            if need == 0:
                break
    return np.asarray(picked, dtype=np.int64)


def validate_bars(bars: pl.DataFrame, timeframe: str, max_gap: timedelta | None = None, *,
                  last_time: datetime | None = None) -> ValidatedBars:
    """Split one symbol x timeframe's bars (arrival order) into good bars and rejections.

    Never raises on bad values; an empty frame gives empty results.

    Args:
        bars: BAR_SCHEMA rows, optionally with a source's BAR_PROBLEM_SCHEMA columns (dropped from
            the good bars).
        timeframe: e.g. "5m"; sets the default max_gap.
        max_gap: longest normal distance between consecutive bars (default: `default_max_gap`).
        last_time: bar_time of the last bar accepted before these (from an earlier chunk).
    """
    max_gap = default_max_gap(timeframe) if max_gap is None else max_gap
    time_type = BAR_SCHEMA["bar_time"]
    columns = [c for c in bars.columns if c not in BAR_PROBLEM_SCHEMA]
    reason, detail = _value_reason(all(c in bars.columns for c in BAR_PROBLEM_SCHEMA))
    df = bars.with_row_index("_row").with_columns(reason.alias("_reason"))

    valid = df["_reason"].is_null().to_numpy()
    times = df["bar_time"].to_physical().fill_null(0).to_numpy()  # a null time is never valid
    last_us = None if last_time is None else int(pl.Series([last_time], dtype=time_type).to_physical()[0])
    ok = np.zeros(df.height, dtype=bool)
    ok[valid] = in_order(times[valid], last_us)
    kept = df.filter(pl.Series(ok))
    # Details are text: built for the few rejected rows only, not for every bar.
    rejected = df.filter(pl.Series(~ok))
    # For each bar left out by ordering: the latest kept time before it and the next kept one after it.
    kept_at = np.flatnonzero(ok)
    lowest = _SENTINELS[0] if last_us is None else last_us
    kept_times = np.concatenate([[lowest], times[kept_at], [_SENTINELS[1]]])  # sorted
    after = np.searchsorted(kept_at, rejected["_row"].to_numpy()) + 1  # index into kept_times
    latest, following = kept_times[after - 1], kept_times[after]
    t = times[rejected["_row"].to_numpy()]
    rejected = rejected.with_columns(
        pl.Series("_latest", latest), pl.Series("_next", following),
        pl.Series("_dup", kept_times[np.searchsorted(kept_times, t)] == t), pl.Series("_late", t <= latest),
    ).with_columns(  # the sentinels are no times: null, or formatting them would panic
        pl.when(pl.col(c).is_in(_SENTINELS)).then(None).otherwise(pl.col(c)).cast(time_type).alias(c)
        for c in ("_latest", "_next"))
    time_order = pl.col("_reason").is_null()
    bar_time = _ts(pl.col("bar_time"))
    rejected = rejected.with_columns(
        pl.when(time_order & pl.col("_dup")).then(pl.lit(BarReason.DUPLICATE_TIME.value))
        .when(time_order).then(pl.lit(BarReason.OUT_OF_ORDER.value))
        .otherwise("_reason").alias("_reason"),
        pl.when(time_order & pl.col("_dup")).then(_text("bar_time=", bar_time, " already accepted"))
        .when(time_order & pl.col("_late")).then(_text("bar_time=", bar_time, " before latest accepted ",
                                                       _ts(pl.col("_latest"))))
        .when(time_order).then(_text("bar_time=", bar_time, " after the next accepted ",
                                     _ts(pl.col("_next"))))
        .otherwise(detail).alias("_detail"),
    )

    kept = kept.with_columns(pl.col("bar_time").shift(1, fill_value=pl.lit(last_time, dtype=time_type))
                             .alias("_prev"))
    gap_size = pl.col("bar_time") - pl.col("_prev")
    gaps = kept.filter(gap_size > max_gap).with_columns(
        pl.lit(BarReason.GAP.value).alias("_reason"),
        _text("gap of ", gap_size.dt.total_seconds(), "s after ", _ts(pl.col("_prev")),
              f" (max {max_gap.total_seconds():g}s)").alias("_detail"),
    )
    rejections = (
        pl.concat([rejected.select("_row", *BAR_REJECTION_SCHEMA.names()[:3], "_reason", "_detail"),
                   gaps.select("_row", *BAR_REJECTION_SCHEMA.names()[:3], "_reason", "_detail")])
        .sort("_row", maintain_order=True)
        .select(*BAR_REJECTION_SCHEMA.names()[:3], pl.col("_reason").alias("reason"),
                pl.col("_detail").alias("detail"))
        .cast(dict(BAR_REJECTION_SCHEMA))
    )
    found = dict(rejections["reason"].value_counts().iter_rows()) if rejections.height else {}
    counts = {r.value: int(found.get(r.value, 0)) for r in BarReason}
    return ValidatedBars(bars=kept.select(columns), rejections=rejections, counts=counts)


def validate_chunks(chunks: Iterable[pl.DataFrame], timeframe: str,
                    max_gap: timedelta | None = None) -> Iterator[ValidatedBars]:
    """validate_bars over consecutive chunks of one series, carrying the last accepted bar_time so
    duplicates, disorder and gaps are caught across chunk boundaries."""
    last_time = None
    for chunk in chunks:
        result = validate_bars(chunk, timeframe, max_gap, last_time=last_time)
        last_time = result.last_time or last_time
        yield result


class BarValidator:
    """`validate_chunks` one bar at a time, for the per-bar path (simulation, live).

    A bar is decided on arrival: one at or before the last accepted time is rejected, never an
    earlier one undone; DUPLICATE_TIME when its time equals one of the last `remember` accepted
    times, else OUT_OF_ORDER. Over a whole chunk the batch rule keeps the longest increasing run
    instead. The two agree whenever no bar arrives ahead of bars older than it: late bars,
    duplicates, bad values and gaps get the same rejection rows. A bar that arrives k places early
    costs only itself in batch, but is kept on arrival here, and the k older bars after it are
    OUT_OF_ORDER. The accepted bars always equal those of `validate_chunks` with one-bar chunks.

    A bar that plainly passes (finite, in range, after the last accepted bar, no gap) is accepted
    in a few comparisons; any other goes through `validate_bars` itself, so its rejection rows and
    their text are exactly the batch ones.
    """

    def __init__(self, timeframe: str, max_gap: timedelta | None = None, last_time: datetime | None = None,
                 remember: int = 4096) -> None:
        self.timeframe = timeframe
        self.max_gap = default_max_gap(timeframe) if max_gap is None else max_gap
        self.last_time = last_time
        # recent accepted times: a late bar equal to one is a duplicate, as over a whole chunk
        self._recent: deque[datetime] = deque(maxlen=remember)
        self._recent_set: set[datetime] = set()
        if last_time is not None:
            self._accept(last_time)

    def _accept(self, t: datetime) -> None:
        recent = self._recent
        if len(recent) == recent.maxlen:
            self._recent_set.discard(recent[0])
        recent.append(t)
        self._recent_set.add(t)
        self.last_time = t

    def push(self, bar: dict) -> tuple[bool, pl.DataFrame | None]:
        """Decide one bar (a BAR_SCHEMA row as a dict, optionally with the BAR_PROBLEM_SCHEMA keys).

        Returns:
            (accepted, rejection rows in BAR_REJECTION_SCHEMA or None when there are none).
        """
        if self._plainly_good(bar):
            self._accept(bar["bar_time"])
            return True, None
        row = {k: [bar.get(k)] for k in BAR_SCHEMA.names()}
        schema = dict(BAR_SCHEMA)
        if any(bar.get(k) is not None for k in BAR_PROBLEM_SCHEMA):
            row.update({k: [bar.get(k)] for k in BAR_PROBLEM_SCHEMA})
            schema.update(BAR_PROBLEM_SCHEMA)
        checked = validate_bars(pl.DataFrame(row, schema=schema), self.timeframe, self.max_gap,
                                last_time=self.last_time)
        accepted = checked.bars.height == 1
        rejections = checked.rejections
        if accepted:
            self._accept(bar["bar_time"])
        elif rejections["reason"][0] == BarReason.OUT_OF_ORDER and bar["bar_time"] in self._recent_set:
            rejections = rejections.with_columns(
                reason=pl.lit(BarReason.DUPLICATE_TIME.value),
                detail=_text("bar_time=", _ts(pl.col("bar_time")), " already accepted"))
        return accepted, rejections if rejections.height else None

    def _plainly_good(self, bar: dict) -> bool:
        t = bar.get("bar_time")
        if t is None or bar.get("problem") is not None:
            return False
        try:
            lo, h = bar["low"], bar["high"]
            # every comparison with NaN is False, so a NaN never passes; inf fails the MAX_BAR_VALUE
            # bound; a missing value (KeyError) or a None (TypeError) is no plain bar either
            if not (0.0 < lo <= h <= MAX_BAR_VALUE and lo <= bar["close"] <= h and lo <= bar["open"] <= h
                    and 0.0 <= bar["volume"] <= MAX_BAR_VALUE):
                return False
        except (KeyError, TypeError):
            return False
        last = self.last_time
        return last is None or (t > last and t - last <= self.max_gap)
