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
    """Why a bar was rejected before anything used it."""

    NON_FINITE = "non_finite"
    NON_POSITIVE_PRICE = "non_positive_price"
    HIGH_BELOW_LOW = "high_below_low"
    CLOSE_OUTSIDE_RANGE = "close_outside_range"
    NEGATIVE_VOLUME = "negative_volume"
    DUPLICATE_TIME = "duplicate_time"
    OUT_OF_ORDER = "out_of_order"
    GAP = "gap"  # not removed: the bar is kept, the gap before it is recorded


BAR_REJECTION_SCHEMA = pl.Schema(
    {
        "symbol": pl.String,
        "timeframe": pl.String,
        "bar_time": pl.Datetime("us", "UTC"),
        "reason": pl.String,
        "detail": pl.String,
    }
)
