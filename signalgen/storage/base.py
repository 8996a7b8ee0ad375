"""The signal store protocol and the records every backend keeps (DuckDB, BigQuery).

The tables are defined here as polars schemas with their upsert keys, so each backend maps them to
its own types; nothing outside a backend's file knows its query language.
"""

from __future__ import annotations

import os
import socket
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import polars as pl

from signalgen.config.models import EnvironmentConfig
from signalgen.data.schema import BAR_REJECTION_SCHEMA
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA
from signalgen.storage.reads import ReadQuery


@dataclass(frozen=True)
class RunRecord:
    """What is known about a run when it starts; `SignalStore.finish_run` adds the outcome.

    The provenance (data source, seed, data files' hashes, the resolved config with its secrets
    redacted) is what a later reader needs to score the run's decisions and reproduce them; a store
    keeps `data_files` and `config` as JSON text.
    """

    run_id: str
    config_hash: str
    mode: str
    environment: str
    start: datetime
    end: datetime
    started_at: datetime
    clients: list[str]
    data_source: str | None = None     # synthetic | files | stream
    seed: int | None = None            # seeds synthetic bars and mock inference
    data_files: dict[str, str] | None = None  # files source: path under the data folder -> sha256
    config: dict[str, Any] | None = None      # `config.loader.redacted(cfg)`
    shard: str | None = None           # "i/N": a `run --shard` of shard i of N; None: every worker


@dataclass(frozen=True)
class Written:
    """What `SignalStore.write_decisions` did: `rows` decisions made current, and `stream`, what the
    batch means to a consumer of the signal streams (STREAM_SCHEMA): each signal written with its
    revision, then a retraction for each signal it displaced."""

    rows: int
    stream: pl.DataFrame


BAR_REJECTION_STORE_SCHEMA = pl.Schema({**BAR_REJECTION_SCHEMA, "run_id": pl.String, "mode": pl.String})

# one current decision per bar and mode, whatever its id
DECISION_KEY = ("client_id", "strategy_id", "symbol", "timeframe", "bar_time", "mode")
DECISION_ID = {"signals": "signal_id", "rejections": "rejection_id"}

# table -> (schema, upsert key)
TABLES: dict[str, tuple[pl.Schema, tuple[str, ...]]] = {
    "signals": (SIGNAL_SCHEMA, DECISION_KEY),
    "rejections": (REJECTION_SCHEMA, DECISION_KEY),
    # detail is part of the key: a row whose time could not be read has a NULL bar_time, and its
    # detail (the file line) is what tells it from another such row
    "bar_rejections": (BAR_REJECTION_STORE_SCHEMA, ("symbol", "timeframe", "bar_time", "reason", "mode", "detail")),
}

_UTC = pl.Datetime("us", "UTC")
# the `runs` table: a RunRecord, then the outcome (FINISH_FIELDS)
RUN_SCHEMA = pl.Schema({
    "run_id": pl.String, "config_hash": pl.String, "mode": pl.String, "environment": pl.String,
    "start": _UTC, "end": _UTC, "started_at": _UTC, "clients": pl.List(pl.String),
    "finished_at": _UTC, "status": pl.String, "bars": pl.Int64, "signals": pl.Int64,
    "rejections": pl.Int64, "bar_rejections": pl.Int64, "elapsed_s": pl.Float64, "bars_per_s": pl.Float64,
    "peak_rss_mb": pl.Float64, "rejections_by_reason": pl.String,  # JSON object: reason -> candidates
    # provenance (RunRecord), last: a store from before it gets these columns appended, empty
    "data_source": pl.String, "seed": pl.Int64, "data_files": pl.String, "config": pl.String,
    # the run's owner, recorded by start_run (OWNER_FIELDS): who may still be writing it
    "host": pl.String, "pid": pl.Int64,
    "shard": pl.String,  # RunRecord.shard
})
RUN_JSON = ("rejections_by_reason", "data_files", "config")  # columns holding JSON text
RUN_COLUMNS = tuple(RUN_SCHEMA.names())
OWNER_FIELDS = ("host", "pid")
FINISH_FIELDS = tuple(c for c in RUN_COLUMNS if c not in {f.name for f in fields(RunRecord)} | set(OWNER_FIELDS))


