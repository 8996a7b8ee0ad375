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
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pyarrow as pa

from signalgen.features.batch import feature_array
from signalgen.features.incremental import IncrementalFeatures
from signalgen.features.spec import FEATURE_NAMES, WARMUP_BARS
from signalgen.models.backends import Predictor, load_checked
from signalgen.models.registry import ModelCard, ModelRegistry
from signalgen.config.workers import WorkerSpec
from signalgen.signals.pipeline import (
    Evaluation, ModelParams, StrategyParams, count_reasons, evaluate, reason_codes, to_frames,
)
from signalgen.signals.types import MODEL_OUTPUT, REJECTION_SCHEMA, SIGNAL_SCHEMA
from signalgen.signals.validate import WindowCheck, window_complete

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SMALL_BATCH = 64  # up to this many bars, a streaming worker sends its records as plain rows (`Decisions.records`)
_US = timedelta(microseconds=1)


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


def history_bars(spec: WorkerSpec) -> int:
    """Bars of history a batch needs before its first candidate: features' warm-up + the lookback window."""
    return WARMUP_BARS + max(m.lookback_window for m in spec.strategy.models)


@dataclass(frozen=True)
class Prepared:
    """Candidate bars of one batch with their features, ready for the models."""

    bar_time_us: np.ndarray
    features: np.ndarray   # (n, len(FEATURE_NAMES)) float32
    window_ok: np.ndarray  # lookback window complete
    compute_ns: int        # time spent preparing, for the latency column


