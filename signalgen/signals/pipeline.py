"""The signal pipeline for one worker: validate -> vote/aggregate -> filter -> size -> records.

Pure: arrays and time come in as arguments, polars frames of signals and rejections come out.
Historical mode calls `evaluate` on a million bars at once, simulation and live on one bar; the
results are the same because it is the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import polars as pl

from signalgen.config.models import (
    Aggregation, FiltersConfig, SizingConfig, default_max_gap, timeframe_delta,
)
from signalgen.features.spec import FEATURE_NAMES
from signalgen.signals import filters, sizing, validate
from signalgen.signals.aggregate import aggregate, expected_move, holding_period
from signalgen.signals.ids import id_key, signal_ids
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA, Reason

REASON_BIT = {reason: np.uint16(1 << i) for i, reason in enumerate(Reason)}
_VOL20 = FEATURE_NAMES.index("vol_20")


@dataclass(frozen=True)
class ModelParams:
    model_id: str
    version: str
    direction: int        # +1: the model predicts an up move, -1: a down move
    horizon_bars: int
    target_return: float
    weight: float
    threshold: float
    lookback: int


@dataclass(frozen=True)
class StrategyParams:
    """Everything `evaluate` needs about one worker, as plain values."""

    client_id: str
    strategy_id: str
    symbol: str
    timeframe: str
    aggregation: Aggregation
    filters: FiltersConfig
    sizing: SizingConfig
    exposure_budget: float
    max_staleness_bars: float
    models: tuple[ModelParams, ...]
    key: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        key = id_key(self.client_id, self.strategy_id, self.symbol, self.timeframe,
                     [(m.model_id, m.version) for m in self.models])
        object.__setattr__(self, "key", key)

    @property
    def lookback(self) -> int:
        return max(m.lookback for m in self.models)

    @property
    def timeframe_us(self) -> int:
        return timeframe_delta(self.timeframe) // timedelta(microseconds=1)

    @property
    def max_gap_us(self) -> int:
        return default_max_gap(self.timeframe) // timedelta(microseconds=1)

    def column(self, name: str) -> np.ndarray:
        return np.array([getattr(m, name) for m in self.models], dtype=np.float64)


@dataclass(frozen=True)
class Evaluation:
    direction: np.ndarray
    confidence: np.ndarray
    strength: np.ndarray
    magnitude: np.ndarray
    weight: np.ndarray
    period: np.ndarray
    reasons: np.ndarray  # uint16 bitmask of Reason; 0 = accepted

    @property
    def accepted(self) -> np.ndarray:
        return self.reasons == 0


def evaluate(params: StrategyParams, bar_time_us: np.ndarray, now_us: np.ndarray, features: np.ndarray,
             predictions: np.ndarray, model_ok: np.ndarray, window_ok: np.ndarray) -> Evaluation:
    """Decide every candidate bar.

    Args:
        bar_time_us: bar end times (epoch us), ascending.
        now_us: evaluation time of each candidate (historical: the bar end; live: the clock).
        features: (n, len(FEATURE_NAMES)) feature rows.
        predictions: (n, k) outputs of the strategy's k models (NaN where not computed).
        model_ok: (k,) model passed its load-time health check.
        window_ok: (n,) lookback window complete (see `validate.window_complete`).
    """
    bit = REASON_BIT
    nan_rows = validate.non_finite_rows(features)
    reasons = np.zeros(bar_time_us.size, dtype=np.uint16)
    reasons |= bit[Reason.STALE_DATA] * validate.stale(
        bar_time_us, now_us, int(params.max_staleness_bars * params.timeframe_us))
    reasons |= bit[Reason.INCOMPLETE_WINDOW] * ~window_ok
    reasons |= bit[Reason.NAN_FEATURE] * nan_rows
    reasons |= bit[Reason.MODEL_UNHEALTHY] * (validate.bad_model_rows(predictions, model_ok) & ~nan_rows)
    reasons |= bit[Reason.DUPLICATE_SIGNAL] * validate.duplicate_rows(bar_time_us)

    directions, weights = params.column("direction"), params.column("weight")
    thresholds = params.column("threshold")
    agg = aggregate(predictions, directions, weights, thresholds, params.aggregation)
    if params.aggregation is Aggregation.UNANIMOUS:
        with np.errstate(invalid="ignore"):
            below = ~(predictions >= thresholds[None, :]).all(axis=1)
    else:
        below = ~agg.any_vote
    reasons |= bit[Reason.BELOW_CONFIDENCE] * below
    reasons |= bit[Reason.NO_CONSENSUS] * ((agg.direction == 0) & ~below)

    vol_cfg, trend_cfg = params.filters.volatility, params.filters.trend_confirmation
    if vol_cfg.enabled:
        vol = features[:, FEATURE_NAMES.index(vol_cfg.feature)]
        reasons |= bit[Reason.VOLATILITY_FILTER] * ((agg.direction != 0) & filters.outside_band(vol, vol_cfg.min, vol_cfg.max))
    if trend_cfg.enabled:
        trend = features[:, FEATURE_NAMES.index(trend_cfg.feature)]
        reasons |= bit[Reason.TREND_UNCONFIRMED] * filters.trend_disagrees(agg.direction, trend)

    weight = sizing.size(agg.strength, features[:, _VOL20].astype(np.float64), params.sizing,
                         params.exposure_budget)
    reasons |= bit[Reason.ZERO_SIZE] * ((agg.direction != 0) & (weight <= 0))
    magnitude = expected_move(predictions, agg.agree, weights, params.column("target_return"), agg.direction)
    period = holding_period(agg.agree, params.column("horizon_bars"))
    return Evaluation(agg.direction, agg.confidence, agg.strength, magnitude, weight, period, reasons)


def count_reasons(reasons: np.ndarray) -> dict[str, int]:
    """Candidates per reason code (a candidate with two reasons counts under both)."""
    counts = {r.value: int(np.count_nonzero(reasons & b)) for r, b in REASON_BIT.items()}
    return {k: v for k, v in counts.items() if v}


def reason_codes(reasons: np.ndarray) -> list[list[str]]:
    """Decode bitmasks into lists of reason codes (for tests and reports)."""
    return [[r.value for r, b in REASON_BIT.items() if m & b] for m in reasons]


def _models_column(params: StrategyParams, predictions: np.ndarray) -> pl.Series:
    """list<struct<model_id, version, output>>: gathers and a reshape (polars' concat_list of structs
    costs ~6 s per 1M rows)."""
    n, k = predictions.shape
    idx = pl.Series(np.tile(np.arange(k, dtype=np.uint32), n))
    flat = pl.DataFrame({
        "model_id": pl.Series([m.model_id for m in params.models]).gather(idx),
        "version": pl.Series([m.version for m in params.models]).gather(idx),
        "output": pl.Series(predictions.ravel()).fill_nan(None),
    }).to_struct("models")
    return flat.reshape((n, k)).cast(pl.List(flat.dtype))


def _reasons_column(reasons: np.ndarray) -> pl.Series:
    """list<string> of reason codes: each distinct bitmask decoded once, then gathered."""
    distinct, index = np.unique(reasons, return_inverse=True)
    return pl.Series("reasons", reason_codes(distinct), dtype=pl.List(pl.String)).gather(index.astype(np.uint32))


def to_frames(params: StrategyParams, ev: Evaluation, bar_time_us: np.ndarray, now_us: np.ndarray,
              predictions: np.ndarray, *, mode: str, run_id: str,
              latency_us: np.ndarray | int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Signal and rejection records (SIGNAL_SCHEMA, REJECTION_SCHEMA) of one evaluated batch."""
    n = bar_time_us.size
    accepted = ev.accepted
    utc = pl.Datetime("us", "UTC")
    base = pl.DataFrame({
        "signal_id": signal_ids(params.key, bar_time_us),
        "bar_time": pl.Series(bar_time_us, dtype=pl.Int64).cast(utc),
        "generated_at": pl.Series(np.broadcast_to(now_us, n), dtype=pl.Int64).cast(utc),
        "direction": ev.direction.astype(np.int8),
        "confidence": ev.confidence,
        "magnitude": ev.magnitude,
        "strength": ev.strength,
        "weight": ev.weight,
        "period": ev.period.astype(np.int32),
        "latency_us": np.broadcast_to(np.asarray(latency_us, dtype=np.int64), n),
        "models": _models_column(params, predictions),
    }).with_columns(pl.lit(params.client_id).alias("client_id"), pl.lit(params.strategy_id).alias("strategy_id"),
                    pl.lit(params.symbol).alias("symbol"), pl.lit(params.timeframe).alias("timeframe"),
                    pl.lit(mode).alias("mode"), pl.lit(run_id).alias("run_id"))
    signals = base.filter(accepted).select([pl.col(c).cast(t) for c, t in SIGNAL_SCHEMA.items()])
    rejected = ~accepted
    rejections = base.filter(rejected).with_columns(
        pl.col("signal_id").alias("rejection_id"),
        _reasons_column(ev.reasons[rejected]),
    ).select([pl.col(c).cast(t) for c, t in REJECTION_SCHEMA.items()])
    return signals, rejections
