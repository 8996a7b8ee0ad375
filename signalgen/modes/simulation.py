"""simulation mode: every worker replays its stored bars one at a time through `run_worker` — per-bar
validation, incremental features, single-row inference — on a simulated clock (`ReplayClock`: as
fast as possible, or `replay_speed` x real time).

Over the same bars it produces exactly the decisions of historical mode (same ids, reasons and
float bits): both paths share `run_worker`'s decide step, and the per-bar features equal the batch
ones bit for bit (tests/unit/modes/test_worker_equivalence.py, tests/unit/modes/test_simulation.py).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from itertools import chain

from signalgen.config.models import RunConfig
from signalgen.config.workers import WorkerSpec
from signalgen.data.validation import validate_bars
from signalgen.errors import ConfigError
from signalgen.modes.base import RunReport, peak_rss_mb
from signalgen.modes.batch import DATA_FAILURES, one_line, worker_completed, worker_failed, worker_fields
from signalgen.modes.engine import Decisions, history_bars
from signalgen.modes.sources import bar_chunks
from signalgen.modes.worker import ReplayClock, WorkerContext, bar_feed, run_worker
from signalgen.storage.writer import SignalWriter


class BatchingSink:
    """Hands the writer one batch per `size` bars of a worker: a store transaction per bar costs
    ~40 ms, which would make the writer, not the worker, set the replay speed. The checkpoint
    therefore advances a batch at a time (a replay restarts from it, and writes are idempotent)."""

    def __init__(self, writer: SignalWriter, size: int = 4096) -> None:
        self.writer, self.size = writer, size
        self._pending: list[Decisions] = []
        self._spec: WorkerSpec | None = None

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        if self._spec is not None and spec.id != self._spec.id:
            self.drain()
        self._spec = spec
        self._pending.append(decisions)
        if sum(d.bars for d in self._pending) >= self.size:
            self.drain()

    def record_bar_rejections(self, rejections, run_id: str) -> None:
        self.writer.record_bar_rejections(rejections, run_id)

    def drain(self) -> None:
        """Hand what is pending to the writer."""
        if self._pending:
            self.writer.record(self._spec, Decisions.concat(self._pending))
            self._pending = []

    @property
    def checkpoints(self):
        return self.writer.checkpoints


class SimulationRunner:
    """Replays workers one after another in this process; the signal writer is the only writer.

    A worker whose data cannot be read fails alone (`report.failures`); `stop` (set by a signal
    handler) ends the run between bars with `report.status = "stopped"`.
    """

    def __init__(self, cfg: RunConfig, writer: SignalWriter, *, run_id: str, started_at: datetime,
                 stop: threading.Event | None = None) -> None:
        self.cfg, self.stop = cfg, stop or threading.Event()
        self.sink = BatchingSink(writer)
        self.ctx = WorkerContext(registry_dir=f"{cfg.root}/{cfg.environment.paths.registry_dir}",
                                 backend="mock" if cfg.inference == "mock" else cfg.backend,
                                 started_at=started_at, mode=cfg.mode.name.value, run_id=run_id,
                                 emit_from=cfg.start, seed=cfg.seed)

    def _feed(self, spec: WorkerSpec):
        """The worker's bars one at a time: the last N valid bars before the start, then the range."""
        need = history_bars(spec)
        frames = bar_chunks(self.cfg, spec.symbol, spec.timeframe, self.cfg.mode.chunk_bars, history=need)
        history = validate_bars(next(frames), spec.timeframe).bars.tail(need)
        return bar_feed(chain([history], frames))

    def run(self, specs: list[WorkerSpec]) -> RunReport:
        cfg = self.cfg
        report = RunReport(self.ctx.run_id, self.ctx.mode, cfg.environment.name.value, {})
        t0 = time.perf_counter()
        for spec in specs:
            if self.stop.is_set():
                report.status = "stopped"
                break
            stats, started = report.stat(spec), time.perf_counter()
            fields = worker_fields(self.ctx.run_id, spec)
            try:
                outcome = run_worker(spec, self._feed(spec), self.sink, ReplayClock(cfg.mode.replay_speed or 0),
                                     self.ctx, self.stop)
            except ConfigError:
                raise
            except DATA_FAILURES as exc:
                worker_failed(report, spec, one_line(exc), fields)
                continue
            finally:
                self.sink.drain()
                stats.elapsed_s += time.perf_counter() - started
            report.problems += [p for p in outcome.problems if p not in report.problems]
            stats.bars += outcome.bars
            stats.signals += outcome.signals
            stats.rejected += outcome.bars - outcome.signals
            stats.rejections.update(outcome.reasons)
            stats.bar_rejections.update(outcome.bar_rejections)
            if outcome.stopped:
                report.status = "stopped"
                break
            worker_completed(report, spec, outcome.bars, cfg, fields)
        if report.failures and report.status == "ok":
            report.status = "failed"
        report.elapsed_s = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        return report
