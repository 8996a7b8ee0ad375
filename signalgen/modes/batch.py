"""historical and mock modes: bars in chunks, each bar's end time is its clock, vectorized pipeline.

Memory stays bounded for any date range: a worker holds one chunk plus the few bars of history
the features and lookback window need, never the whole range.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import polars as pl
from rich.progress import Progress

from signalgen.config.models import RunConfig, timeframe_delta
from signalgen.data.validation import validate_chunks
from signalgen.modes.base import RunReport, peak_rss_mb
from signalgen.modes.engine import WorkerEngine
from signalgen.modes.recorder import Recorder
from signalgen.modes.sources import bar_chunks
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
        for spec in specs:
            self._run_worker(spec, report, task)
        report.elapsed_s = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        return report

    def _run_worker(self, spec: WorkerSpec, report: RunReport, task) -> None:
        cfg, stats = self.cfg, report.stat(spec)
        t0 = time.perf_counter()
        engine = WorkerEngine(spec, self.registry, backend=self.backend, now=self.started_at,
                              mode=cfg.mode.name.value, run_id=self.run_id, seed=cfg.seed)
        report.problems += [p for p in engine.problems if p not in report.problems]
        tf = timeframe_delta(spec.timeframe)
        emit_from = (cfg.start - datetime(1970, 1, 1, tzinfo=cfg.start.tzinfo)) // _US
        chunks = bar_chunks(cfg, spec.symbol, spec.timeframe, cfg.start - engine.history * tf, cfg.end,
                            cfg.mode.chunk_bars)
        history: pl.DataFrame | None = None
        for checked in validate_chunks(chunks, spec.timeframe):
            self.recorder.record_bar_rejections(checked.rejections, self.run_id)
            stats.bar_rejections.update({k: v for k, v in checked.counts.items() if v})
            bars = checked.bars if history is None else pl.concat([history, checked.bars])
            c0 = time.perf_counter_ns()
            batch = engine.process(bars, emit_from)
            emit_from = batch.last_bar_us  # history rows of the next chunk are context, not candidates
            if batch.bars:
                # historical latency: this chunk's compute time per bar (bars are "available" at their end)
                per_bar_us = (time.perf_counter_ns() - c0) // 1000 // batch.bars
                signals = batch.signals.with_columns(pl.lit(per_bar_us, pl.Int64).alias("latency_us"))
                self.recorder.record(spec, signals, batch.rejections)
                stats.bars += batch.bars
                stats.signals += signals.height
                stats.rejected += batch.rejections.height
                stats.rejections.update(batch.reasons)
                if task is not None:
                    self.progress.advance(task, batch.bars)
            history = bars.tail(engine.history)
        stats.workers += 1
        stats.elapsed_s += time.perf_counter() - t0
