"""One worker loop for every mode: feed -> validate -> prepare -> decide -> sink.

`run_worker(spec, feed, sink, clock, ctx)` runs one worker (one client x strategy x symbol x
timeframe) in whatever process calls it. What differs between modes is only what is plugged in:

- a *feed* yields bars: chunks (historical, mock) as raw BAR_SCHEMA frames or as `ValidatedBars`
  already validated by the feed (`modes.sources.chunk_feed`, on a prefetch thread), or BAR_SCHEMA
  rows as dicts, one bar at a time (simulation, live: `modes.sources.per_bar_feed`). A feed yields
  one kind. The first bars, up to
  `ctx.emit_from`, are history: they warm up features and the window check, and their rejections
  belong to the runs that cover them.
- a *clock* says "now": the end of the newest bar in replay (`ReplayClock`, optionally paced at
  `speed` x real time), the wall clock in live (`WallClock`).
- a *sink* takes each batch of decisions and bar rejections and acknowledges, through its
  `checkpoints`, the last bar time it holds durably per worker: `storage.writer.SignalWriter` is
  one as it is (durable after its `flush`), `MemorySink` at once.

Chunks are prepared with batch features (`WorkerEngine.prepare`), single bars with incremental ones
(`BarPreparer`); both give bit-identical `Prepared` rows and go through the same `decide`, so a
replay one bar at a time produces the decisions of a historical run over the same bars, bit for bit
(tests/unit/modes/test_worker_equivalence.py).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol

import numpy as np
import polars as pl

from signalgen.data.validation import BarValidator, ValidatedBars, validate_bars
from signalgen.modes.engine import BarPreparer, WorkerEngine
from signalgen.signals.records import Decisions, epoch_us
from signalgen.models.registry import ModelRegistry
from signalgen.config.workers import WorkerSpec


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


class Clock(Protocol):
    def advance(self, bar_time_us: int) -> None:
        """A bar ending at `bar_time_us` arrived (replay: time moves there, pacing if asked)."""

    def now_us(self) -> int:
        """The evaluation time of the bar being decided, epoch microseconds."""


class ReplayClock:
    """Simulated time: now is the end of the newest bar. `speed` 0 replays as fast as possible;
    s > 0 paces bars at s x real time (60: one minute of bars per second)."""

    def __init__(self, speed: float = 0.0, *, sleep=time.sleep, monotonic=time.monotonic) -> None:
        self.speed, self._sleep, self._monotonic = speed, sleep, monotonic
        self._now: int | None = None
        self._origin: tuple[int, float] | None = None  # (first bar time, wall time it was replayed)

    def advance(self, bar_time_us: int) -> None:
        if self.speed > 0:
            if self._origin is None:
                self._origin = (bar_time_us, self._monotonic())
            due = self._origin[1] + (bar_time_us - self._origin[0]) / 1e6 / self.speed
            wait = due - self._monotonic()
            if wait > 0:
                self._sleep(wait)
        self._now = bar_time_us if self._now is None else max(self._now, bar_time_us)

    def now_us(self) -> int:
        if self._now is None:
            raise RuntimeError("ReplayClock.now_us before any bar")
        return self._now


class WallClock:
    """Live time: now is the wall clock, whatever the bars say."""

    def advance(self, bar_time_us: int) -> None:
        pass

    def now_us(self) -> int:
        return time.time_ns() // 1000


class Sink(Protocol):
    """Where a worker's decisions go (`storage.writer.SignalWriter` has exactly this interface)."""

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        """Take one batch of decisions."""

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        """Take bar rejections (BAR_REJECTION_SCHEMA)."""

    @property
    def checkpoints(self) -> dict[str, datetime]:
        """Worker id -> last bar time held durably: the point a restarted worker resumes after."""


