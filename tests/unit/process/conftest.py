"""Shared fixtures for the process tests: a private demo root, a writer in the test process, worker
processes from a forkserver (as the manager starts them), and the stored rows to compare.

Everything runs for real: DuckDB store, CSV and stream files, the control store, worker processes.
"""

from __future__ import annotations

import multiprocessing
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml

from signalgen.config.loader import Overrides, load_config
from signalgen.config.models import RunConfig
from signalgen.config.workers import WorkerSpec, worker_specs
from signalgen.process.worker import WorkerArgs, worker_process
from signalgen.transports.local import WriterServer
from signalgen.storage import open_store
from tests.polling import wait_for  # noqa: F401 - the process tests import it from here
from tests.roots import REPO, copy_config

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
STORE = Path("var/local-dev/signalgen.duckdb")
# what differs between two runs of the same decisions: who ran them, how fast, in which mode
VOLATILE = ("run_id", "latency_us", "mode")


def make_root(base: Path, clients: tuple[str, ...] = ("christian",), **process) -> Path:
    """A private root under `base`: the repo's environments and modes, the given demo clients, the
    committed model registry; `process` overrides local-dev's process settings."""
    root = base / "root"
    root.mkdir(parents=True)
    copy_config(root, clients)
    (root / "registry").symlink_to(REPO / "registry")
    env_file = root / "environments" / "local-dev.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["process"] = {**env.get("process", {}), "heartbeat_interval_s": 0.2, "stop_timeout_s": 5.0, **process}
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    return root


def config(root: Path, mode: str, end: datetime, start: datetime = START) -> RunConfig:
    return load_config("local-dev", mode, root=root, overrides=Overrides(start=start, end=end,
                                                                         data_source="synthetic"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for sockets (a Unix socket path has at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def forkserver() -> multiprocessing.context.BaseContext:
    """The manager's way to start workers: forked from a server that preloaded the heavy imports."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["signalgen.process.preload"])
    return ctx


class Fleet:
    """A writer in this process (store opened here) and worker processes started from a forkserver."""

    def __init__(self, cfg: RunConfig, address: Path, run_id: str = "test-run", **server) -> None:
        self.cfg, self.address = cfg, str(address)
        self.authkey = secrets.token_bytes(32)
        self.store = open_store(cfg)
        self.server = WriterServer(cfg, self.store, run_id=run_id, address=self.address, authkey=self.authkey,
                                   **server).start()
        self.specs = {s.id: s for s in worker_specs(cfg)}
        self.root = Path(cfg.root)
        self.procs: dict[str, multiprocessing.Process] = {}

    def args(self, spec: WorkerSpec) -> WorkerArgs:
        return WorkerArgs(spec=spec, cfg=self.cfg, writer_address=self.address, authkey=self.authkey,
                          control_path=str(self.root / self.cfg.environment.control.path),
                          log_path=str(self.root / "var/logs" / f"{spec.id}.log"),
                          heartbeat_interval_s=self.cfg.environment.process.heartbeat_interval_s)

    def start(self, worker_id: str) -> multiprocessing.Process:
        proc = forkserver().Process(target=worker_process, args=(self.args(self.specs[worker_id]),),
                                    name=worker_id, daemon=True)
        proc.start()
        self.procs[worker_id] = proc
        return proc

    def start_all(self) -> None:
        for wid in self.specs:
            self.start(wid)

    def join_all(self, timeout: float = 120) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            proc.join(max(0.1, deadline - time.monotonic()))
        codes = {wid: p.exitcode for wid, p in self.procs.items()}
        assert all(c is not None for c in codes.values()), f"workers still running: {codes}"
        return codes

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.server.close()
        self.store.close()


def stored(root: Path, table: str) -> pl.DataFrame:
    """Every row of `table` but the VOLATILE columns, ids as text, floats as their bits, by id."""
    key = {"signals": "signal_id", "rejections": "rejection_id"}.get(table)
    with duckdb.connect(str(root / STORE), read_only=True) as con:
        cols = [c for c, in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall() if c not in VOLATILE]
        select = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" if c == key else c for c in cols)
        order = key or ", ".join(cols)
        df = con.sql(f"SELECT {select} FROM {table} ORDER BY {order}").pl()
    floats = [c for c, t in df.schema.items() if t == pl.Float64]
    return df.with_columns(pl.col(floats).reinterpret(signed=True))


def parent_of_a_worker(root: str, address: str) -> None:
    """Runs in a subprocess: start one worker from a forkserver (its writer never comes, so it keeps
    trying to connect), print its pid, then wait to be killed."""
    import sys

    cfg = config(Path(root), "mock", datetime(2025, 1, 2, tzinfo=timezone.utc))
    spec = worker_specs(cfg)[0]
    args = WorkerArgs(spec=spec, cfg=cfg, writer_address=address, authkey=secrets.token_bytes(32),
                      control_path=str(Path(root) / cfg.environment.control.path),
                      log_path=str(Path(root) / "var/logs/orphan.log"), heartbeat_interval_s=0.2)
    proc = forkserver().Process(target=worker_process, args=(args,), daemon=False)
    proc.start()
    print(proc.pid, flush=True)
    sys.stdout.close()
    time.sleep(600)
