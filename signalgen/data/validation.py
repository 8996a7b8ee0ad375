"""Bar validation: remove bad bars before anything uses them, and say why.

Input is the bars of one symbol x timeframe in arrival order. A bar is removed for the first of
these that applies: NON_FINITE (null, NaN or inf in OHLCV, or a null bar_time),
NON_POSITIVE_PRICE, HIGH_BELOW_LOW, CLOSE_OUTSIDE_RANGE (close or open outside [low, high]),
NEGATIVE_VOLUME, then DUPLICATE_TIME (same bar_time as an accepted bar: the first one wins) or
OUT_OF_ORDER (bar_time before the latest accepted one). A GAP longer than `max_gap` between two
kept bars is recorded on the bar after it, which is kept.

Ordering is decided without a loop: a valid bar is accepted iff its bar_time is later than every
earlier valid bar's, because a rejected bar never raises the running maximum.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import polars as pl

from signalgen.config.models import timeframe_delta
from signalgen.data.schema import BAR_REJECTION_SCHEMA, BAR_SCHEMA, BarReason

_VALUES = ("open", "high", "low", "close", "volume")
_PRICES = ("open", "high", "low", "close")


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


def default_max_gap(timeframe: str) -> timedelta:
    """One bar for intraday timeframes; for daily and longer, 4 days (weekend plus a holiday)."""
    tf = timeframe_delta(timeframe)
    return tf if tf < timedelta(days=1) else max(tf, timedelta(days=4))


def _text(*parts: str | pl.Expr) -> pl.Expr:
    """Concatenate literals and values. (pl.format panics on some filtered datetime columns in
    polars 2.1, so it is not used here.)"""
    return pl.concat_str([pl.lit(p) if isinstance(p, str) else p.cast(pl.String) for p in parts])


def _ts(expr: pl.Expr) -> pl.Expr:
    return expr.dt.to_string("%Y-%m-%dT%H:%M:%SZ")


def _fmt(col: str) -> pl.Expr:
    return pl.concat_str(pl.lit(f"{col}="), pl.col(col).cast(pl.String).fill_null("null"))


def _value_reason() -> tuple[pl.Expr, pl.Expr]:
    """(reason, detail) of the first value check a row fails, null if none."""
    bad_number = [pl.col(c).is_null() | ~pl.col(c).is_finite() for c in _VALUES]
    non_finite = pl.any_horizontal(*bad_number) | pl.col("bar_time").is_null()
    non_finite_detail = pl.concat_str(
        [pl.when(bad).then(_fmt(c)) for c, bad in zip(_VALUES, bad_number)]
        + [pl.when(pl.col("bar_time").is_null()).then(pl.lit("bar_time=null"))],
        separator=", ", ignore_nulls=True)
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
        (non_finite, BarReason.NON_FINITE, non_finite_detail),
        (pl.any_horizontal(*bad_price), BarReason.NON_POSITIVE_PRICE, price_detail),
        (high < low, BarReason.HIGH_BELOW_LOW, _text("high=", high, " < low=", low)),
        (pl.any_horizontal(*outside), BarReason.CLOSE_OUTSIDE_RANGE, range_detail),
        (pl.col("volume") < 0, BarReason.NEGATIVE_VOLUME, _text("volume=", pl.col("volume"), " < 0")),
    ]
    reason: pl.Expr = pl.lit(None, pl.String)
    detail: pl.Expr = pl.lit(None, pl.String)
    for cond, why, text in reversed(checks):  # build from the last so the first check wins
        reason = pl.when(cond).then(pl.lit(why.value)).otherwise(reason)
        detail = pl.when(cond).then(text).otherwise(detail)
    return reason, detail


def validate_bars(bars: pl.DataFrame, timeframe: str, max_gap: timedelta | None = None, *,
                  last_time: datetime | None = None) -> ValidatedBars:
    """Split one symbol x timeframe's bars (arrival order) into good bars and rejections.

    Never raises on bad values; an empty frame gives empty results.

    Args:
        bars: BAR_SCHEMA rows.
        timeframe: e.g. "5m"; sets the default max_gap.
        max_gap: longest normal distance between consecutive bars (default: `default_max_gap`).
        last_time: bar_time of the last bar accepted before these (from an earlier chunk).
    """
    max_gap = default_max_gap(timeframe) if max_gap is None else max_gap
    time_type = BAR_SCHEMA["bar_time"]
    df = bars.with_row_index("_row")
    reason, detail = _value_reason()
    df = df.with_columns(reason.alias("_reason"), detail.alias("_detail"))
    valid = pl.col("_reason").is_null()

    # Latest bar_time among earlier valid bars (and the previous chunk's last accepted bar).
    latest_before = pl.when(valid).then(pl.col("bar_time")).cum_max().shift(1).forward_fill()
    if last_time is not None:
        carried = pl.lit(last_time, dtype=time_type)
        latest_before = pl.max_horizontal(latest_before, carried)
    df = df.with_columns(latest_before.alias("_latest"))
    accepted = valid & (pl.col("_latest").is_null() | (pl.col("bar_time") > pl.col("_latest")))
    df = df.with_columns(accepted.alias("_ok"))
    accepted_times = df.filter("_ok")["bar_time"]
    if last_time is not None:
        accepted_times = accepted_times.append(pl.Series([last_time], dtype=time_type))
    time_order = pl.col("_reason").is_null() & ~pl.col("_ok")
    duplicate = time_order & pl.col("bar_time").is_in(accepted_times.implode())
    df = df.with_columns(
        pl.when(duplicate).then(pl.lit(BarReason.DUPLICATE_TIME.value))
        .when(time_order).then(pl.lit(BarReason.OUT_OF_ORDER.value))
        .otherwise("_reason").alias("_reason"),
        pl.when(duplicate).then(_text("bar_time=", _ts(pl.col("bar_time")), " already accepted"))
        .when(time_order).then(_text("bar_time=", _ts(pl.col("bar_time")), " before latest accepted ",
                                     _ts(pl.col("_latest"))))
        .otherwise("_detail").alias("_detail"),
    )

    kept = df.filter("_ok")
    kept = kept.with_columns(pl.col("bar_time").shift(1, fill_value=pl.lit(last_time, dtype=time_type))
                             .alias("_prev"))
    gap_size = pl.col("bar_time") - pl.col("_prev")
    gaps = kept.filter(gap_size > max_gap).with_columns(
        pl.lit(BarReason.GAP.value).alias("_reason"),
        _text("gap of ", gap_size.dt.total_seconds(), "s after ", _ts(pl.col("_prev")),
              f" (max {max_gap.total_seconds():g}s)").alias("_detail"),
    )
    rejected = df.filter(~pl.col("_ok"))
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
    return ValidatedBars(bars=kept.select(bars.columns), rejections=rejections, counts=counts)


def validate_chunks(chunks: Iterable[pl.DataFrame], timeframe: str,
                    max_gap: timedelta | None = None) -> Iterator[ValidatedBars]:
    """validate_bars over consecutive chunks of one series, carrying the last accepted bar_time so
    duplicates, disorder and gaps are caught across chunk boundaries."""
    last_time = None
    for chunk in chunks:
        result = validate_bars(chunk, timeframe, max_gap, last_time=last_time)
        last_time = result.last_time or last_time
        yield result