class MemorySink:
    """Keeps everything in memory and calls it durable at once (tests, benchmarks)."""

    def __init__(self) -> None:
        self.decisions: list[Decisions] = []
        self.bar_rejections: list[pl.DataFrame] = []
        self._last: dict[str, Decisions] = {}  # worker id -> its last batch with bars

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        self.decisions.append(decisions)
        if decisions.bars:
            self._last[spec.id] = decisions

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        self.bar_rejections.append(rejections)

    @property
    def checkpoints(self) -> dict[str, datetime]:
        return {wid: _EPOCH + int(d.bar_time_us[-1]) * _US for wid, d in self._last.items()}

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """All (signals, rejections) records written so far, in order."""
        parts = [d.frames() for d in self.decisions]
        return pl.concat([p[0] for p in parts]), pl.concat([p[1] for p in parts])


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs besides its spec, feed, sink and clock (all picklable)."""

    registry_dir: str
    backend: str          # "onnx" | "lightgbm" | "mock"
    started_at: datetime  # the run's start: model age is judged at it, as in historical mode
    mode: str
    run_id: str
    emit_from: datetime   # bars at or before it are history only
    seed: int = 0


@dataclass
class WorkerOutcome:
    bars: int = 0
    signals: int = 0
    reasons: Counter = field(default_factory=Counter)
    bar_rejections: Counter = field(default_factory=Counter)
    checkpoint: datetime | None = None  # the sink's acknowledged checkpoint after the last batch
    problems: list[str] = field(default_factory=list)
    stopped: bool = False


def bar_feed(frames: Iterable[pl.DataFrame]) -> Iterator[dict]:
    """A per-bar feed over stored bars: each row of each frame, in order (e.g. over
    `modes.sources.bar_chunks`, which reads synthetic bars or files)."""
    for frame in frames:
        yield from frame.iter_rows(named=True)


def run_worker(spec: WorkerSpec, feed: Iterable[dict | pl.DataFrame | ValidatedBars], sink: Sink, clock: Clock,
               ctx: WorkerContext, stop: threading.Event | None = None) -> WorkerOutcome:
    """Run one worker over its feed until the feed ends or `stop` is set.

    Raises what the feed raises (a worker whose data cannot be read fails alone: the caller
    records it).
    """
    engine = WorkerEngine(spec, ModelRegistry(ctx.registry_dir), backend=ctx.backend, now=ctx.started_at,
                          mode=ctx.mode, run_id=ctx.run_id, seed=ctx.seed)
    outcome = WorkerOutcome(problems=list(engine.problems))
    emit_from = epoch_us(ctx.emit_from)
    validator, preparer = BarValidator(spec.timeframe), BarPreparer(engine.params)
    history = None  # batch path: the validated bars the next chunk's features need
    past_history = False  # per-bar path: a bar after emit_from has arrived

    def deliver(decisions: Decisions) -> None:
        outcome.bars += decisions.bars
        outcome.signals += decisions.signals
        counts = outcome.reasons
        for reason, n in decisions.reasons.items():  # Counter.update, without its generic checks
            counts[reason] += n
        sink.record(spec, decisions)

    def reject(rejections: pl.DataFrame | None, in_range: bool) -> None:
        if rejections is not None and rejections.height and in_range:
            sink.record_bar_rejections(rejections, ctx.run_id)
            outcome.bar_rejections.update(dict(rejections["reason"].value_counts().iter_rows()))

    for item in feed:
        if stop is not None and stop.is_set():
            outcome.stopped = True
            break
        if not isinstance(item, (pl.DataFrame, ValidatedBars)):  # one bar (simulation, live): kept lean
            t = item.get("bar_time")
            t_us = None if t is None else epoch_us(t)
            # a bar without a time is in the range once the range has begun
            in_range = past_history if t_us is None else t_us > emit_from
            past_history = past_history or in_range
            accepted, rejections = validator.push(item)
            if rejections is not None:
                reject(rejections, in_range)
            if accepted:
                prepared = preparer.push(item, t_us)
                clock.advance(t_us)
                if in_range:
                    deliver(engine.decide(prepared, np.array([clock.now_us()], dtype=np.int64)))
            continue
        # a chunk: raw (validated here) or validated by the feed on another thread
        checked = validate_bars(item, spec.timeframe, last_time=validator.last_time) \
            if isinstance(item, pl.DataFrame) else item
        if checked.last_time is not None:
            validator.last_time = checked.last_time
        first = history is None
        # the first chunk is history: its rejections belong to the runs that cover it
        reject(checked.rejections, not first)
        bars = checked.bars if first or not history.height else pl.concat([history, checked.bars])
        history = bars.tail(engine.history)
        if bars.height:
            clock.advance(epoch_us(bars["bar_time"][-1]))
        prepared = engine.prepare(bars, emit_from)
        if prepared.bar_time_us.size:
            emit_from = int(prepared.bar_time_us[-1])  # later chunks repeat these rows as history
            deliver(engine.decide(prepared))
    if outcome.bars:  # the sink's acknowledged checkpoint after the last batch (read once, not per bar)
        outcome.checkpoint = sink.checkpoints.get(spec.id)
    return outcome
