"""The bar: one OHLCV record per symbol x timeframe, stamped with its end time in UTC."""

from __future__ import annotations

from enum import StrEnum

import polars as pl

BAR_SCHEMA = pl.Schema(
    {
        "symbol": pl.String,
        "timeframe": pl.String,
        "bar_time": pl.Datetime("us", "UTC"),  # bar END time: when the bar became available
        "open": pl.Float64,
        "high": pl.Float64,
        "low": pl.Float64,
        "close": pl.Float64,
        "volume": pl.Float64,
    }
)


class BarReason(StrEnum):
    """Why a bar was rejected before anything used it (docs/data.md explains each)."""

    # found by the source while reading a file (see BAR_PROBLEM_SCHEMA)
    UNPARSABLE = "unparsable"  # a bar_time or value cell that is not a time / number
    SYMBOL_MISMATCH = "symbol_mismatch"  # the row's symbol column contradicts the file's symbol
    TIMEFRAME_MISMATCH = "timeframe_mismatch"  # the row's timeframe column contradicts the folder's
    # found by validate_bars
    NON_FINITE = "non_finite"
    TOO_LARGE = "too_large"  # a price or volume above MAX_BAR_VALUE
    NON_POSITIVE_PRICE = "non_positive_price"
    HIGH_BELOW_LOW = "high_below_low"
    CLOSE_OUTSIDE_RANGE = "close_outside_range"
    NEGATIVE_VOLUME = "negative_volume"
    DUPLICATE_TIME = "duplicate_time"
    OUT_OF_ORDER = "out_of_order"
    GAP = "gap"  # not removed: the bar is kept, the gap before it is recorded


# Optional columns a source adds to BAR_SCHEMA rows: a BarReason value (null: the row read cleanly)
# and a bounded, one-line detail. `validate_bars` rejects a row that carries one and drops both
# columns, so the source only marks what it cannot read and validation decides in one place.
BAR_PROBLEM_SCHEMA = pl.Schema({"problem": pl.String, "problem_detail": pl.String})

# Largest accepted price or volume. Features square and sum up to 128 values in float64, so any
# bound below ~1e150 keeps them finite; 1e18 is far above any real price (BRK.A ~1e6) or traded
# volume (meme coins trade ~1e14 tokens a day) and still rejects overflowed or sentinel values
# such as 1e308 or 3.4e38 (float32 max).
MAX_BAR_VALUE = 1e18

BAR_REJECTION_SCHEMA = pl.Schema(
    {
        "symbol": pl.String,
        "timeframe": pl.String,
        "bar_time": pl.Datetime("us", "UTC"),
        "reason": pl.String,
        "detail": pl.String,
    }
)
