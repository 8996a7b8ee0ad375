"""historical and mock modes: bars in chunks, each bar's end time is its clock, vectorized pipeline.

Memory stays bounded for any date range: a worker holds one chunk plus the few bars of history
the features and lookback window need, never the whole range.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import groupby
from operator import itemgetter

import polars as pl
from rich.progress import Progress

from signalgen.config.models import RunConfig, timeframe_delta
from signalgen.data.validation import ValidatedBars, validate_chunks
from signalgen.errors import ConfigError, SignalgenError
from signalgen.modes.base import RunReport, peak_rss_mb
from signalgen.modes.engine import Prepared, WorkerEngine, history_bars
from signalgen.storage.writer import SignalWriter
from signalgen.modes.sources import bar_chunks, prefetched
from signalgen.models.registry import ModelRegistry
from signalgen.config.workers import WorkerSpec

log = logging.getLogger(__name__)

_US = timedelta(microseconds=1)
# what a worker's unreadable data raises (ConfigError is not one: it stops the run, exit 2)
DATA_FAILURES = (SignalgenError, OSError, pl.exceptions.PolarsError)
MAX_REASON = 300  # characters of a failure reason kept in the report and the log


class WorkerFailed(Exception):
    """A worker's data could not be read; carries the one-line reason."""


