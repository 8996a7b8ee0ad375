"""historical and mock modes: bars in chunks, each bar's end time is its clock, vectorized pipeline.

Memory stays bounded for any date range: a worker holds one chunk plus the few bars of history
the features and lookback window need, never the whole range.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import groupby
from operator import itemgetter

import polars as pl
from rich.progress import Progress

from signalgen.config.models import RunConfig, timeframe_delta
from signalgen.data.validation import ValidatedBars, validate_chunks
from signalgen.modes.base import RunReport, peak_rss_mb
from signalgen.modes.engine import Prepared, WorkerEngine, history_bars
from signalgen.modes.recorder import Recorder
from signalgen.modes.sources import bar_chunks, prefetched
from signalgen.models.registry import ModelRegistry
from signalgen.process.specs import WorkerSpec

_US = timedelta(microseconds=1)


class BatchRunner:
    """Runs workers one after another in this process; the recorder is the only writer.

    Signals and rejections reach the store chunk by chunk; file outputs are flushed once, when the
    run closes its recorder, so each QuantConnect day file is rewritten once per run rather than
    once per symbol (a failed run is repaired by running it again: every write is idempotent).
    """

    def __init__(self, cfg: RunConfig, recorder: Recorder, *, run_id: str, started_at: datetime,
                 progress: Progress | None = None) -> None:
        self.cfg, self.recorder, self.progress = cfg, recorder, progress
        self.run_id, self.started_at = run_id, started_at
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
        for spec, items in groupby(prefetched(self._checked_chunks(specs), depth=2), key=itemgetter(0)):
            self._run_worker(spec, (checked for _, checked in items if checked is not None), report, task)
        report.elapsed_s = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        return report

    def _checked_chunks(self, specs: list[WorkerSpec]) -> Iterator[tuple[WorkerSpec, ValidatedBars | None]]:
        """(spec, None) when a worker starts, then (spec, validated chunk) for each of its chunks."""
        cfg = self.cfg
        for spec in specs:
            yield spec, None
            start = cfg.start - history_bars(spec) * timeframe_delta(spec.timeframe)
            chunks = bar_chunks(cfg, spec.symbol, spec.timeframe, start, cfg.end, cfg.mode.chunk_bars)
            for checked in validate_chunks(chunks, spec.timeframe):
                yield spec, checked

    def _run_worker(self, spec: WorkerSpec, checked_chunks: Iterator[ValidatedBars], report: RunReport,
                    task) -> None:
        cfg, stats = self.cfg, report.stat(spec)
        t0 = time.perf_counter()
        engine = WorkerEngine(spec, self.registry, backend=self.backend, now=self.started_at,
                              mode=cfg.mode.name.value, run_id=self.run_id, seed=cfg.seed)
        report.problems += [p for p in engine.problems if p not in report.problems]
        emit_from = (cfg.start - datetime(1970, 1, 1, tzinfo=cfg.start.tzinfo)) // _US
        # source + validation run on the prefetch thread, records on the writer; features and models here.
        # (Features on the prefetch thread measured slower: polars' pool then competes with inference.)
        for checked, prepared in _prepare_chunks(engine, checked_chunks, emit_from):
            self.recorder.record_bar_rejections(checked.rejections, self.run_id)
            stats.bar_rejections.update({k: v for k, v in checked.counts.items() if v})
            decisions = engine.decide(prepared)
            if decisions.bars:
                self.recorder.record(spec, decisions)
                stats.bars += decisions.bars
                stats.signals += decisions.signals
                stats.rejected += decisions.bars - decisions.signals
                stats.rejections.update(decisions.reasons)
                if task is not None:
                    self.progress.advance(task, decisions.bars)
        stats.workers += 1
        stats.elapsed_s += time.perf_counter() - t0


def _prepare_chunks(engine: WorkerEngine, checked_chunks: Iterator[ValidatedBars],
                    emit_from_us: int) -> Iterator[tuple[ValidatedBars, Prepared]]:
    """Validated chunks with their features; each chunk carries the history its features need."""
    history: pl.DataFrame | None = None
    for checked in checked_chunks:
        bars = checked.bars if history is None else pl.concat([history, checked.bars])
        prepared = engine.prepare(bars, emit_from_us)
        if prepared.bar_time_us.size:
            emit_from_us = int(prepared.bar_time_us[-1])  # next chunk's history rows are context only
        yield checked, prepared
        history = bars.tail(engine.history)
