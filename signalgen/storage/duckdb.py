"""The local signal store: one DuckDB file, one writing process (the one holding `storage.writer.SignalWriter`).

Modes are namespaces: every record carries its `mode`, and a write replaces only rows of its own
mode. `signals` and `rejections` hold one *current* decision per natural key (client, strategy,
symbol, timeframe, bar_time, mode): a write replaces whatever decision that bar had in that mode,
also one with another id (an older model version); a replaced decision whose id differs is kept,
never as current, in `superseded_signals` / `superseded_rejections` with the id and run that
replaced it. Bar rejections are keyed by (symbol, timeframe, bar_time, reason, mode).

Every write is an upsert, so replaying a range (a restarted worker, a re-run) leaves the same
rows. Upserts are `DELETE ... USING batch` + `INSERT` in one transaction, not a PRIMARY KEY with
`INSERT OR REPLACE`: on 5M rejection rows in 250k batches (2 cores) the first wrote 350k rows/s
fresh and 315k rows/s replayed, the second 67k and 16k rows/s, with a file three times larger.
Keying by bar instead of by id (plus a probe for superseded rows) measured on 1M rejection rows in
250k batches of four symbols (`bench/store_write.py`, best of 3 runs alternating old and new code
on 2 cores shared with other jobs): by id 232k rows/s fresh, 242k replayed; by bar 201k fresh,
205k replayed. A bar newer than anything its worker (client, strategy, symbol, timeframe, mode) has
stored cannot replace a row, so such bars skip the probe and the delete: the store reads each
worker's newest bar once and keeps it up to date with every write it commits (one writer per file).
A batch run's fresh range and a streaming fleet's next bars take that path (`bench/store_write.py`:
a group of 500 workers x 1 bar 13.4 -> 9.5 ms of CPU; 1M rows in 250k batches 2.21 -> 2.01 s).

Writes that fail for a storage reason (read-only folder, disk full) raise StorageError, one line
naming the file and the OS reason; the transaction is rolled back, so the file keeps what it had.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager, suppress
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import duckdb
import polars as pl
import pyarrow as pa

from signalgen.config.models import EnvironmentConfig
from signalgen.errors import StorageError, TransientError
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA, STREAM_SCHEMA, VOLATILE, stream_rows
from signalgen.errors import storage_error
from signalgen.storage.base import (DECISION_ID, DECISION_KEY, FINISH_FIELDS, RUN_SCHEMA, TABLES, RunRecord,
                                    Written, fill_run, owner_gone, prepare, run_owner)
from signalgen.storage.reads import COLUMNS, ID_COLUMN, ReadQuery, select_sql


# superseded_<table>: the table's columns plus who replaced the row
AUDIT_COLUMNS = {"superseded_by": "UUID", "superseded_by_run": "VARCHAR"}

# DuckDB errors that mean the file could not be written (the text ends in the OS reason)
_IO_ERRORS = (OSError, duckdb.IOException, duckdb.FatalException, duckdb.TransactionException,
              duckdb.PermissionException)

# Ids are UUID text (signalgen.signals.ids): stored as 16-byte UUIDs, which insert ~2x faster and
# checkpoint ~8x faster than 36-character strings; they read back as the same canonical text.
ID_COLUMNS = frozenset({"signal_id", "rejection_id"})

WORKER_KEY = tuple(k for k in DECISION_KEY if k != "bar_time")  # one worker's decisions in one mode
# what a signal says beyond its id and bar: a change in any of these is a new revision
_CONTENT = tuple(c for c in SIGNAL_SCHEMA if c not in (*DECISION_KEY, *VOLATILE, "signal_id"))

_SCALAR_SQL = {pl.String: "VARCHAR", pl.Int8: "TINYINT", pl.Int32: "INTEGER", pl.Int64: "BIGINT",
               pl.Float64: "DOUBLE", pl.Boolean: "BOOLEAN"}


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_type(dtype: pl.DataType | type[pl.DataType]) -> str:
    """DuckDB column type for a polars dtype used in the record schemas."""
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ" if dtype.time_zone else "TIMESTAMP"
    if isinstance(dtype, pl.List):
        return f"{sql_type(dtype.inner)}[]"
    if isinstance(dtype, pl.Struct):
        return "STRUCT(" + ", ".join(f"{_q(f.name)} {sql_type(f.dtype)}" for f in dtype.fields) + ")"
    for base, name in _SCALAR_SQL.items():
        if dtype == base:
            return name
    raise TypeError(f"no DuckDB type for polars {dtype}")


def _run_columns() -> dict[str, str]:
    return {c: sql_type(t) for c, t in RUN_SCHEMA.items()}


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    """Column names of `table` ({} when it does not exist)."""
    rows = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])
    return {r[0] for r in rows.fetchall()}


class DuckDBStore:
    """Signals, rejections, bar rejections and runs in one DuckDB file.

    DuckDB lets one process write a file: open it where the SignalWriter runs only. A second writer gets
    TransientError (the holder may be a run that is about to finish) after waiting `lock_wait_s`
    for a reader that holds the file for one query (`signals`, `runs`) to let go.
    """

    def __init__(self, path: Path | str, lock_wait_s: float = 3.0) -> None:
        self.path = Path(path)
        self.lock_wait_s = lock_wait_s
        self._con: duckdb.DuckDBPyConnection | None = None
        self._reader: duckdb.DuckDBPyConnection | None = None
        self._read_lock = threading.Lock()
        # worker key -> newest bar_time of its decisions in the store (None: none), once looked up
        self._newest: dict[tuple, datetime | None] = {}

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def from_config(cls, environment: EnvironmentConfig, root: Path) -> Self:
        """The store at the environment's `storage.path` (relative to the project root)."""
        return cls(Path(root) / environment.storage.path)

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Open (creating the file, its folder and the tables if needed)."""
        if self._con is not None:
            return
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise storage_error(self.path, exc) from exc
                # a `signals` / `runs` reader holds the file for one short query: wait it out
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                pid = re.search(r"PID (\d+)", str(exc))
                holder = f"pid {pid.group(1)}" if pid else "pid unknown"
                raise TransientError(f"{self.path} is locked by another process ({holder}): DuckDB takes one "
                                     "writer at a time; wait for it, or split a backfill with `run --workers N` "
                                     "(one writer), not concurrent runs") from exc
            except OSError as exc:
                raise storage_error(self.path.parent, exc) from exc
        try:
            self._setup(con)
        except BaseException as exc:
            con.close()
            if isinstance(exc, _IO_ERRORS):
                raise storage_error(self.path, exc) from exc
            raise
        self._con = con
        # reads (the read server's thread, analytics) get their own cursor, made here on the
        # opening thread: a DuckDB connection must not be shared by two threads at once
        self._reader = con.cursor()
        self._reader.execute("SET TimeZone = 'UTC'")

    @staticmethod
    def _setup(con: duckdb.DuckDBPyConnection) -> None:
        # Results come back as UTC datetimes whatever the machine's zone.
        con.execute("SET TimeZone = 'UTC'")
        # The signal writer writes on one background thread while workers compute; more DuckDB threads
        # would only compete with model inference for the same cores.
        con.execute("SET threads = 1")
        # DuckDB's default cache is 80% of RAM; a fixed cap keeps a long run's memory bounded (it spills)
        con.execute("SET memory_limit = '512MB'")
        had_bar_rejections = _columns(con, "bar_rejections")
        for table, (schema, _) in TABLES.items():
            cols = ", ".join(f"{_q(c)} {'UUID' if c in ID_COLUMNS else sql_type(t)}" for c, t in schema.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
            if table in DECISION_ID:
                audit = ", ".join(f"{c} {t}" for c, t in AUDIT_COLUMNS.items())
                con.execute(f"CREATE TABLE IF NOT EXISTS superseded_{table} ({cols}, {audit})")
        had_runs = _columns(con, "runs")
        cols = ", ".join(f"{_q(c)} {t}" for c, t in _run_columns().items())
        con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
        for column, sql in _run_columns().items():
            if had_runs and column not in had_runs:  # a store from before the column: its runs lack it
                con.execute(f"ALTER TABLE runs ADD COLUMN {_q(column)} {sql}")
        con.execute("CREATE TABLE IF NOT EXISTS worker_checkpoints (worker_id VARCHAR NOT NULL, mode VARCHAR NOT NULL, "
                    "checkpoint TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (worker_id, mode))")
        # the stream revision of every signal id that ever changed (absent: 0); a store from before
        # revisions gets it empty, which is what its streams hold (every entry a first one)
        con.execute("CREATE TABLE IF NOT EXISTS signal_revisions (signal_id UUID NOT NULL, mode VARCHAR NOT NULL, "
                    "revision INTEGER NOT NULL, PRIMARY KEY (signal_id, mode))")
        if had_bar_rejections and "mode" not in had_bar_rejections:
            # a store from before modes were kept apart: each bar rejection takes its run's mode
            con.execute("ALTER TABLE bar_rejections ADD COLUMN mode VARCHAR")
            con.execute("UPDATE bar_rejections b SET mode = r.mode FROM runs r WHERE b.run_id = r.run_id")

    def close(self) -> None:
        if self._con is not None:
            with self._read_lock:
                self._reader.close()
            self._con.close()
            self._con = self._reader = None
            self._newest.clear()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise RuntimeError(f"{self.path}: call open() first")
        return self._con

    # ------------------------------------------------------------ records

    def write_signals(self, df: pl.DataFrame) -> int:
        """Upsert signals (SIGNAL_SCHEMA) as the current decisions of their bars (see write_decisions)."""
        return self.write_decisions(df, REJECTION_SCHEMA.to_frame()).rows

    def write_rejections(self, df: pl.DataFrame) -> int:
        """Upsert rejected candidates (REJECTION_SCHEMA) as the current decisions of their bars."""
        return self.write_decisions(SIGNAL_SCHEMA.to_frame(), df).rows

    def write_bar_rejections(self, df: pl.DataFrame, run_id: str | None = None, mode: str | None = None) -> int:
        """Upsert rejected bars (BAR_REJECTION_SCHEMA) by (symbol, timeframe, bar_time, reason, mode, detail).

        `run_id` and `mode` fill those columns when the frame has none; a mode is required, so a
        run of one mode never replaces another mode's bar rejections.
        """
        return self._upsert("bar_rejections", fill_run(df, run_id, mode))

    def write_decisions(self, signals: pl.DataFrame, rejections: pl.DataFrame) -> Written:
        """Make one batch of decisions the current ones of their bars, in one transaction.

        A bar (DECISION_KEY, mode included) has one current decision: a signal or a rejection,
        never both and never two. Whatever that bar had in this mode is replaced — the same id
        rewritten, or a decision of another id (another model version) moved to
        `superseded_<table>` for audit. Rows of other modes are never touched. Revisions and
        retractions as `SignalStore.write_decisions` says (`_revise`).
        """
        batches = {t: prepare(t, df) for t, df in (("signals", signals), ("rejections", rejections))}
        keys = pl.concat([df.select(*DECISION_KEY, pl.col(DECISION_ID[t]).alias("id"), "run_id",
                                    pl.lit(t == "signals").alias("is_signal")) for t, df in batches.items()])
        stream = stream_rows(batches["signals"])  # a fresh range: every signal new
        if keys.is_empty():
            return Written(0, stream)
        spans = keys.group_by(WORKER_KEY).agg(first=pl.col("bar_time").min(), last=pl.col("bar_time").max())
        workers = spans.select(WORKER_KEY)
        with self._registered(_signals=batches["signals"], _rejections=batches["rejections"]), self._transaction():
            newest = self._newest_stored(workers)
            # Only bars at or before their worker's newest stored bar can replace anything: a fresh
            # range (a batch run's next chunk, a streaming worker's next bar) skips probe and delete.
            stored = [newest[w] is not None and first <= newest[w] for w, first in zip(workers.rows(), spans["first"])]
            if any(stored):
                replace = keys if all(stored) else keys.join(workers.filter(pl.Series(stored)), on=list(WORKER_KEY))
                with self._registered(_keys=replace):
                    stream = self._revise(replace, batches["signals"])
                    self._replace_stored(replace)
            for table in batches:
                self._insert(table, f"_{table}")
        for w, last in zip(workers.rows(), spans["last"]):  # committed: the store's newest bars now
            if newest[w] is None or last > newest[w]:
                newest[w] = last
        return Written(keys.height, stream)

    def _newest_stored(self, workers: pl.DataFrame) -> dict[tuple, datetime | None]:
        """Worker key (WORKER_KEY) -> the newest bar_time the decision tables hold for it (None:
        none), covering `workers`. Each key is read from the store once, then kept by write_decisions:
        this store is the file's one writer."""
        unknown = [w for w in workers.rows() if w not in self._newest]
        if unknown:
            found: dict[tuple, datetime | None] = dict.fromkeys(unknown)
            join = " AND ".join(f"t.{_q(k)} = u.{_q(k)}" for k in WORKER_KEY)
            cols = ", ".join(f"t.{_q(k)}" for k in WORKER_KEY)
            union = " UNION ALL ".join(f"SELECT {cols}, max(t.bar_time) FROM {table} t JOIN _unknown u ON {join} "
                                       f"GROUP BY ALL" for table in DECISION_ID)
            with self._registered(_unknown=pl.DataFrame(unknown, schema=workers.schema, orient="row")):
                for *w, last in self.con.execute(union).fetchall():
                    old = found[tuple(w)]
                    found[tuple(w)] = last if old is None or last > old else old
            self._newest.update(found)  # only once read: a failed read leaves these keys unknown
        return self._newest

    def _replace_stored(self, keys: pl.DataFrame) -> None:
        """Replace the bars of `keys` (registered as `_keys`) that the store may hold."""
        self._replace_bars(*self._match(keys))

    @staticmethod
    def _match(keys: pl.DataFrame) -> tuple[str, list]:
        """(condition joining a decision table `t` to the bars of `keys` as `b`, its parameters)."""
        workers = keys.select(WORKER_KEY).unique()
        if workers.height == 1:
            # One worker's bars (a batch run's chunk): its key as constants, so the joins are on
            # bar_time alone, which measured twice as fast as a six-column join.
            match, params = ["t.bar_time = b.bar_time"], list(workers.row(0))
            match += [f"t.{_q(k)} = ?" for k in WORKER_KEY]
        else:
            # Bars of many workers (a group commit of worker processes): one statement per table
            # joined on the whole key, not one per worker (9 workers x 1 bar: 10 ms, not 60-90).
            match, params = [f"t.{_q(k)} = b.{_q(k)}" for k in DECISION_KEY], []
        return (" AND ".join(match + ["t.bar_time BETWEEN ? AND ?"]),
                params + [keys["bar_time"].min(), keys["bar_time"].max()])

    def _revise(self, keys: pl.DataFrame, signals: pl.DataFrame) -> pl.DataFrame:
        """The stream rows of `signals` (registered as `_signals`) whose bars `keys` (`_keys`) the store
        may hold, before they are replaced: each signal with its revision (0 new; kept when its content
        is unchanged; one more when it changed or comes back after a retraction), then a retraction
        (one more revision, the retracting run's run_id) for each stored signal whose bar the batch
        decides otherwise. The revisions above 0 are recorded in `signal_revisions`."""
        match, params = self._match(keys)
        same = " AND ".join(f"t.{_q(c)} IS NOT DISTINCT FROM b.{_q(c)}" for c in _CONTENT)
        # only the signals whose revision is not 0: changed, or with a recorded revision (a replay
        # that changes nothing, the common case, returns no row)
        held = self.query(
            f"SELECT b.signal_id, b.mode, t.signal_id IS NOT NULL AS held, {same} AS same, v.revision "
            f"FROM _signals b LEFT JOIN signals t ON {match} AND CAST(t.signal_id AS VARCHAR) = b.signal_id "
            "LEFT JOIN signal_revisions v ON v.signal_id = CAST(b.signal_id AS UUID) AND v.mode = b.mode "
            f"WHERE v.revision IS NOT NULL OR (t.signal_id IS NOT NULL AND NOT ({same}))", params)
        old = pl.col("revision").fill_null(0)
        held = held.with_columns(pl.when(pl.col("held") & pl.col("same")).then(old)
                                 .when(pl.col("held") | pl.col("revision").is_not_null()).then(old + 1)
                                 .otherwise(0).cast(pl.Int32).alias("new"))
        cols = ", ".join("b.run_id" if c == "run_id" else f"CAST(t.{_q(c)} AS VARCHAR) AS {_q(c)}"
                         if c in ID_COLUMNS else f"t.{_q(c)}" for c in SIGNAL_SCHEMA)
        retracted = self.query(
            f"SELECT {cols}, CAST(coalesce(v.revision, 0) + 1 AS INTEGER) AS revision, TRUE AS retracted "
            f"FROM signals t JOIN _keys b ON {match} AND (NOT b.is_signal OR CAST(t.signal_id AS VARCHAR) <> b.id) "
            "LEFT JOIN signal_revisions v ON v.signal_id = t.signal_id AND v.mode = t.mode", params)
        changed = pl.concat([held.filter(pl.col("new") != old).select("signal_id", "mode", revision="new"),
                             retracted.select("signal_id", "mode", "revision")])
        if changed.height:
            with self._registered(_revised=changed):
                self.con.execute("INSERT OR REPLACE INTO signal_revisions "
                                 "SELECT CAST(signal_id AS UUID), mode, revision FROM _revised")
        revised = stream_rows(signals)
        if held.height:
            revised = revised.drop("revision").join(held.select("signal_id", revision="new"), on="signal_id",
                                                    how="left", maintain_order="left").with_columns(
                pl.col("revision").fill_null(0)).select(STREAM_SCHEMA.names())
        return pl.concat([revised, retracted.cast(dict(STREAM_SCHEMA))]) if retracted.height else revised

    def _replace_bars(self, match: str, params: list) -> None:
        """Delete the current decisions of the bars in `_keys` (`match` joins a table `t` to them),
        auditing the ids that another id replaces."""
        for table, id_col in DECISION_ID.items():
            replaced = f"FROM {table} t JOIN _keys b ON {match} AND CAST(t.{id_col} AS VARCHAR) <> b.id"
            # superseding is rare (a new model version): a narrow probe first spares the common
            # case (a fresh range, a replay) from reading every column of the matching rows.
            # (UUID -> text on the table side measured faster than parsing the batch's text.)
            if self.con.execute(f"SELECT 1 {replaced} LIMIT 1", params).fetchall():
                cols = ", ".join(f"t.{_q(c)}" for c in TABLES[table][0])
                self.con.execute(
                    f"INSERT INTO superseded_{table} SELECT {cols}, CAST(b.id AS UUID), b.run_id {replaced} "
                    f"AND NOT EXISTS (SELECT 1 FROM superseded_{table} s "
                    f"WHERE s.{id_col} = t.{id_col} AND s.mode = t.mode)", params)
            self.con.execute(f"DELETE FROM {table} t USING _keys b WHERE {match}", params)

    def _upsert(self, table: str, df: pl.DataFrame) -> int:
        """Replace the rows of `table` with the batch's keys by the batch.

        Every key includes the bar time, so the delete's scan is limited to the batch's time range:
        DuckDB skips row groups outside it (zone maps) and a long run's upserts stay O(batch), not
        O(table).
        """
        df = prepare(table, df)
        if df.is_empty():
            return 0
        match = " AND ".join(f"t.{_q(k)} IS NOT DISTINCT FROM b.{_q(k)}" for k in TABLES[table][1])
        times = "t.bar_time BETWEEN ? AND ?" + (" OR t.bar_time IS NULL" if df["bar_time"].has_nulls() else "")
        with self._registered(_batch=df), self._transaction():
            self.con.execute(f"DELETE FROM {table} t USING _batch b WHERE ({times}) AND {match}",
                             [df["bar_time"].min(), df["bar_time"].max()])
            self._insert(table, "_batch")
        return df.height

    def _insert(self, table: str, batch: str) -> None:
        schema = TABLES[table][0]
        cols = ", ".join(_q(c) for c in schema)
        values = ", ".join(f"CAST({_q(c)} AS UUID)" if c in ID_COLUMNS else _q(c) for c in schema)
        self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {values} FROM {batch}")

    @contextmanager
    def _registered(self, **frames: pl.DataFrame) -> Iterator[None]:
        for name, df in frames.items():
            self.con.register(name, df.to_arrow())
        try:
            yield
        finally:
            for name in frames:
                self.con.unregister(name)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction; a storage failure (disk full, read-only file) becomes StorageError."""
        con = self.con
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                yield
            except BaseException:
                with suppress(duckdb.Error):  # the failed statement may already have ended it
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        except _IO_ERRORS as exc:
            raise storage_error(self.path, exc) from exc

    # ------------------------------------------------------------ runs

    def start_run(self, run: RunRecord) -> None:
        """Record a run's start and its owner (replacing any earlier row with the same run_id)."""
        record = {**{f.name: getattr(run, f.name) for f in fields(RunRecord)}, **run_owner()}
        names = list(record)
        values = [json.dumps(v, sort_keys=True) if isinstance(v, Mapping) else v  # data_files, config
                  for v in record.values()]
        values[names.index("clients")] = list(run.clients)
        with self._transaction():
            self.con.execute("DELETE FROM runs WHERE run_id = ?", [run.run_id])
            self.con.execute(f"INSERT INTO runs ({', '.join(_q(n) for n in names)}) "
                             f"VALUES ({', '.join('?' for _ in names)})", values)

    def finish_run(self, run_id: str, **values: Any) -> None:
        """Record a run's outcome: any of FINISH_FIELDS (rejections_by_reason as JSON or a dict)."""
        unknown = sorted(set(values) - set(FINISH_FIELDS))
        if unknown:
            raise ValueError(f"unknown run fields {unknown}; allowed: {', '.join(FINISH_FIELDS)}")
        if not values:
            return
        if isinstance(values.get("rejections_by_reason"), Mapping):
            values["rejections_by_reason"] = json.dumps(values["rejections_by_reason"], sort_keys=True)
        sets = ", ".join(f"{_q(k)} = ?" for k in values)
        with self._transaction():
            done = self.con.execute(f"UPDATE runs SET {sets} WHERE run_id = ? RETURNING run_id",
                                    [*values.values(), run_id]).fetchall()
        if not done:
            raise KeyError(f"run {run_id!r} was never started in {self.path}")

    def abandon_stale_runs(self, now: datetime) -> list[str]:
        """Mark the runs still without a status whose owner is gone as 'abandoned' (finished_at =
        `now`); their ids.

        A run without an owner (recorded before owners were) counts as gone: DuckDB's file lock
        means this store is the file's one holder, so its writer is no longer writing. A run of a
        live process of this host (this one, holding the store again) is left alone.
        """
        with self._transaction():
            open_runs = self.con.execute("SELECT run_id, host, pid, started_at FROM runs WHERE status IS NULL")
            gone = [r[0] for r in open_runs.fetchall() if owner_gone(*r[1:], ownerless=True)]
            if gone:
                self.con.execute("UPDATE runs SET status = 'abandoned', finished_at = ? "
                                 "WHERE list_contains(?, run_id)", [now, gone])
        return sorted(gone)

    # ------------------------------------------------------------ checkpoints

    def write_checkpoints(self, mode: str, checkpoints: Mapping[str, datetime]) -> None:
        """Record each worker's checkpoint in `mode` (worker id -> last bar time durable everywhere),
        replacing the one it had. Written after the decisions it covers, never before."""
        if not checkpoints:
            return
        batch = pl.DataFrame({"worker_id": list(checkpoints), "checkpoint": list(checkpoints.values())},
                             schema={"worker_id": pl.String, "checkpoint": pl.Datetime("us", "UTC")})
        # one statement over a registered frame: executemany costs a statement per row
        with self._registered(_checkpoints=batch), self._transaction():
            self.con.execute("INSERT OR REPLACE INTO worker_checkpoints "
                             "SELECT worker_id, ?, checkpoint, now() FROM _checkpoints", [mode])

    def checkpoints(self, mode: str) -> dict[str, datetime]:
        """Worker id -> checkpoint of every worker that has one in `mode`."""
        rows = self.con.execute("SELECT worker_id, checkpoint FROM worker_checkpoints WHERE mode = ?", [mode])
        return {w: t.astimezone(timezone.utc) for w, t in rows.fetchall()}

    # ------------------------------------------------------------ reads

    def count(self, table: str, **where: Any) -> int:
        """Rows of `table` whose columns equal the given values (None matches NULL)."""
        tables = {"runs": RUN_SCHEMA, **{t: schema for t, (schema, _) in TABLES.items()},
                  **{f"superseded_{t}": {**TABLES[t][0], **AUDIT_COLUMNS} for t in DECISION_ID}}
        columns = tables.get(table)
        if columns is None:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(tables)}")
        bad = sorted(set(where) - set(columns))
        if bad:
            raise ValueError(f"table {table} has no columns {bad}")
        conds = [f"{_q(k)} IS NULL" if v is None else f"{_q(k)} = ?" for k, v in where.items()]
        params = [v for v in where.values() if v is not None]
        sql = f"SELECT count(*) FROM {table}" + (f" WHERE {' AND '.join(conds)}" if conds else "")
        return self.con.execute(sql, params).fetchall()[0][0]

    def read(self, query: ReadQuery) -> pl.DataFrame:
        """Rows matching `query`. Opened: on this process's read cursor (safe beside a writing thread;
        it sees committed rows). Not opened: through the process that holds the file, if one does
        (`signalgen.storage.readserver`), else on a read-only connection for this one query."""
        if self._con is None:
            from signalgen.storage.readserver import read

            return read(self.path, query, self._read_once)
        with self._read_lock:
            return pl.from_arrow(self._run(self._reader, query))

    def serve_reads(self) -> AbstractContextManager[Path]:
        """While inside (this store open), other processes read it through this one: a DuckDB file
        has one holder, and a reader's read-only connection would block the writer."""
        from signalgen.storage.readserver import serve_reads

        return serve_reads(self, self.path)

    def _read_once(self, query: ReadQuery) -> pa.Table | None:
        """The answer from a read-only connection, or None when another process holds the file."""
        try:
            con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as exc:
            if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
                return None
            raise StorageError(f"{self.path}: {str(exc).splitlines()[0][:300]}") from exc
        with closing(con):
            con.execute("SET TimeZone = 'UTC'")
            return self._run(con, query)

    def _run(self, con: duckdb.DuckDBPyConnection, query: ReadQuery) -> pa.Table:
        sql, params = build_sql(query)
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            raise StorageError(f"{self.path}: read failed: {str(exc).splitlines()[0][:300]}") from exc

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Run a read query; the result as a polars frame (datetimes in UTC)."""
        rel = self.con.sql(sql, params=params)
        return rel.pl() if rel is not None else pl.DataFrame()


def build_sql(query: ReadQuery) -> tuple[str, list[Any]]:
    """The SQL and parameters of `query`; every value is a parameter, every name a known column."""
    conds: list[str] = []
    params: list[Any] = []

    def any_of(column: str, values: tuple[str, ...]) -> None:
        if values:
            conds.append(f"{_q(column)} IN ({', '.join('?' for _ in values)})")
            params.extend(values)

    if query.kind == "runs":
        select, time_col = "*", "started_at"
        if query.clients:
            conds.append("list_has_any(clients, ?::VARCHAR[])")
            params.append(list(query.clients))
    else:
        time_col = "bar_time"
        select = ", ".join(f"CAST({_q(c)} AS VARCHAR) AS {_q(c)}" if c == ID_COLUMN[query.kind] else _q(c)
                           for c in COLUMNS[query.kind])
        if query.count_by is not None:
            select = ", ".join([*map(_q, query.count_by), "count(*) AS count"])
        any_of("client_id", query.clients)
        any_of("strategy_id", query.strategies)
        any_of("symbol", query.symbols)
        if query.start is not None:
            conds.append("bar_time > ?")
            params.append(query.start)
        if query.end is not None:
            conds.append("bar_time <= ?")
            params.append(query.end)
        if query.since is not None:
            conds.append("generated_at >= ?")
            params.append(query.since)
    any_of("mode", query.modes)
    if query.run_id is not None:
        conds.append("run_id = ?")
        params.append(query.run_id)
    return select_sql(query, select, query.kind, conds, time_col, _q), params