def one_line(exc: BaseException, limit: int = MAX_REASON) -> str:
    """The error as one bounded line (a garbage file's bytes never flood the summary)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, SignalgenError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class BatchRunner:
    """Runs workers one after another in this process; the recorder is the only writer.

    Signals and rejections reach the store chunk by chunk; file outputs are flushed once, when the
    run closes its recorder, so each QuantConnect day file is rewritten once per run rather than
    once per symbol (a failed run is repaired by running it again: every write is idempotent).

    A worker whose data cannot be read fails alone (`report.failures`); the others go on. When
    `stop` is set (by a signal handler) the run stops between chunks with `report.status = "stopped"`.
    """

    def __init__(self, cfg: RunConfig, recorder: SignalWriter, *, run_id: str, started_at: datetime,
                 progress: Progress | None = None, stop: threading.Event | None = None) -> None:
        self.cfg, self.recorder, self.progress = cfg, recorder, progress
        self.run_id, self.started_at = run_id, started_at
        self.stop = stop or threading.Event()
        self.registry = ModelRegistry(f"{cfg.root}/{cfg.environment.paths.registry_dir}")
        self.backend = "mock" if cfg.inference == "mock" else cfg.backend

    def run(self, specs: list[WorkerSpec]) -> RunReport:
        report = RunReport(self.run_id, self.cfg.mode.name.value, self.cfg.environment.name.value, {})
        span = self.cfg.end - self.cfg.start
        task = self.progress.add_task("bars", total=sum(span // timeframe_delta(s.timeframe) for s in specs)) \
            if self.progress else None
        t0 = time.perf_counter()
        # one prefetched stream for the whole run, so the next worker's first chunk is generated and
        # validated while the current worker finishes
        stream = prefetched(self._checked_chunks(specs), depth=2)
        try:
            for spec, items in groupby(stream, key=itemgetter(0)):
                if self.stop.is_set() or not self._run_worker(spec, (x for _, x in items), report, task):
                    report.status = "stopped"
                    break
        finally:
            stream.close()  # stops the prefetch thread when the run stops early
        if report.failures and report.status == "ok":
            report.status = "failed"
        report.elapsed_s = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        return report

    def _checked_chunks(self, specs: list[WorkerSpec]) -> Iterator[tuple[WorkerSpec, object]]:
        """Per worker: (spec, history frame), then (spec, validated chunk of the range) for each
        chunk; (spec, WorkerFailed) ends a worker whose data cannot be read."""
        cfg = self.cfg
        for spec in specs:
            try:
                need = history_bars(spec)
                chunks = validate_chunks(bar_chunks(cfg, spec.symbol, spec.timeframe, cfg.mode.chunk_bars,
                                                    history=need), spec.timeframe)
                # history rows are context only: their rejections belong to the runs that cover them
                yield spec, next(chunks).bars.tail(need)
                for checked in chunks:
                    yield spec, checked
            except ConfigError:
                raise
            except DATA_FAILURES as exc:
                yield spec, WorkerFailed(one_line(exc))

    def _run_worker(self, spec: WorkerSpec, items: Iterator, report: RunReport, task) -> bool:
        """Run one worker; False if the run was asked to stop before it finished."""
        cfg, stats = self.cfg, report.stat(spec)
        fields = worker_fields(self.run_id, spec)
        t0 = time.perf_counter()
        bars = 0
        try:
            history = _unless_failed(next(items))
            engine = WorkerEngine(spec, self.registry, backend=self.backend, now=self.started_at,
                                  mode=cfg.mode.name.value, run_id=self.run_id, seed=cfg.seed)
            report.problems += [p for p in engine.problems if p not in report.problems]
            emit_from = (cfg.start - datetime(1970, 1, 1, tzinfo=cfg.start.tzinfo)) // _US
            # source + validation run on the prefetch thread, records on the writer; features and models
            # here. (Features on the prefetch thread measured slower: polars' pool then competes with
            # inference.)
            for checked, prepared in _prepare_chunks(engine, map(_unless_failed, items), emit_from, history):
                self.recorder.record_bar_rejections(checked.rejections, self.run_id)
                stats.bar_rejections.update({k: v for k, v in checked.counts.items() if v})
                decisions = engine.decide(prepared)
                if decisions.bars:
                    self.recorder.record(spec, decisions)
                    bars += decisions.bars
                    stats.bars += decisions.bars
                    stats.signals += decisions.signals
                    stats.rejected += decisions.bars - decisions.signals
                    stats.rejections.update(decisions.reasons)
                    if task is not None:
                        self.progress.advance(task, decisions.bars)
                if self.stop.is_set():
                    return False
        except WorkerFailed as failed:
            worker_failed(report, spec, str(failed), fields)
            return True
        finally:
            stats.elapsed_s += time.perf_counter() - t0
        worker_completed(report, spec, bars, cfg, fields)
        return True


def worker_fields(run_id: str, spec: WorkerSpec) -> dict[str, str]:
    """The log fields naming a worker."""
    return {"run_id": run_id, "worker": spec.id, "client": spec.client.id, "strategy": spec.strategy.id,
            "symbol": spec.symbol}


def worker_failed(report: RunReport, spec: WorkerSpec, reason: str, fields: dict[str, str]) -> None:
    """Record and log a worker whose data could not be read (the others go on)."""
    report.failures[spec.id] = reason
    log.error("worker failed: %s", reason, extra=fields)


def worker_completed(report: RunReport, spec: WorkerSpec, bars: int, cfg: RunConfig, fields: dict[str, str]) -> None:
    """Record a worker that went through its whole range; warn when the range held no bars."""
    report.stat(spec).workers += 1
    report.completed.add(spec.id)
    if not bars:
        problem = f"{spec.id}: no bars in ({cfg.start:%Y-%m-%d %H:%M}, {cfg.end:%Y-%m-%d %H:%M}]"
        report.problems.append(problem)
        log.warning("%s", problem, extra=fields)


def _unless_failed(item):
    if isinstance(item, WorkerFailed):
        raise item
    return item


def _prepare_chunks(engine: WorkerEngine, checked_chunks: Iterator[ValidatedBars], emit_from_us: int,
                    history: pl.DataFrame) -> Iterator[tuple[ValidatedBars, Prepared]]:
    """Validated chunks with their features; each chunk carries the history its features need."""
    for checked in checked_chunks:
        bars = pl.concat([history, checked.bars]) if history.height else checked.bars
        prepared = engine.prepare(bars, emit_from_us)
        if prepared.bar_time_us.size:
            emit_from_us = int(prepared.bar_time_us[-1])  # next chunk's history rows are context only
        yield checked, prepared
        history = bars.tail(engine.history)