def run_owner() -> dict[str, Any]:
    """The owner `start_run` records: this host's name and this process's id."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def owner_gone(host: str | None, pid: int | None, started_at: datetime | None, *, ownerless: bool) -> bool:
    """Whether the process that recorded an unfinished run is surely gone: it ran on this host and its
    pid is not alive, or is alive but younger than the run (the pid was reused, as a restarted
    container's pid 1 is). A run of another host is never judged from here. A run without an owner
    (recorded before owners were) counts as gone when `ownerless` (a store with one holder)."""
    if host is None or pid is None:
        return ownerless
    if host != socket.gethostname():
        return False
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        return True
    except psutil.AccessDenied:  # alive, someone else's
        return False
    return started_at is not None and created > started_at.timestamp() + 1.0


def prepare(table: str, df: pl.DataFrame) -> pl.DataFrame:
    """`df` conformed to `table`'s schema, one row per upsert key: the last row wins within a batch
    too, as it would across batches."""
    schema, key = TABLES[table]
    df = conform(df, schema, table)
    # (Every key holds bar_time: distinct bar times, the usual one-worker chunk, spare the costlier
    # check of the whole key.)
    if (df.height and df["bar_time"].n_unique() < df.height
            and df.select(pl.struct(key).is_duplicated().any()).item()):
        df = df.unique(subset=list(key), keep="last", maintain_order=True)
    return df


def fill_run(df: pl.DataFrame, run_id: str | None, mode: str | None) -> pl.DataFrame:
    """Bar rejections with `run_id` and `mode` columns, filled from the arguments when the frame has
    none; a mode is required, so a run of one mode never replaces another mode's bar rejections."""
    for name, value in (("run_id", run_id), ("mode", mode)):
        if name not in df.columns:
            if value is None:
                raise ValueError(f"bar rejections need a {name} column or the {name} argument")
            df = df.with_columns(pl.lit(value, pl.String).alias(name))
    return df


def conform(df: pl.DataFrame, schema: pl.Schema, what: str) -> pl.DataFrame:
    """Columns of `schema` in its order; ValueError naming what is missing or mistyped."""
    missing = [c for c in schema if c not in df.columns]
    wrong = [f"{c}: {df.schema[c]} (want {t})" for c, t in schema.items()
             if c in df.columns and df.schema[c] != t]
    if missing or wrong:
        raise ValueError(f"{what} frame does not match its schema: missing {missing}, wrong types {wrong}")
    return df.select(schema.names())


@runtime_checkable
class SignalStore(Protocol):
    """Where decisions, bar rejections and runs are kept.

    Guarantees: every write is an upsert (replaying a range leaves the same rows); `signals` and
    `rejections` hold one current decision per DECISION_KEY (mode included: a write never touches
    another mode's rows); when a write returns, its rows are durable; a write that fails for a
    storage reason raises StorageError (one line naming where) and leaves the store as it was.
    `str(store)` names where it is (a file, a dataset), for messages.
    """

    @classmethod
    def from_config(cls, environment: EnvironmentConfig, root: Path) -> Self:
        """The environment's store (relative paths under the project `root`), not yet opened: config
        only, no connection. A store is an environment's, so it needs no client or mode config."""

    def open(self) -> None:
        """Connect, creating the tables if needed. Only one process holds a store open for writing."""

    def write_decisions(self, signals: pl.DataFrame, rejections: pl.DataFrame) -> Written:
        """Make one batch (SIGNAL_SCHEMA, REJECTION_SCHEMA rows) the current decisions of their bars.

        The one place revisions are decided, from what the bar held: a signal new to its bar has
        revision 0 (or one more than it had when it was last retracted); one whose content
        (everything but VOLATILE) is unchanged keeps its revision; a changed one gets one more. A
        signal the batch displaces (its bar now rejected, or decided with another id) gets a
        retraction, one revision more. Returned in `Written.stream` for the outputs."""

    def write_bar_rejections(self, df: pl.DataFrame, run_id: str | None = None, mode: str | None = None) -> int:
        """Upsert rejected bars (BAR_REJECTION_SCHEMA; `run_id`/`mode` fill missing columns)."""

    def write_checkpoints(self, mode: str, checkpoints: dict[str, datetime]) -> None:
        """Record each worker's checkpoint in `mode` (worker id -> last bar time whose decisions the
        store and every output hold), replacing the one it had. Callers write it only after the
        decisions it covers are durable, so a restarted worker resuming after it loses nothing."""

    def checkpoints(self, mode: str) -> dict[str, datetime]:
        """Worker id -> checkpoint of every worker that has one in `mode` (modes are namespaces)."""

    def start_run(self, run: RunRecord) -> None:
        """Record a run's start and its owner (`run_owner`), replacing any earlier row of its run_id."""

    def finish_run(self, run_id: str, **values: Any) -> None:
        """Record a run's outcome: any of FINISH_FIELDS."""

    def abandon_stale_runs(self, now: datetime) -> list[str]:
        """Mark runs left without a status by a writer that is gone (`owner_gone`) as 'abandoned'
        (finished_at = `now`); their ids, sorted."""

    def read(self, query: ReadQuery) -> pl.DataFrame:
        """Rows matching `query` (reads.COLUMNS, or RUN_SCHEMA for runs). Works opened or not: an
        unopened store reads without taking the writer's place (through the writer if it runs)."""

    def serve_reads(self) -> AbstractContextManager[Any]:
        """While inside, other processes can `read()` this opened store. For a store any number of
        processes can read at once (BigQuery), a no-op context."""

    def close(self) -> None: ...
