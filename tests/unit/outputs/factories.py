"""Valid signal and rejection frames for output and store tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from signalgen.signals.ids import id_key, signal_ids
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA

MODELS = [("gbm_trend", "3"), ("gbm_revert", "1")]

START = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def _base(n: int, client_id: str, strategy_id: str, symbols: tuple[str, ...], timeframe: str,
          start: datetime, step: timedelta, latency: timedelta, rng: np.random.Generator) -> pl.DataFrame:
    i = pl.int_range(n, eager=True)
    bar_time = pl.lit(start) + (i // len(symbols)) * step
    df = pl.DataFrame({"i": i}).select(
        client_id=pl.lit(client_id, pl.String),
        strategy_id=pl.lit(strategy_id, pl.String),
        symbol=(pl.col("i") % len(symbols)).replace_strict(dict(enumerate(symbols)), return_dtype=pl.String),
        timeframe=pl.lit(timeframe, pl.String),
        bar_time=bar_time.dt.cast_time_unit("us"),
    ).with_columns((pl.col("bar_time") + latency).alias("generated_at"))
    # Two models per row, built flat and folded (concat_list of structs is slow on big frames).
    even = pl.int_range(2 * n, eager=True) % 2 == 0
    flat = pl.DataFrame({"even": even}).select(
        model_id=pl.when("even").then(pl.lit("gbm_trend")).otherwise(pl.lit("gbm_revert")),
        version=pl.when("even").then(pl.lit("3")).otherwise(pl.lit("1")),
        output=pl.Series(rng.random(2 * n)),
    ).to_struct("m")
    models = flat.reshape((n, 2)).arr.to_list() if n else pl.Series("m", [], pl.List(flat.dtype))
    return df.with_columns(_ids(df), models.alias("models"))


def _ids(df: pl.DataFrame) -> pl.Series:
    """The real deterministic ids (signalgen.signals.ids) of each row's worker and bar time."""
    parts = [pl.DataFrame({"row": g["row"], "id": signal_ids(
        id_key(c, s, sym, tf, MODELS), g["bar_time"].dt.epoch("us").to_numpy())})
        for (c, s, sym, tf), g in df.with_row_index("row").group_by(
            "client_id", "strategy_id", "symbol", "timeframe")]
    if not parts:
        return pl.Series("id", [], pl.String)
    return pl.concat(parts).sort("row")["id"]


def signal_frame(n: int = 10, *, client_id: str = "ikenna", strategy_id: str = "swing_high_v1",
                 symbols: tuple[str, ...] = ("AAPL", "MSFT"), timeframe: str = "5m",
                 start: datetime = START, step: timedelta = timedelta(minutes=5),
                 latency: timedelta = timedelta(0), seed: int = 0, run_id: str = "run-1",
                 mode: str = "historical") -> pl.DataFrame:
    """`n` signals of SIGNAL_SCHEMA: symbols take turns, each next round of bars `step` later."""
    rng = np.random.default_rng(seed)
    df = _base(n, client_id, strategy_id, symbols, timeframe, start, step, latency, rng)
    magnitude = rng.normal(0, 0.01, n)  # every 5th null: magnitude is optional
    return df.with_columns(
        signal_id=pl.col("id"),
        direction=pl.Series(rng.choice([-1, 0, 1], n)),
        confidence=pl.Series(rng.uniform(0.5, 1.0, n)),
        magnitude=pl.Series(np.where(np.arange(n) % 5 == 0, np.nan, magnitude)).fill_nan(None),
        strength=pl.Series(rng.random(n)),
        weight=pl.Series(rng.uniform(0, 0.25, n)),
        period=pl.lit(12),
        mode=pl.lit(mode),
        run_id=pl.lit(run_id),
        latency_us=pl.Series(rng.integers(50, 5_000, n)),
    ).select(SIGNAL_SCHEMA.names()).cast(dict(SIGNAL_SCHEMA))


def rejection_frame(n: int = 10, *, client_id: str = "ikenna", strategy_id: str = "swing_high_v1",
                    symbols: tuple[str, ...] = ("AAPL", "MSFT"), timeframe: str = "5m",
                    start: datetime = START, step: timedelta = timedelta(minutes=5), seed: int = 0,
                    run_id: str = "run-1", mode: str = "historical") -> pl.DataFrame:
    """`n` rejected candidates of REJECTION_SCHEMA, one or two reason codes each."""
    rng = np.random.default_rng(seed)
    df = _base(n, client_id, strategy_id, symbols, timeframe, start, step, timedelta(0), rng)
    first = np.array(["below_confidence", "no_consensus", "volatility_filter"])[rng.integers(0, 3, n)]
    reasons = [[r] if k % 3 else [r, "trend_unconfirmed"] for k, r in enumerate(first)]
    return df.with_columns(
        rejection_id=pl.col("id"),
        reasons=pl.Series(reasons, dtype=pl.List(pl.String)),
        direction=pl.Series(rng.choice([-1, 0, 1], n)),
        confidence=pl.Series(rng.random(n)),
        mode=pl.lit(mode),
        run_id=pl.lit(run_id),
    ).select(REJECTION_SCHEMA.names()).cast(dict(REJECTION_SCHEMA))

