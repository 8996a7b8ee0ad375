"""Mode runners: mock, live, simulation, historical over one pipeline."""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from signalgen.config.models import Mode, RunConfig
from signalgen.errors import RunStopped, SignalgenError
from signalgen.modes.base import RunReport
from signalgen.process.specs import worker_specs

log = logging.getLogger(__name__)

BATCH_MODES = (Mode.HISTORICAL, Mode.MOCK)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """While inside, SIGINT and SIGTERM only set `stop` (the run checks it between chunks) and are
    appended to the yielded list; a second one gets the default action (stop hard). The previous
    handlers come back on exit. Outside the main thread (where Python allows no handlers) a no-op."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame) -> None:
        received.append(signum)
        stop.set()
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _finish(store, run_id: str, status: str, report: RunReport | None) -> None:
    values: dict = {"finished_at": datetime.now(timezone.utc), "status": status}
    if report is not None:
        totals = report.totals
        values |= dict(**totals, elapsed_s=report.elapsed_s, peak_rss_mb=report.peak_rss_mb,
                       bars_per_s=totals["bars"] / max(report.elapsed_s, 1e-9),
                       rejections_by_reason=dict(report.rejections_by_reason))
    store.finish_run(run_id, **values)


def run_mode(cfg: RunConfig, *, progress: bool = False) -> RunReport:
    """Run every worker of `cfg` in its mode; store signals and rejections; route signals; record the run.

    The run's row in the store always ends with a status: "ok"; "failed" when a worker's data could
    not be read (`report.failures`; the other workers complete) or the run itself failed; "stopped"
    after SIGINT / SIGTERM, which flushes the work done and raises RunStopped.
    """
    from signalgen.modes.batch import BatchRunner
    from signalgen.modes.recorder import Recorder, open_store
    from signalgen.storage.duckdb import RunRecord

    if cfg.mode.name not in BATCH_MODES:
        raise SignalgenError(f"mode {cfg.mode.name.value!r} is not available in this release; "
                             f"use {' or '.join(m.value for m in BATCH_MODES)}")
    specs = worker_specs(cfg)
    started_at = datetime.now(timezone.utc)
    run_id = new_run_id(started_at)
    store = open_store(cfg)
    try:
        store.start_run(RunRecord(run_id=run_id, config_hash=cfg.config_hash, mode=cfg.mode.name.value,
                                  environment=cfg.environment.name.value, start=cfg.start, end=cfg.end,
                                  started_at=started_at, clients=[c.id for c in cfg.clients]))
    except BaseException:
        store.close()
        raise
    log.info("run started: %s mode, %s environment, %d workers", cfg.mode.name.value,
             cfg.environment.name.value, len(specs), extra={"run_id": run_id})
    report: RunReport | None = None
    stop = threading.Event()
    try:
        with stop_on_signals(stop) as received:
            recorder = Recorder(cfg, store)
            try:
                with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
                    report = BatchRunner(cfg, recorder, run_id=run_id, started_at=started_at,
                                         progress=bar if progress else None, stop=stop).run(specs)
                for client_id, strategy_id in report.finished(specs):  # only finished ranges are owned
                    recorder.own(client_id, strategy_id, cfg.start, cfg.end)
            finally:
                recorder.close()
        _finish(store, run_id, report.status, report)
    except BaseException as exc:
        try:
            _finish(store, run_id, "failed", report)
        except Exception as secondary:  # noqa: BLE001 - the original error is the one to report
            log.error("run could not be recorded as failed: %s", secondary, extra={"run_id": run_id})
        log.error("run failed: %s", exc, extra={"run_id": run_id})
        raise
    finally:
        store.close()
    log.info("run finished: %s, %d bars, %d signals, %d failed workers", report.status,
             report.totals["bars"], report.totals["signals"], len(report.failures), extra={"run_id": run_id})
    if report.status == "stopped":
        signum = received[0] if received else signal.SIGTERM
        raise RunStopped(signum, f"stopped by {signal.Signals(signum).name}: {report.totals['bars']:,} bars "
                                 f"done, run {run_id} recorded as stopped")
    return report
