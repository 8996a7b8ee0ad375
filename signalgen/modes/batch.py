"""The serial mode runners: each worker in turn through `modes.worker.run_worker` in this process.

historical and mock feed each worker its bars in validated chunks (vectorized features and
inference); memory stays bounded for any date range: a worker holds one chunk plus the few bars
of history the features and lookback window need, never the whole range. Simulation
(`modes.simulation`) is the same driver with a bar-at-a-time feed and a paced clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from itertools import groupby
from operator import itemgetter

import polars as pl
from rich.progress import Progress

from signalgen.config.models import RunConfig, timeframe_delta
from signalgen.config.workers import WorkerSpec
from signalgen.errors import ConfigError, SignalgenError
from signalgen.modes.base import RunReport, peak_rss_mb
from signalgen.signals.records import Decisions
from signalgen.modes.sources import chunk_feed, prefetched
from signalgen.modes.worker import Clock, ReplayClock, Sink, WorkerContext, run_worker
from signalgen.storage.writer import SignalWriter

log = logging.getLogger(__name__)

# what a worker's unreadable data raises (ConfigError is not one: it stops the run, exit 2)
DATA_FAILURES = (SignalgenError, OSError, pl.exceptions.PolarsError)
MAX_REASON = 300  # characters of a failure reason kept in the report and the log


class WorkerFailed(SignalgenError):
    """A worker's data could not be read; carries the one-line reason."""


def one_line(exc: BaseException, limit: int = MAX_REASON) -> str:
    """The error as one bounded line (a garbage file's bytes never flood the summary)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, SignalgenError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ProgressSink:
    """A sink that advances a progress bar by the bars it is handed, and passes everything on."""

    def __init__(self, sink: Sink, progress: Progress, task) -> None:
        self.sink, self.progress, self.task = sink, progress, task

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        self.sink.record(spec, decisions)
        self.progress.advance(self.task, decisions.bars)

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        self.sink.record_bar_rejections(rejections, run_id)

    @property
    def checkpoints(self) -> dict[str, datetime]:
        return self.sink.checkpoints


class BatchRunner:
    """Runs workers one after another in this process through `run_worker`; the signal writer is the
    only writer. historical and mock: validated chunks, prefetched (read and validated on a thread
    while the models run), as fast as possible.

    Signals and rejections reach the store chunk by chunk; file outputs are flushed once, when the
    run closes its writer, so each QuantConnect day file is rewritten once per run rather than once
    per symbol (a failed run is repaired by running it again: every write is idempotent).

    A worker whose data cannot be read fails alone (`report.failures`); the others go on. When
    `stop` is set (by a signal handler) the run stops between chunks (bars, in simulation) with
    `report.status = "stopped"`.
    """

    def __init__(self, cfg: RunConfig, writer: SignalWriter, *, run_id: str, started_at: datetime,
                 progress: Progress | None = None, stop: threading.Event | None = None) -> None:
        self.cfg, self.writer, self.progress = cfg, writer, progress
        self.stop = stop or threading.Event()
        self.ctx = WorkerContext(registry_dir=f"{cfg.root}/{cfg.environment.paths.registry_dir}",
                                 backend="mock" if cfg.inference == "mock" else cfg.backend,
                                 started_at=started_at, mode=cfg.mode.name.value, run_id=run_id,
                                 emit_from=cfg.start, seed=cfg.seed)
        self.sink: Sink = writer

    def clock(self) -> Clock:
        """A worker's clock: the end of its newest bar, as fast as possible."""
        return ReplayClock()

    def feeds(self, specs: list[WorkerSpec]) -> Iterator[tuple[WorkerSpec, Iterator]]:
        """(spec, feed) per worker. One prefetched stream for the whole run, so the next worker's first
        chunk is read and validated while the current worker finishes; a worker whose data cannot be
        read gets a feed that raises WorkerFailed."""

        def tagged() -> Iterator[tuple[WorkerSpec, object]]:
            for spec in specs:
                try:
                    for checked in chunk_feed(self.cfg, spec):
                        yield spec, checked
                except ConfigError:
                    raise
                except DATA_FAILURES as exc:
                    yield spec, WorkerFailed(one_line(exc))

        stream = prefetched(tagged(), depth=2)
        try:
            for spec, items in groupby(stream, key=itemgetter(0)):
                yield spec, map(_unless_failed, (x for _, x in items))
        finally:
            stream.close()  # stops the prefetch thread when the run stops early

    def worker_done(self, spec: WorkerSpec) -> None:
        """After each worker, whatever happened to it (simulation drains its batching here)."""

    def run(self, specs: list[WorkerSpec]) -> RunReport:
        cfg, ctx = self.cfg, self.ctx
        report = RunReport(ctx.run_id, ctx.mode, cfg.environment.name, {})
        sink = self.sink
        if self.progress is not None:
            span = cfg.end - cfg.start
            task = self.progress.add_task("bars", total=sum(span // timeframe_delta(s.timeframe) for s in specs))
            sink = ProgressSink(sink, self.progress, task)
        t0 = time.perf_counter()
        feeds = self.feeds(specs)
        try:
            for spec, feed in feeds:
                if self.stop.is_set():
                    report.status = "stopped"
                    break
                stats, started = report.stat(spec), time.perf_counter()
                fields = worker_fields(ctx.run_id, spec)
                try:
                    outcome = run_worker(spec, feed, sink, self.clock(), ctx, self.stop)
                except ConfigError:
                    raise
                except DATA_FAILURES as exc:
                    worker_failed(report, spec, exc.args[0] if isinstance(exc, WorkerFailed) else one_line(exc),
                                  fields)
                    continue
                finally:
                    self.worker_done(spec)
                    stats.elapsed_s += time.perf_counter() - started
                report.add(spec, outcome)
                if outcome.stopped:
                    report.status = "stopped"
                    break
                worker_completed(report, spec, outcome.bars, cfg, fields)
        finally:
            feeds.close()
        if report.failures and report.status == "ok":
            report.status = "failed"
        report.elapsed_s = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        return report


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
