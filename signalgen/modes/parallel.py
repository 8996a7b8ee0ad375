"""historical and mock on every core: the workers run in `processes` forkserver processes, each
through `modes.worker.run_worker` with the chunk feed (`modes.sources.chunk_feed`, prefetched), and
hand their decisions over local IPC (`RemoteSink`) to the one writer of the store (`WriterServer`)
in this process, which writes through the run's own `SignalWriter`.

Decisions are those of the serial `BatchRunner` bit for bit (same feed, same loop; features and
inference do not depend on which process runs them); workers are taken from a shared queue, so a
long worker does not hold up the others. A worker whose data cannot be read fails alone; a worker
process that dies fails the workers it was running.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from signalgen.config.models import RunConfig
from signalgen.config.workers import WorkerSpec
from signalgen.errors import ConfigError
from signalgen.modes.base import RunReport, peak_rss_mb
from signalgen.modes.batch import DATA_FAILURES, one_line, worker_completed, worker_failed, worker_fields
from signalgen.modes.worker import ReplayClock, WorkerContext
from signalgen.storage.base import SignalStore
from signalgen.storage.writer import SignalWriter

log = logging.getLogger(__name__)


def default_processes() -> int:
    """One worker process per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_specs(cfg: RunConfig, specs: list[WorkerSpec], ctx: WorkerContext, address: str, authkey: bytes,
              tasks, results, stop) -> None:
    """A worker process: take worker indexes from `tasks` until None, run each, report its outcome
    as (index, "ok" | "failed" | "config", outcome or reason)."""
    from signalgen.modes.sources import chunk_feed, prefetched
    from signalgen.modes.worker import run_worker
    from signalgen.transports.local import RemoteSink

    while (i := tasks.get()) is not None:
        spec = specs[i]
        try:
            sink = RemoteSink(address, authkey, spec)
            try:
                feed = prefetched(chunk_feed(cfg, spec), depth=2)
                outcome = run_worker(spec, feed, sink, ReplayClock(), ctx, stop)
                sink.close()
            finally:
                sink.abort()
            results.put((i, "ok", outcome))
        except ConfigError as exc:
            results.put((i, "config", str(exc)))
        except DATA_FAILURES as exc:
            results.put((i, "failed", one_line(exc)))


class ParallelRunner:
    """Runs a historical or mock run's workers in `processes` processes; this process writes."""

    def __init__(self, cfg: RunConfig, writer: SignalWriter, store: SignalStore, *, run_id: str,
                 started_at: datetime, processes: int | None = None, stop: threading.Event | None = None) -> None:
        self.cfg, self.writer, self.store = cfg, writer, store
        self.processes = max(1, processes or default_processes())
        self.stop = stop or threading.Event()
        self.ctx = WorkerContext(registry_dir=f"{cfg.root}/{cfg.environment.paths.registry_dir}",
                                 backend="mock" if cfg.inference == "mock" else cfg.backend,
                                 started_at=started_at, mode=cfg.mode.name.value, run_id=run_id,
                                 emit_from=cfg.start, seed=cfg.seed)

    def run(self, specs: list[WorkerSpec]) -> RunReport:
        from signalgen.transports.local import WriterServer

        cfg, ctx = self.cfg, self.ctx
        report = RunReport(ctx.run_id, ctx.mode, cfg.environment.name, {})
        t0 = time.perf_counter()
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(["signalgen.process.preload"])
        folder = Path(tempfile.mkdtemp(prefix="sg-run-", dir="/tmp"))  # short: a socket path has <= 107 bytes
        authkey = os.urandom(32)
        server = WriterServer(cfg, self.store, run_id=ctx.run_id, address=str(folder / "writer.sock"),
                              authkey=authkey, writer=self.writer)
        tasks, results, stop = mp.Queue(), mp.Queue(), mp.Event()
        for i in range(len(specs)):
            tasks.put(i)
        n = min(self.processes, len(specs))
        for _ in range(n):
            tasks.put(None)
        procs = [mp.Process(target=run_specs, args=(cfg, specs, ctx, server.address, authkey, tasks, results, stop),
                            name=f"run-worker-{k}", daemon=True) for k in range(n)]
        pending = set(range(len(specs)))
        try:
            server.start()
            for p in procs:
                p.start()
            while pending:
                if self.stop.is_set():
                    stop.set()
                try:
                    i, kind, value = results.get(timeout=0.5)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        break  # every process ended without reporting the rest: they died
                    continue
                pending.discard(i)
                self._account(report, specs[i], kind, value)
            for i in sorted(pending):
                worker_failed(report, specs[i], "its worker process died", worker_fields(ctx.run_id, specs[i]))
            for p in procs:
                p.join(timeout=10)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            server.close()
            shutil.rmtree(folder, ignore_errors=True)
        self.writer_stats = dict(server.stats)
        log.info("writer: %d group commits of %d bars took %.1f s (%d processes)", server.stats["groups"],
                 server.stats["bars"], server.stats["commit_s"], n, extra={"run_id": ctx.run_id})
        if self.stop.is_set() and report.status == "ok":
            report.status = "stopped"
        if report.failures and report.status == "ok":
            report.status = "failed"
        report.elapsed_s = time.perf_counter() - t0
        report.peak_rss_mb = peak_rss_mb()
        return report

    def _account(self, report: RunReport, spec: WorkerSpec, kind: str, value) -> None:
        fields = worker_fields(self.ctx.run_id, spec)
        if kind == "config":
            raise ConfigError(value)
        if kind == "failed":
            worker_failed(report, spec, value, fields)
            return
        outcome = value
        report.add(spec, outcome)
        if outcome.stopped:
            report.status = "stopped"
            return
        worker_completed(report, spec, outcome.bars, self.cfg, fields)