@dataclass(frozen=True)
class Decisions:
    """One evaluated batch of a worker. `frames()` builds its records; the recorder calls it on its
    writer thread, so building records overlaps with the next batch's inference."""

    params: StrategyParams
    evaluation: Evaluation
    bar_time_us: np.ndarray
    now_us: np.ndarray
    predictions: np.ndarray
    mode: str
    run_id: str
    latency_us: int | np.ndarray  # compute time per bar: one value for the batch, or one per bar

    @classmethod
    def concat(cls, parts: Sequence[Decisions]) -> Decisions:
        """One batch of consecutive batches of the same worker (each bar keeps its own latency)."""
        if len(parts) == 1:
            return parts[0]
        ev = Evaluation(*(np.concatenate([getattr(p.evaluation, f.name) for p in parts])
                          for f in fields(Evaluation)))
        latency = np.concatenate([_per_bar(p.latency_us, p.bars, np.int64) for p in parts])
        first = parts[0]
        return cls(first.params, ev, np.concatenate([p.bar_time_us for p in parts]),
                   np.concatenate([_per_bar(p.now_us, p.bars) for p in parts]),
                   np.concatenate([p.predictions for p in parts]), first.mode, first.run_id, latency)

    @property
    def bars(self) -> int:
        return int(self.bar_time_us.size)

    @property
    def signals(self) -> int:
        reasons = self.evaluation.reasons
        if reasons.size == 1:  # the per-bar path, without numpy's reduction machinery
            return 0 if reasons[0] else 1
        return int(np.count_nonzero(self.evaluation.accepted))

    @property
    def reasons(self) -> dict[str, int]:
        return count_reasons(self.evaluation.reasons)

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(signals, rejections) in SIGNAL_SCHEMA and REJECTION_SCHEMA."""
        if not self.bars:
            return pl.DataFrame(schema=SIGNAL_SCHEMA), pl.DataFrame(schema=REJECTION_SCHEMA)
        return to_frames(self.params, self.evaluation, self.bar_time_us, self.now_us, self.predictions,
                         mode=self.mode, run_id=self.run_id, latency_us=self.latency_us)

    def records(self) -> Records:
        """The same records as `frames()`, as plain rows built without polars: ~30 us for one bar
        where `frames()` costs ~1.3 ms (a streaming worker decides one bar at a time). For small
        batches; `Records.frames` turns them into exactly the frames `frames()` returns."""
        p, ev, n = self.params, self.evaluation, self.bars
        times = self.bar_time_us.tolist()
        ids = [_signal_id(p.key, t) for t in times]
        now = _per_bar(self.now_us, n).tolist()
        latency = _per_bar(self.latency_us, n, np.int64).tolist()
        reasons = ev.reasons.tolist()
        direction, confidence = ev.direction.tolist(), ev.confidence.tolist()
        magnitude, strength, weight, period = (ev.magnitude.tolist(), ev.strength.tolist(), ev.weight.tolist(),
                                               ev.period.tolist())
        heads = [(m.model_id, m.version) for m in p.models]
        key = (p.client_id, p.strategy_id, p.symbol, p.timeframe)
        signals, rejections = [], []
        for i, outputs in enumerate(self.predictions.tolist()):
            # NaN outputs are nulls, as in `_models_column` (fill_nan(None))
            models = [{"model_id": mid, "version": ver, "output": None if out != out else out}
                      for (mid, ver), out in zip(heads, outputs)]
            if reasons[i] == 0:
                signals.append((ids[i], *key, times[i], now[i], direction[i], confidence[i], magnitude[i],
                                strength[i], weight[i], period[i], models, self.mode, self.run_id, latency[i]))
            else:
                rejections.append((ids[i], *key, times[i], now[i], _reason_names(reasons[i]), direction[i],
                                   confidence[i], models, self.mode, self.run_id))
        return Records(signals, rejections)


def _per_bar(values: int | np.ndarray, n: int, dtype=None) -> np.ndarray:
    """`values` (one for the batch, or one per bar) as n values: `np.broadcast_to(values, n)` without
    its ~2 us per call, which made joining 4,096 one-bar batches cost ~7 us per bar."""
    a = np.asarray(values, dtype=dtype)
    return a.reshape(n) if a.size == n else np.full(n, a.item(), dtype=a.dtype)


_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _signal_id(key: tuple[int, int], bar_time_us: int) -> str:
    """`signals.ids.signal_ids` of one bar in plain Python ints (the numpy + arrow path costs ~60 us
    per call whatever its size); tests/unit/modes/test_records.py holds the two equal."""
    t = bar_time_us & _M64
    raw = bytearray((_mix64(key[0] ^ _mix64(t)) << 64 | _mix64(key[1] ^ _mix64((t + 0x9E3779B97F4A7C15) & _M64)))
                    .to_bytes(16, "big"))
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # variant 10 (RFC 9562)
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _reason_names(mask: int) -> list[str]:
    names = _REASON_NAMES.get(mask)
    if names is None:
        names = _REASON_NAMES[mask] = reason_codes(np.array([mask]))[0]
    return list(names)


_REASON_NAMES: dict[int, list[str]] = {}
# list columns of plain rows go through pyarrow's converter: polars builds one Series per row of a
# list column from Python lists (a group of 600 records: Records.frames ~15 ms, most of it there)
_ARROW_LISTS = {
    pl.List(pl.String): pa.list_(pa.string()),  # rejection reasons
    pl.List(MODEL_OUTPUT): pa.list_(pa.struct([("model_id", pa.string()), ("version", pa.string()),
                                               ("output", pa.float64())])),
}


def _column(name: str, values, dtype) -> pl.Series:
    arrow = _ARROW_LISTS.get(dtype)
    if arrow is not None:
        return pl.Series(name, pa.array(values, type=arrow)).cast(dtype)
    return pl.Series(name, values, dtype=dtype, strict=True)


_UTC_US = pl.Datetime("us", "UTC")
# Records rows hold times as epoch microseconds: built as Int64, then cast (what `to_frames` does)
_ROW_TYPES = {name: (pl.Int64 if dtype == _UTC_US else dtype) for name, dtype in SIGNAL_SCHEMA.items()}
_REJECTION_ROW_TYPES = {name: (pl.Int64 if dtype == _UTC_US else dtype) for name, dtype in REJECTION_SCHEMA.items()}


def _rows_frame(rows: list[tuple], schema: pl.Schema, row_types: dict) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema=schema)
    columns = zip(*rows, strict=True)
    frame = pl.DataFrame([_column(name, col, t) for (name, t), col in zip(row_types.items(), columns, strict=True)])
    return frame.with_columns(pl.col(c).cast(_UTC_US) for c, t in schema.items() if t == _UTC_US)


@dataclass(frozen=True)
class Records:
    """Decision records as plain rows (`Decisions.records`): picklable and cheap for a few bars.

    `signals` rows follow SIGNAL_SCHEMA's columns and `rejections` rows REJECTION_SCHEMA's, with
    times as epoch microseconds. A writer gathers the rows of many workers' batches and builds one
    frame for them all (`Records.join(...).frames()`), instead of one per bar.
    """

    signals: list[tuple]
    rejections: list[tuple]

    @classmethod
    def join(cls, parts: Sequence[Records]) -> Records:
        if len(parts) == 1:
            return parts[0]
        return cls([r for p in parts for r in p.signals], [r for p in parts for r in p.rejections])

    @property
    def bars(self) -> int:
        return len(self.signals) + len(self.rejections)

    @property
    def last_bar_time_us(self) -> int | None:
        times = [r[5] for r in self.signals] + [r[5] for r in self.rejections]
        return max(times) if times else None

    @property
    def last_bar_time(self) -> datetime | None:
        last = self.last_bar_time_us
        return None if last is None else _EPOCH + last * _US

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(signals, rejections) in SIGNAL_SCHEMA and REJECTION_SCHEMA: the frames `Decisions.frames`
        builds from the same decisions, value for value."""
        return (_rows_frame(self.signals, SIGNAL_SCHEMA, _ROW_TYPES),
                _rows_frame(self.rejections, REJECTION_SCHEMA, _REJECTION_ROW_TYPES))


def epoch_us(t: datetime) -> int:
    """A UTC datetime as epoch microseconds (the pipeline's time unit)."""
    return (t - _EPOCH) // _US


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
