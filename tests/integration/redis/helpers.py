"""Helpers of the Redis tests: bars, the fault-free reference, what the streams and the store hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from signalgen.config.loader import LIVE_START
from signalgen.config.workers import worker_specs
from signalgen.data.synthetic import iter_synthetic_chunks
from signalgen.modes.worker import MemorySink, ReplayClock, WorkerContext, bar_feed, run_worker
from signalgen.brokers.codec import decode_rows
from signalgen.brokers.redis import StreamKeys
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA
from signalgen.storage.reads import ReadQuery
from tests.integration.redis.workers import STARTED
from tests.polling import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[3]
BARS_START = datetime(2030, 1, 1, tzinfo=timezone.utc)
KEYS = StreamKeys("signalgen")
WORKER = "odum.momentum_v1.SOLUSD.5m"  # odum routes internal; SOLUSD momentum signals often
# measurements, not decisions
VOLATILE = ["latency_us", "run_id"]


def bars(symbol: str, n: int, timeframe: str = "5m", seed: int = 7) -> list[pl.DataFrame]:
    step = timedelta(minutes=5) if timeframe == "5m" else None
    return list(iter_synthetic_chunks(symbol, timeframe, BARS_START, BARS_START + n * step, seed, 500))


def reference(cfg, spec, frames) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The fault-free decisions: the same bars, one at a time, into memory."""
    sink = MemorySink()
    ctx = WorkerContext(str(Path(cfg.root) / cfg.environment.paths.registry_dir), "mock", STARTED, "live",
                        "run-live", LIVE_START, seed=cfg.seed)
    run_worker(spec, bar_feed(frames), sink, ReplayClock(), ctx)
    return sink.frames()


def streamed(client, mode: str, client_id: str, internal: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every entry of a client's signal and rejection streams (or of the internal streams the workers
    write for it), decoded, duplicates kept."""
    out = []
    for kind, schema in (("signals", SIGNAL_SCHEMA), ("rejections", REJECTION_SCHEMA)):
        key = KEYS.internal(mode, kind, client_id) if internal else getattr(KEYS, kind)(mode, client_id)
        out.append(decode_rows([f[b"data"] for _, f in client.xrange(key)], schema))
    return out[0], out[1]


def stored(store, client_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    return tuple(store.read(ReadQuery(kind=k, clients=(client_id,), modes=("live",))).sort("bar_time")
                 for k in ("signals", "rejections"))


def assert_same(got: tuple[pl.DataFrame, pl.DataFrame], want: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    """Same decisions, no duplicates, floats bit for bit."""
    for g, w, id_col in zip(got, want, ("signal_id", "rejection_id")):
        assert g[id_col].n_unique() == g.height, "duplicated decisions"
        g = g.sort("bar_time").drop(VOLATILE, strict=False)
        w = w.sort("bar_time").drop(VOLATILE, strict=False)
        assert_frame_equal(g, w, check_exact=True)
        for column in ("confidence", "strength", "weight", "magnitude"):
            if column in g.columns:
                assert np.array_equal(g[column].to_numpy().view(np.int64), w[column].to_numpy().view(np.int64))


def start_worker(root: Path, worker: str, end: datetime, result: Path, log: Path, **more) -> subprocess.Popen:
    args = {"root": str(root), "worker": worker, "end": end.isoformat(), "result": str(result), **more}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tests.integration.redis.workers", json.dumps(args)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spec_of(cfg):
    """The worker these tests run."""
    return next(s for s in worker_specs(cfg) if s.id == WORKER)


def context(cfg) -> WorkerContext:
    return WorkerContext(str(Path(cfg.root) / cfg.environment.paths.registry_dir), "mock", STARTED, "live",
                         "run-live", LIVE_START, seed=cfg.seed)


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "strategy_runner.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=timeout)


wait_for = partial(_wait_for, interval=0.02)  # Redis tests poll finer
