"""Decision records: what one evaluated batch of a worker is, on its way to the store and the streams.

`Decisions` (arrays, as the engine produced them) and `Records` (plain rows, picklable and cheap for a
few bars) are the floor every writer, sink and transport builds on: the engine makes them, the
writer, the recorders and the sinks carry them. Both give the same SIGNAL_SCHEMA / REJECTION_SCHEMA
frames, value for value; the signal id of a bar is `signals.ids.signal_ids`, computed here in plain
Python for one bar at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pyarrow as pa

from signalgen.signals.pipeline import Evaluation, StrategyParams, count_reasons, reason_codes, to_frames
from signalgen.signals.types import MODEL_OUTPUT, REJECTION_SCHEMA, SIGNAL_SCHEMA

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SMALL_BATCH = 64  # up to this many bars, a streaming worker sends its records as plain rows (`Decisions.records`)
_US = timedelta(microseconds=1)


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
