"""Mode runners: mock, live, simulation, historical over one pipeline."""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from datetime import datetime, timezone

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from signalgen.config.models import Mode, RunConfig
from signalgen.errors import ConfigError, RunStopped
from signalgen.modes.base import RunReport
from signalgen.config.workers import WorkerSpec, worker_specs

log = logging.getLogger(__name__)

# what `run` executes: historical and mock in chunks (vectorized), simulation one bar at a time
RUN_MODES = (Mode.HISTORICAL, Mode.MOCK, Mode.SIMULATION)
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


def run_record(cfg: RunConfig, specs: list[WorkerSpec], run_id: str, started_at: datetime,
               shard: str | None = None):
    """The `RunRecord` of a run of `specs` under `cfg`: its range and clients, its shard ("i/N", or None
    for every worker), and what produced its bars (data source, seed, the data files' hashes) with the
    resolved config, secrets redacted, so its decisions can be scored and reproduced later."""
    from signalgen.config.loader import redacted
    from signalgen.modes.sources import data_files
    from signalgen.storage.base import RunRecord

    return RunRecord(run_id=run_id, config_hash=cfg.config_hash, mode=cfg.mode.name.value,
                     environment=cfg.environment.name, start=cfg.start, end=cfg.end, started_at=started_at,
                     clients=[c.id for c in cfg.clients], data_source=cfg.data_source, seed=cfg.seed,
                     data_files=data_files(cfg, specs), config=redacted(cfg), shard=shard)


def _finish(store, run_id: str, status: str, report: RunReport | None) -> None:
    values: dict = {"finished_at": datetime.now(timezone.utc), "status": status}
    if report is not None:
        totals = report.totals
        values |= dict(**totals, elapsed_s=report.elapsed_s, peak_rss_mb=report.peak_rss_mb,
                       bars_per_s=totals["bars"] / max(report.elapsed_s, 1e-9),
                       rejections_by_reason=dict(report.rejections_by_reason))
    store.finish_run(run_id, **values)


def run_mode(cfg: RunConfig, *, progress: bool = False, processes: int = 1,
             shard: tuple[str, list[WorkerSpec]] | None = None) -> RunReport:
    """Run every worker of `cfg` in its mode; store signals and rejections; route signals; record the run.

    `processes` > 1 runs historical and mock workers in that many worker processes
    (`modes.parallel.ParallelRunner`; this process stays the one writer).

    `shard` ("i/N", its workers) runs only the workers shard i of N owns (`process.shard.take_shard`
    of `worker_specs(cfg)`, the share `start --shard` takes: `run --shard`), so N runs on as many
    hosts together decide what one run decides; the run record names the shard. An output
    replaces a strategy's range by this run's signals (`SignalWriter.own`) only when the shard holds
    every worker of that strategy: a day file of a strategy split across shards also holds the others'.

    The run's row in the store always ends with a status: "ok"; "failed" when a worker's data could
    not be read (`report.failures`; the other workers complete) or the run itself failed; "stopped"
    after SIGINT / SIGTERM, which flushes the work done and raises RunStopped.
    """
    from signalgen.modes.preflight import run_refusals
    from signalgen.modes.batch import BatchRunner
    from signalgen.modes.simulation import SimulationRunner
    from signalgen.storage import open_store
    from signalgen.storage.writer import SignalWriter

    refused = run_refusals(cfg)  # the same checks `config validate` reports
    if refused:
        raise ConfigError("\n".join(refused))
    every = worker_specs(cfg)
    label, specs = shard or (None, every)
    started_at = datetime.now(timezone.utc)
    run_id = new_run_id(started_at)
    report: RunReport | None = None
    stop = threading.Event()
    with ExitStack() as held:  # closed in reverse: the read server stops before the store closes
        store = held.enter_context(closing(open_store(cfg)))
        held.enter_context(store.serve_reads())  # `signals` / `runs` read through this process meanwhile
        store.start_run(run_record(cfg, specs, run_id, started_at, label))
        log.info("run started: %s mode, %s environment, %d workers", cfg.mode.name.value,
                 cfg.environment.name, len(specs),
                 extra={"run_id": run_id, "mode": cfg.mode.name.value, "environment": cfg.environment.name,
                        "client": ",".join(c.id for c in cfg.clients),
                        **({"shard": label} if label else {})})
        try:
            with stop_on_signals(stop) as received:
                writer = SignalWriter.from_config(cfg, store)
                try:
                    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
                        if cfg.mode.name is Mode.SIMULATION:
                            runner = SimulationRunner(cfg, writer, run_id=run_id, started_at=started_at, stop=stop)
                        elif processes > 1:
                            from signalgen.modes.parallel import ParallelRunner

                            runner = ParallelRunner(cfg, writer, store, run_id=run_id, started_at=started_at,
                                                    processes=processes, stop=stop)
                        else:
                            runner = BatchRunner(cfg, writer, run_id=run_id, started_at=started_at,
                                                 progress=bar if progress else None, stop=stop)
                        report = runner.run(specs)
                        report.shard = label
                    by_strategy = {(s.client.id, s.strategy.id): s for s in specs}
                    # only finished ranges are owned; of every worker: another shard's count as unfinished
                    for pair in report.finished(every):
                        writer.own(by_strategy[pair], cfg.start, cfg.end)
                finally:
                    writer.close()
            _finish(store, run_id, report.status, report)
        except BaseException as exc:
            try:
                _finish(store, run_id, "failed", report)
            except Exception as secondary:  # noqa: BLE001 - the original error is the one to report
                log.error("run could not be recorded as failed: %s", secondary, extra={"run_id": run_id})
            log.error("run failed: %s", exc, extra={"run_id": run_id})
            raise
    log.info("run finished: %s, %d bars, %d signals, %d failed workers", report.status,
             report.totals["bars"], report.totals["signals"], len(report.failures),
             extra={"run_id": run_id, "status": report.status, **report.totals})
    if report.status == "stopped":
        signum = received[0] if received else signal.SIGTERM
        raise RunStopped(signum, f"stopped by {signal.Signals(signum).name}: {report.totals['bars']:,} bars "
                                 f"done, run {run_id} recorded as stopped")
    return report
