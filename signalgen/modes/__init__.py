"""Mode runners: mock, live, simulation, historical over one pipeline."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from signalgen.config.models import Mode, RunConfig
from signalgen.errors import SignalgenError
from signalgen.modes.base import RunReport
from signalgen.process.specs import worker_specs

BATCH_MODES = (Mode.HISTORICAL, Mode.MOCK)


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def run_mode(cfg: RunConfig, *, progress: bool = False) -> RunReport:
    """Run every worker of `cfg` in its mode; store signals and rejections; route signals; record the run."""
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
    try:
        recorder = Recorder(cfg, store)
        try:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
                report = BatchRunner(cfg, recorder, run_id=run_id, started_at=started_at,
                                     progress=bar if progress else None).run(specs)
            for client_id, strategy_id in report.stats:  # only a run that finished owns its range
                recorder.own(client_id, strategy_id, cfg.start, cfg.end)
        finally:
            recorder.close()
        totals = report.totals
        store.finish_run(run_id, finished_at=datetime.now(timezone.utc), status="ok", **totals,
                         elapsed_s=report.elapsed_s, peak_rss_mb=report.peak_rss_mb,
                         bars_per_s=totals["bars"] / max(report.elapsed_s, 1e-9),
                         rejections_by_reason=dict(report.rejections_by_reason))
    except BaseException:
        store.finish_run(run_id, finished_at=datetime.now(timezone.utc), status="failed")
        raise
    finally:
        store.close()
    return report
