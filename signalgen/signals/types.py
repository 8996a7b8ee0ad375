"""The Signal and Rejection records (schema in ARCHITECTURE.md, aligned with LEAN's Insight)."""

from __future__ import annotations

from enum import StrEnum

import polars as pl


class Reason(StrEnum):
    """Machine-readable reason codes of a rejected candidate."""

    STALE_DATA = "stale_data"
    INCOMPLETE_WINDOW = "incomplete_window"
    NAN_FEATURE = "nan_feature"
    MODEL_UNHEALTHY = "model_unhealthy"
    BELOW_CONFIDENCE = "below_confidence"
    NO_CONSENSUS = "no_consensus"
    VOLATILITY_FILTER = "volatility_filter"
    TREND_UNCONFIRMED = "trend_unconfirmed"
    DUPLICATE_SIGNAL = "duplicate_signal"
    ZERO_SIZE = "zero_size"


MODEL_OUTPUT = pl.Struct({"model_id": pl.String, "version": pl.String, "output": pl.Float64})

_KEY = {
    "client_id": pl.String,
    "strategy_id": pl.String,
    "symbol": pl.String,
    "timeframe": pl.String,
    "bar_time": pl.Datetime("us", "UTC"),      # bar end
    "generated_at": pl.Datetime("us", "UTC"),  # when the signal became available
}

SIGNAL_SCHEMA = pl.Schema(
    {
        "signal_id": pl.String,  # deterministic: the idempotency key
        **_KEY,
        "direction": pl.Int8,    # +1 up, 0 flat, -1 down
        "confidence": pl.Float64,
        "magnitude": pl.Float64,  # expected return over `period` bars (signed), may be null
        "strength": pl.Float64,
        "weight": pl.Float64,     # target fraction of capital after sizing, >= 0
        "period": pl.Int32,       # holding horizon in bars
        "models": pl.List(MODEL_OUTPUT),
        "mode": pl.String,
        "run_id": pl.String,
        "latency_us": pl.Int64,
    }
)

REJECTION_SCHEMA = pl.Schema(
    {
        "rejection_id": pl.String,  # same deterministic key the signal would have had
        **_KEY,
        "reasons": pl.List(pl.String),
        "direction": pl.Int8,       # the candidate's direction before it was rejected (0 if none)
        "confidence": pl.Float64,
        "models": pl.List(MODEL_OUTPUT),
        "mode": pl.String,
        "run_id": pl.String,
    }
)

# What a stream carries for a signal (docs/streams.md, "Revisions and retractions"): the signal, its
# `revision` (0 when first streamed, one more each time what it says changes) and `retracted` (a re-run
# turned the bar into a rejection or decided it with another id: the consumer drops the signal).
STREAM_SCHEMA = pl.Schema({**SIGNAL_SCHEMA, "revision": pl.Int32, "retracted": pl.Boolean})
# Fields that differ between deliveries of one decision (who ran it, when, how fast): a change in
# them alone is no news, so it keeps the revision.
VOLATILE = ("run_id", "latency_us", "generated_at")


def stream_rows(signals: pl.DataFrame) -> pl.DataFrame:
    """Signals as stream rows (STREAM_SCHEMA): as they are when they carry a revision (the store's
    `Written.stream`), else each said for the first time (revision 0, not retracted)."""
    if "revision" in signals.columns:
        return signals.select(STREAM_SCHEMA.names())
    return signals.select(*SIGNAL_SCHEMA.names(), pl.lit(0, pl.Int32).alias("revision"),
                          pl.lit(False).alias("retracted"))
