"""One worker's pipeline over bars, shared by every mode: features -> models -> signals.

Two ways to prepare, one way to decide: `WorkerEngine.prepare` (a chunk of bars, batch features)
and `BarPreparer.push` (one bar, incremental features and window check) give the same `Prepared`
rows bit for bit (`features/kernel.py`), and `WorkerEngine.decide` turns either into decisions.
Every stage is row-independent, so a bar decided alone gets exactly the decision it gets in a batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

from signalgen.features.batch import feature_array
from signalgen.features.incremental import IncrementalFeatures
from signalgen.features.spec import FEATURE_NAMES
from signalgen.models.backends import Predictor, load_checked
from signalgen.models.registry import ModelCard, ModelRegistry
from signalgen.config.workers import WorkerSpec, history_bars
from signalgen.signals.pipeline import ModelParams, StrategyParams, evaluate
from signalgen.signals.records import Decisions, epoch_us
from signalgen.signals.validate import WindowCheck, window_complete

# Stands in for the card of a model that could not be loaded: its bars are all rejected as
# model_unhealthy, so these values never shape a signal; the version marks the records.
UNAVAILABLE = "unavailable"


def strategy_params(spec: WorkerSpec, cards: Sequence[ModelCard | None]) -> StrategyParams:
    """Plain parameters of a worker: its strategy config joined with its models' cards (None: a model
    that could not be loaded)."""
    s = spec.strategy
    models = tuple(
        ModelParams(ref.model_id, card.version, card.direction, card.horizon_bars, card.target_return,
                    ref.weight, ref.confidence_threshold, ref.lookback_window) if card is not None
        else ModelParams(ref.model_id, UNAVAILABLE, 1, 1, 0.0, ref.weight, ref.confidence_threshold,
                         ref.lookback_window)
        for ref, card in zip(s.models, cards, strict=True))
    return StrategyParams(spec.client.id, s.id, spec.symbol, spec.timeframe, s.aggregation, s.filters, s.sizing,
                          spec.exposure_budget, s.max_staleness_bars, models)



@dataclass(frozen=True)
class Prepared:
    """Candidate bars of one batch with their features, ready for the models."""

    bar_time_us: np.ndarray
    features: np.ndarray   # (n, len(FEATURE_NAMES)) float32
    window_ok: np.ndarray  # lookback window complete
    compute_ns: int        # time spent preparing, for the latency column


class BarPreparer:
    """`WorkerEngine.prepare` one bar at a time: incremental features and lookback-window state.

    Push every validated bar in time order, history included; each push returns that bar's
    `Prepared` row, equal bit for bit to its row in a batch `prepare` over the same bars (given the
    WARMUP_BARS + lookback bars before it, as `history_bars` loads).
    """

    def __init__(self, params: StrategyParams) -> None:
        self.features = IncrementalFeatures()
        self.window = WindowCheck(params.lookback, params.max_gap_us)

    def push(self, bar: dict, bar_time_us: int | None = None) -> Prepared:
        """One validated bar (a BAR_SCHEMA row as a dict; `bar_time_us` its bar_time in epoch
        microseconds, if the caller has it) -> its Prepared row."""
        started = time.perf_counter_ns()
        t = epoch_us(bar["bar_time"]) if bar_time_us is None else bar_time_us
        x = self.features.update(bar["open"], bar["high"], bar["low"], bar["close"], bar["volume"])
        ok = self.window.push(t)
        # float64 values straight to a float32 row: the same rounding as batch's float32 cast
        return Prepared(np.array([t], dtype=np.int64), np.array([x], dtype=np.float32), np.array([ok]),
                        time.perf_counter_ns() - started)


class WorkerEngine:
    """Holds a worker's models and turns (history + new bars) into signals and rejections."""

    def __init__(self, spec: WorkerSpec, registry: ModelRegistry, *, backend: str, now: datetime,
                 mode: str, run_id: str, seed: int = 0) -> None:
        self.spec = spec
        self.mode, self.run_id = mode, run_id
        # A faulty model never raises here: it becomes problems, and only this worker's bars that need
        # it are rejected as model_unhealthy (its predictions stay NaN); other models and workers run.
        models = [load_checked(registry, r.model_id, backend, now=now, max_age_days=r.max_age_days,
                               timeframe=spec.timeframe, seed=seed) for r in spec.strategy.models]
        self.predictors: list[Predictor | None] = [m.predictor if m.ok else None for m in models]
        self.problems = [msg for m in models for msg in m.problems]  # the run reports each once
        self.model_ok = np.array([m.ok for m in models])
        self.params = strategy_params(spec, [m.predictor.card if m.predictor else None for m in models])
        self.history = history_bars(spec)

    def prepare(self, bars: pl.DataFrame, emit_from_us: int) -> Prepared:
        """Features of the bars with bar_time > emit_from_us; earlier rows are history only.

        `bars` are validated bars of this worker's symbol in ascending time. Needs no model, so a
        runner may prepare the next batch on another thread while `decide` runs.
        """
        started = time.perf_counter_ns()
        times = bars["bar_time"].dt.epoch("us").to_numpy()
        # validated bars ascend, so the new ones are a suffix: row slices are views, not copies
        first = int(np.searchsorted(times, emit_from_us, side="right"))
        if first == times.size:
            return Prepared(times[first:], np.empty((0, len(FEATURE_NAMES)), np.float32), np.empty(0, bool), 0)
        x = feature_array(bars)[first:]
        window_ok = window_complete(times, self.params.lookback, self.params.max_gap_us)[first:]
        return Prepared(times[first:], x, window_ok, time.perf_counter_ns() - started)

    def decide(self, prepared: Prepared, now_us: np.ndarray | None = None) -> Decisions:
        """Run the models and the signal pipeline on prepared bars.

        `now_us` is the evaluation time of each bar (default: its own end time, as in historical replay).
        """
        started = time.perf_counter_ns()
        t, x = prepared.bar_time_us, prepared.features
        if t.size == 1:  # the per-bar path: single-row calls on bound buffers (the same outputs)
            row = x[0]
            finite = all(map(math.isfinite, row.tolist()))
            preds = np.array([[p.predict_one(row) if finite and p is not None else math.nan
                               for p in self.predictors]])
            return self._decided(prepared, preds, now_us, started)
        preds = np.full((t.size, len(self.predictors)), np.nan)
        finite = np.isfinite(x).all(axis=1)
        if finite.all():  # the usual chunk: no copy of the rows
            for j, predictor in enumerate(self.predictors):
                if predictor is not None:
                    preds[:, j] = predictor.predict(x)
        elif finite.any():
            xf = np.ascontiguousarray(x[finite])
            for j, predictor in enumerate(self.predictors):
                if predictor is not None:
                    preds[finite, j] = predictor.predict(xf)
        return self._decided(prepared, preds, now_us, started)

    def _decided(self, prepared: Prepared, preds: np.ndarray, now_us: np.ndarray | None,
                 started: int) -> Decisions:
        t = prepared.bar_time_us
        now = t if now_us is None else now_us
        ev = evaluate(self.params, t, now, prepared.features, preds, self.model_ok, prepared.window_ok)
        spent_ns = prepared.compute_ns + time.perf_counter_ns() - started
        return Decisions(self.params, ev, t, now, preds, self.mode, self.run_id, spent_ns // 1000 // max(t.size, 1))
