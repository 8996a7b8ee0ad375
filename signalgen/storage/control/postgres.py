"""The PostgreSQL control store (`control.type: postgres`): one database shared by several managers,
each running one shard `i/N` of the workers (`start --shard`), on one host or many (Cloud SQL in GCP).

The same tables as sqlite.py (times as the same ISO text), plus:
- `manager_leases`: one row per shard, its holder (host, pid, run_id) and `expires_at` (server
  time), renewed every manager tick. A manager starts only when its shard's lease is free or
  expired (its holder stopped renewing: killed, partitioned), and never beside a live lease of
  another layout (a live 0/3 refuses a new 0/2: their shares would overlap).
- `strategy_commands.parent_id`, `.shard`, `.claimed_by`: a row anyone inserts (shard NULL) is
  claimed by one manager with `SELECT ... FOR UPDATE SKIP LOCKED`, which fans it out into one child
  row per live lease (one per shard: a target may match workers of every shard) and completes it
  with {"children": {shard: child id}}; each manager claims its own shard's children the same way.
  Two managers never run one row. `cli.fleet.submit_and_wait` follows the children.
- `strategy_instances.shard`: which manager's row it is (`status` shows rows of a shard whose lease
  is not live as UNKNOWN).

Bounded connections, batched writes: workers never connect to PostgreSQL (500 workers would be 500
connections). They write heartbeats and their Pub/Sub checkpoints to the manager's node-local
SQLite spool (sqlite.py at `control.path`, one file per shard: `spool_path`), and the manager
mirrors what changed into PostgreSQL in its tick's one transaction (`record`), with its instance
rows, events and lease. At start (`hold`) the spool's worker_state is seeded from PostgreSQL, so a
manager on a new node resumes from the checkpoints; a checkpoint that lags by a tick only replays
bars, which is idempotent (deterministic ids, MERGE in the signal store). One connection per store
object (the manager: one; the CLI: one while it runs).

Hostile rows: as in sqlite.py, command rows are read cut to their bounds by the server
(`base.BOUNDED_COLUMNS`: substr and length), and a row out of bounds fails alone with a short reason.
The server enforces the column types, so a row cannot hold a blob where text belongs.

Outages: every PostgreSQL error is a one-line StorageError; the connection is dropped and the next
call connects anew. The manager treats it as any control-store outage: it supervises from memory,
keeps its events, and writes everything again once the store answers. A manager that could not
renew its lease for `lease_ttl_s` may find its shard taken over: the renewal then raises LeaseLost
and the manager stops its workers (the new holder runs them).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signalgen.errors import ConfigError, SignalgenError, StorageError
from signalgen.storage.control.base import (BOUNDED_COLUMNS, INSTANCE_COLUMNS, MAX_FIELD_CHARS, TIME_FIELDS, Command,
                                            LeaseLost, command_of_row, found_command, heartbeat_row, iso, now_iso,
                                            shard_name, time_value, wait_command)
from signalgen.storage.control.sqlite import ControlStore

if TYPE_CHECKING:
    import psycopg

    from signalgen.config.models import EnvironmentConfig

log = logging.getLogger(__name__)

NOW_SQL = "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
SCHEMA_LOCK = 0x5167_636F_6E74  # pg_advisory_xact_lock key: creating the schema ("Sgcont")
LEASE_LOCK = 0x5167_6C65_6173  # ... taking a lease
CLAIM_BATCH = 100  # command rows claimed per call

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS strategy_instances (
    id TEXT PRIMARY KEY, client TEXT, strategy TEXT, symbol TEXT, timeframe TEXT, mode TEXT, config_hash TEXT,
    state TEXT, pid BIGINT, started_at TEXT, state_since TEXT,
    restarts BIGINT NOT NULL DEFAULT 0, failures BIGINT NOT NULL DEFAULT 0, exit_code BIGINT, reason TEXT,
    updated_at TEXT NOT NULL DEFAULT ({NOW_SQL}),
    shard TEXT                                  -- the lease (i/N) of the manager that wrote it
);
CREATE TABLE IF NOT EXISTS strategy_commands (
    id BIGSERIAL PRIMARY KEY,
    strategy_id TEXT, command TEXT NOT NULL, parameters_json TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'completed', 'failed')),
    created_at TEXT NOT NULL DEFAULT ({NOW_SQL}), processed_at TEXT, result_json TEXT,
    parent_id BIGINT,                           -- a fanned-out row's parent
    shard TEXT,                                 -- NULL: any manager fans it out; else only this shard's runs it
    claimed_by TEXT                             -- the run id of the manager running it
);
CREATE INDEX IF NOT EXISTS strategy_commands_pending ON strategy_commands (id) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS heartbeats (
    worker_id TEXT PRIMARY KEY, pid BIGINT, state TEXT, last_bar_time TEXT, checkpoint TEXT,
    signals BIGINT NOT NULL DEFAULT 0, rejections BIGINT NOT NULL DEFAULT 0, errors BIGINT NOT NULL DEFAULT 0,
    ready INTEGER NOT NULL DEFAULT 0, ts TEXT NOT NULL, paused_keys BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS resources (
    id BIGSERIAL PRIMARY KEY, worker_id TEXT NOT NULL, ts TEXT NOT NULL,
    cpu_percent DOUBLE PRECISION, rss_mb DOUBLE PRECISION, uss_mb DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS resources_worker_ts ON resources (worker_id, ts);
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY, ts TEXT NOT NULL, worker_id TEXT, kind TEXT NOT NULL, detail TEXT
);
CREATE TABLE IF NOT EXISTS worker_state (
    mode TEXT NOT NULL, worker_id TEXT NOT NULL, checkpoint TEXT NOT NULL, warmup TEXT, updated_at TEXT NOT NULL,
    PRIMARY KEY (mode, worker_id)
);
CREATE TABLE IF NOT EXISTS managers (
    host TEXT NOT NULL, pid BIGINT NOT NULL, run_id TEXT, started_at TEXT NOT NULL, ts TEXT NOT NULL,
    shard TEXT, PRIMARY KEY (host, pid)
);
CREATE TABLE IF NOT EXISTS manager_leases (
    shard TEXT PRIMARY KEY,                     -- i/N
    shard_index INTEGER NOT NULL, shard_count INTEGER NOT NULL,
    host TEXT NOT NULL, pid BIGINT NOT NULL, run_id TEXT NOT NULL,
    acquired_at TEXT NOT NULL, renewed_at TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL             -- server time: hosts' clocks never compared
);
"""

_HEARTBEAT_UPSERT = (
    "INSERT INTO heartbeats (worker_id, pid, state, last_bar_time, checkpoint, signals, rejections, errors, ready, "
    "ts, paused_keys) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (worker_id) DO UPDATE SET "
    "pid = excluded.pid, state = excluded.state, last_bar_time = excluded.last_bar_time, "
    "checkpoint = excluded.checkpoint, signals = excluded.signals, rejections = excluded.rejections, "
    "errors = excluded.errors, ready = excluded.ready, ts = excluded.ts, paused_keys = excluded.paused_keys")
_STATE_UPSERT = (
    "INSERT INTO worker_state (mode, worker_id, checkpoint, warmup, updated_at) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (mode, worker_id) DO UPDATE SET checkpoint = excluded.checkpoint, "
    "warmup = COALESCE(excluded.warmup, worker_state.warmup), updated_at = excluded.updated_at "
    "WHERE excluded.checkpoint >= worker_state.checkpoint")
_LEASE_COLUMNS = "shard, shard_index, shard_count, host, pid, run_id, acquired_at, renewed_at"


def _holder(lease: dict) -> str:
    return f"pid {lease['pid']} on {lease['host']} (run {lease['run_id']})"


class PostgresControlStore:
    """The control store in the PostgreSQL database at `dsn` (see the module docstring).

    Args:
        dsn: a libpq connection string (from the environment variable `control.dsn_env`).
        spool: the manager's node-local SQLite store, which its workers write and `record` mirrors;
            None for the CLI and other readers (heartbeats and worker state are then PostgreSQL's).
        lease_ttl_s: a lease not renewed this long can be taken over.
        connect_timeout_s: a server that does not answer within this is down (StorageError).
    """

    shared = True  # several managers, one lease per shard

    def __init__(self, dsn: str, *, spool: ControlStore | None = None, lease_ttl_s: float = 15.0,
                 connect_timeout_s: float = 5.0, resources_keep_s: float = 600.0,
                 events_keep: int = 10_000) -> None:
        self.dsn, self.spool = dsn, spool
        self.lease_ttl_s, self.connect_timeout_s = lease_ttl_s, connect_timeout_s
        self.resources_keep_s, self.events_keep = resources_keep_s, events_keep
        self.path = spool.path if spool is not None else Path(os.devnull)
        self.where = _describe(dsn)
        self._con: psycopg.Connection | None = None
        self._lock = threading.RLock()  # one connection: the manager's loop and its sampler thread take turns
        self._schema_ready = False
        self._shard: str | None = None  # the lease held (`hold`): claims and reads are this shard's
        self._run_id = ""
        self._ticking = threading.Event()  # set once the manager's ticks renew the lease (`hold`)
        self._mirrored_beats: dict[str, str] = {}  # worker id -> ts of the spool heartbeat last mirrored
        self._mirrored_state = ""  # updated_at of the newest spool worker_state row mirrored
        self._mirrored_points: dict[tuple[str, str], tuple[str, str]] = {}  # (mode, worker) -> (checkpoint, updated_at)

    @classmethod
    def for_environment(cls, environment: EnvironmentConfig, root: Path,
                        shard: tuple[int, int] | None = None) -> PostgresControlStore:
        """The DSN from `control.dsn_env` (ConfigError naming the variable when unset); a manager's
        (`shard` given) spool at `control.path`, one file per shard."""
        from signalgen.storage.control import spool_path

        control = environment.control
        dsn = os.environ.get(control.dsn_env, "")
        if not dsn.strip():
            raise ConfigError(f"control.type is postgres and the environment variable {control.dsn_env} (the "
                              "PostgreSQL DSN, e.g. 'host=... dbname=... user=...') is not set",
                              field="control.dsn_env")
        spool = ControlStore(spool_path(root / control.path, shard)) if shard is not None else None
        return cls(dsn, spool=spool, lease_ttl_s=control.lease_ttl_s, connect_timeout_s=control.connect_timeout_s)

    def __repr__(self) -> str:
        return f"PostgresControlStore({self.where!r})"

    @property
    def generation(self) -> int:
        return self.spool.generation if self.spool is not None else 0

    # ---------------------------------------------------------------- connection

    @contextmanager
    def _cursor(self, transaction: bool = False) -> Iterator[psycopg.Cursor]:
        """A cursor of this store's connection (opened on first use, schema ensured), in a
        transaction when asked; every PostgreSQL error becomes one StorageError line, and a broken
        connection is dropped (the next call connects anew)."""
        import psycopg

        with self._lock:
            try:
                con = self._connect()
                if transaction:
                    with con.transaction(), con.cursor() as cur:
                        yield cur
                else:
                    with con.cursor() as cur:
                        yield cur
            except psycopg.Error as exc:
                if self._con is not None and (self._con.broken or self._con.closed
                                              or isinstance(exc, psycopg.OperationalError)):
                    self._drop()
                raise StorageError(f"control store {self.where}: {' '.join(str(exc).split())[:300]}") from exc

    def _connect(self) -> psycopg.Connection:
        import psycopg
        from psycopg.rows import dict_row

        if self._con is not None and not self._con.closed:
            return self._con
        con = psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row,
                              connect_timeout=max(1, round(self.connect_timeout_s)),
                              application_name="signalgen")
        try:
            if not self._schema_ready:
                with con.transaction(), con.cursor() as cur:  # managers starting at once: one creates it
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    cur.execute(SCHEMA)
                self._schema_ready = True
        except BaseException:
            con.close()
            raise
        self._con = con
        return con

    def _drop(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            try:
                con.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone either way
                pass

    def close(self) -> None:
        """Close the connection (and the spool's); the store reconnects on next use."""
        with self._lock:
            self._drop()
        if self.spool is not None:
            self.spool.close()

    def __enter__(self) -> PostgresControlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def quarantine(self) -> Path:
        """Move the spool aside when it is damaged (the PostgreSQL database is never moved)."""
        if self.spool is None:
            raise StorageError(f"control store {self.where} has no local file to move aside")
        return self.spool.quarantine()

    def ping(self) -> None:
        """A cheap write: StorageError when the database cannot be written (read-only, down)."""
        with self._cursor(transaction=True) as cur:
            cur.execute("UPDATE managers SET ts = ts WHERE false")
            cur.execute("SELECT pg_is_in_recovery() AS ro, current_setting('transaction_read_only') AS tro")
            row = cur.fetchone()
            if row["ro"] or row["tro"] == "on":
                raise StorageError(f"control store {self.where}: the database is read-only")

    # ---------------------------------------------------------------- leases

    @contextmanager
    def hold(self, shard: tuple[int, int] = (0, 1), run_id: str = "") -> Iterator[None]:
        """The lease on `shard` while the manager runs; SignalgenError naming the holder when a live
        lease holds it, or when a live lease of another layout would overlap. Commands claimed by an
        earlier holder of the shard that never finished them fail (its manager is gone); the spool's
        worker_state is seeded from the database. Released (deleted) when the manager stops."""
        name, me = shard_name(shard), (socket.gethostname(), os.getpid(), run_id or f"pid-{os.getpid()}")
        with self._cursor(transaction=True) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (LEASE_LOCK,))
            cur.execute(f"SELECT {_LEASE_COLUMNS}, expires_at, expires_at > clock_timestamp() AS live "
                        "FROM manager_leases ORDER BY shard_count, shard_index")
            leases = cur.fetchall()
            for lease in leases:
                if not lease["live"]:
                    continue
                if lease["shard_count"] != shard[1]:
                    raise SignalgenError(f"shard {name} overlaps the live lease of shard {lease['shard']}, held by "
                                         f"{_holder(lease)} on {self.where}: every manager of one store uses the "
                                         "same shard count; stop them first")
                if lease["shard"] == name:
                    raise SignalgenError(f"a manager ({_holder(lease)}) already holds shard {name} on {self.where} "
                                         f"(lease until {iso(lease['expires_at'])}); `stop` it first")
            for lease in leases:
                if lease["shard"] == name:
                    log.warning("taking over shard %s from %s: its lease expired at %s", name, _holder(lease),
                                iso(lease["expires_at"]))
            cur.execute("DELETE FROM manager_leases WHERE expires_at <= clock_timestamp() AND shard_count <> %s",
                        (shard[1],))  # an earlier layout's, all expired (checked above)
            cur.execute(f"INSERT INTO manager_leases ({_LEASE_COLUMNS}, expires_at) VALUES (%s, %s, %s, %s, %s, %s, "
                        f"{NOW_SQL}, {NOW_SQL}, clock_timestamp() + make_interval(secs => %s)) "
                        "ON CONFLICT (shard) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                        "run_id = excluded.run_id, acquired_at = excluded.acquired_at, "
                        "renewed_at = excluded.renewed_at, expires_at = excluded.expires_at",
                        (name, shard[0], shard[1], *me, self.lease_ttl_s))
            cur.execute("UPDATE strategy_commands SET status = 'failed', processed_at = " + NOW_SQL + ", "
                        "result_json = %s WHERE status = 'pending' AND shard = %s AND claimed_by IS NOT NULL",
                        (json.dumps({"error": f"the manager of shard {name} stopped before finishing it"}), name))
        self._shard, self._run_id = name, me[2]
        self._ticking.clear()
        keeper = threading.Thread(target=self._keep_until_ticking, name="lease-keeper", daemon=True)
        keeper.start()
        try:
            self._seed_spool()
            yield
        finally:
            self._ticking.set()
            keeper.join()
            self._shard = None
            try:
                with self._cursor() as cur:
                    cur.execute("DELETE FROM manager_leases WHERE shard = %s AND run_id = %s", (name, me[2]))
            except StorageError as exc:  # it expires by itself
                log.warning("could not release the lease of shard %s: %s", name, exc)

    def _keep_until_ticking(self) -> None:
        """Thread: renew the lease while the manager starts (opening the signal store, its decision
        host: seconds), until its first tick renews it (`record`), so no TTL has to cover start-up."""
        while not self._ticking.wait(self.lease_ttl_s / 4):
            try:
                with self._cursor(transaction=True) as cur:
                    if not self._ticking.is_set():
                        self._renew(cur)
            except StorageError as exc:  # the first tick reports it
                log.debug("renewing the lease during start-up: %s", exc)

    def _renew(self, cur: psycopg.Cursor) -> None:
        """Renew this manager's lease (in the tick's transaction); retaken when it expired and nobody
        took it meanwhile; LeaseLost when another manager holds it now."""
        name = self._shard
        cur.execute(f"INSERT INTO manager_leases ({_LEASE_COLUMNS}, expires_at) VALUES (%s, %s, %s, %s, %s, %s, "
                    f"{NOW_SQL}, {NOW_SQL}, clock_timestamp() + make_interval(secs => %s)) "
                    "ON CONFLICT (shard) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                    "run_id = excluded.run_id, renewed_at = excluded.renewed_at, expires_at = excluded.expires_at "
                    "WHERE manager_leases.run_id = excluded.run_id OR manager_leases.expires_at <= clock_timestamp()",
                    (name, *map(int, name.split("/")), socket.gethostname(), os.getpid(), self._run_id,
                     self.lease_ttl_s))
        if cur.rowcount == 0:
            cur.execute(f"SELECT {_LEASE_COLUMNS} FROM manager_leases WHERE shard = %s", (name,))
            other = cur.fetchone()
            raise LeaseLost(f"shard {name} of {self.where} was taken over by "
                            f"{_holder(other) if other else 'another manager'} (this manager's lease expired)")

    def leases(self) -> list[dict]:
        """Every lease, by shard: shard, host, pid, run_id, acquired_at, renewed_at, expires_at (ISO)
        and live (not expired, by the server's clock)."""
        with self._cursor() as cur:
            cur.execute(f"SELECT {_LEASE_COLUMNS}, expires_at, expires_at > clock_timestamp() AS live "
                        "FROM manager_leases ORDER BY shard_count, shard_index")
            return [{**r, "expires_at": iso(r["expires_at"])} for r in cur.fetchall()]

    def _seed_spool(self) -> None:
        """The spool's worker_state from the database (never backwards): a manager on a new node
        resumes from the checkpoints its shard's workers reached anywhere."""
        if self.spool is None:
            return
        with self._cursor() as cur:
            cur.execute("SELECT mode, worker_id, checkpoint, warmup, updated_at FROM worker_state")
            rows = [tuple(r.values()) for r in cur.fetchall()]
        self.spool.seed_worker_state(rows)
        log.info("control store %s: %d worker checkpoints seeded into %s", self.where, len(rows), self.spool.path)

    # ---------------------------------------------------------------- instances

    def upsert_instances(self, rows: list[dict]) -> None:
        """Insert or update `strategy_instances` rows by `id` (the columns given; `updated_at` now)."""
        with self._cursor(transaction=True) as cur:
            self._upsert_instances(cur, rows)

    def set_instance(self, worker_id: str, **fields: Any) -> None:
        self.upsert_instances([{"id": worker_id, **fields}])

    def _upsert_instances(self, cur: psycopg.Cursor, rows: list[dict]) -> None:
        now = now_iso()
        for row in rows:
            fields = {k: time_value(v) if k in TIME_FIELDS else v for k, v in row.items()}
            fields["updated_at"] = now
            unknown = set(fields) - set(INSTANCE_COLUMNS)
            if unknown or "id" not in fields:
                raise ValueError(f"strategy_instances has no column {', '.join(sorted(unknown))}"
                                 if unknown else "an instance row needs its 'id' (the worker id)")
            fields = {k: str(v) if k == "state" and v is not None else v for k, v in fields.items()}
            if self._shard is not None:
                fields["shard"] = self._shard
            cols = list(fields)
            updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id")
            cur.execute(f"INSERT INTO strategy_instances ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
                        f"ON CONFLICT (id) DO UPDATE SET {updates}", [fields[c] for c in cols])

    def instances(self) -> list[dict]:
        """Every instance row by id (with its `shard`); the manager's (a lease held): its shard's."""
        with self._cursor() as cur:
            if self._shard is not None:
                cur.execute("SELECT * FROM strategy_instances WHERE shard = %s ORDER BY id", (self._shard,))
            else:
                cur.execute("SELECT * FROM strategy_instances ORDER BY id")
            return cur.fetchall()

    def remove_instance(self, worker_id: str) -> None:
        """Forget a worker: its instance, heartbeat and resource rows (and its spool heartbeat); events stay."""
        with self._cursor(transaction=True) as cur:
            for table, column in (("strategy_instances", "id"), ("heartbeats", "worker_id"),
                                  ("resources", "worker_id")):
                cur.execute(f"DELETE FROM {table} WHERE {column} = %s", (worker_id,))
        if self.spool is not None:
            self.spool.remove_instance(worker_id)
            self._mirrored_beats.pop(worker_id, None)

    # ---------------------------------------------------------------- commands

    def submit(self, command: str, strategy_id: str | None = None, parameters: dict | None = None) -> int:
        """Insert a pending command row (for every shard); returns its id."""
        with self._cursor() as cur:
            cur.execute("INSERT INTO strategy_commands (strategy_id, command, parameters_json) VALUES (%s, %s, %s) "
                        "RETURNING id", (strategy_id, command, json.dumps(parameters or {})))
            return int(cur.fetchone()["id"])

    def pending(self) -> list[Command]:
        """Pending commands, oldest first; a row out of bounds is failed here with its reason.

        Without a lease (a reader): every pending row, as sqlite.py. With one (the manager): rows are
        claimed with FOR UPDATE SKIP LOCKED — a row for every shard is fanned out into one child per
        live lease and completed with their ids; this shard's children are claimed by this run — and
        the pending rows this run claimed are returned."""
        if self._shard is None:
            with self._cursor() as cur:
                cur.execute(f"SELECT {BOUNDED_COLUMNS} FROM strategy_commands WHERE status = 'pending' ORDER BY id")
                rows = cur.fetchall()
            return self._vet(rows)
        with self._cursor(transaction=True) as cur:
            cur.execute(f"SELECT {BOUNDED_COLUMNS}, shard FROM strategy_commands WHERE status = 'pending' "
                        "AND claimed_by IS NULL AND (shard IS NULL OR shard = %s) ORDER BY id LIMIT %s "
                        "FOR UPDATE SKIP LOCKED", (self._shard, CLAIM_BATCH))
            rows = cur.fetchall()
            live = None
            for row in rows:
                try:
                    command_of_row(row)
                except ValueError as exc:
                    self._finish_in(cur, row["id"], "failed", {"error": str(exc)[:MAX_FIELD_CHARS]})
                    continue
                if row["shard"] is None:
                    if live is None:
                        cur.execute("SELECT shard FROM manager_leases WHERE expires_at > clock_timestamp() "
                                    "OR shard = %s ORDER BY shard_index", (self._shard,))
                        live = [r["shard"] for r in cur.fetchall()]
                    self._fan_out(cur, row["id"], live)
                else:
                    cur.execute("UPDATE strategy_commands SET claimed_by = %s WHERE id = %s", (self._run_id, row["id"]))
            cur.execute(f"SELECT {BOUNDED_COLUMNS} FROM strategy_commands WHERE status = 'pending' AND shard = %s "
                        "AND claimed_by = %s ORDER BY id", (self._shard, self._run_id))
            return self._vet(cur.fetchall(), cur)

    def _fan_out(self, cur: psycopg.Cursor, parent: int, shards: list[str]) -> None:
        """One child of row `parent` per shard (this run's own claimed at once); the parent completes
        with {"children": {shard: id}}."""
        children = {}
        for shard in shards:
            cur.execute("INSERT INTO strategy_commands (strategy_id, command, parameters_json, created_at, parent_id, "
                        "shard, claimed_by) SELECT strategy_id, command, parameters_json, created_at, id, %s, %s "
                        "FROM strategy_commands WHERE id = %s RETURNING id",
                        (shard, self._run_id if shard == self._shard else None, parent))
            children[shard] = cur.fetchone()["id"]
        self._finish_in(cur, parent, "completed", {"children": children})

    def _vet(self, rows: list[dict], cur: psycopg.Cursor | None = None) -> list[Command]:
        commands = []
        for row in rows:
            try:
                commands.append(command_of_row(row))
            except ValueError as exc:
                if cur is not None:
                    self._finish_in(cur, row["id"], "failed", {"error": str(exc)[:MAX_FIELD_CHARS]})
                else:
                    self.fail(row["id"], str(exc))
        return commands

    def complete(self, id: int, result: dict) -> bool:
        """Mark a pending command completed with `result`. False when it was no longer pending."""
        return self._finish(id, "completed", result)

    def fail(self, id: int, error: str) -> bool:
        """Mark a pending command failed with {"error": error} (cut to MAX_FIELD_CHARS)."""
        return self._finish(id, "failed", {"error": error[:MAX_FIELD_CHARS]})

    def _finish(self, id: int, status: str, result: dict) -> bool:
        with self._cursor() as cur:
            done = self._finish_in(cur, id, status, result)
        if not done:
            self.command(id)  # KeyError when there is no such command
        return done

    @staticmethod
    def _finish_in(cur: psycopg.Cursor, id: int, status: str, result: dict) -> bool:
        cur.execute(f"UPDATE strategy_commands SET status = %s, processed_at = {NOW_SQL}, result_json = %s "
                    "WHERE id = %s AND status = 'pending'",
                    (status, json.dumps(result, default=str, ensure_ascii=False), id))
        return cur.rowcount == 1

    def command(self, id: int) -> Command:
        """One command by id; KeyError when there is none."""
        with self._cursor() as cur:
            cur.execute(f"SELECT {BOUNDED_COLUMNS} FROM strategy_commands WHERE id = %s", (id,))
            return found_command(cur.fetchone(), id)

    wait = wait_command

    # ---------------------------------------------------------------- heartbeats and worker state

    def heartbeat(self, worker_id: str, *, pid: int, state: str, last_bar_time: datetime | str | None,
                  checkpoint: datetime | str | None, signals: int, rejections: int, errors: int,
                  ready: bool, ts: str | None = None, paused_keys: int = 0) -> None:
        """Upsert a heartbeat: into the spool when there is one (mirrored by `record`), else the database."""
        fields = dict(pid=pid, state=state, last_bar_time=last_bar_time, checkpoint=checkpoint, signals=signals,
                      rejections=rejections, errors=errors, ready=ready, ts=ts, paused_keys=paused_keys)
        if self.spool is not None:
            self.spool.heartbeat(worker_id, **fields)
            return
        with self._cursor() as cur:
            cur.execute(_HEARTBEAT_UPSERT, heartbeat_row(worker_id, **fields))

    def relay_heartbeats(self, beats: dict[str, dict]) -> None:
        """As sqlite.py's: into the spool when there is one, else the database in one transaction."""
        if self.spool is not None:
            self.spool.relay_heartbeats(beats)
            return
        with self._cursor(transaction=True) as cur:
            cur.executemany(_HEARTBEAT_UPSERT + " WHERE heartbeats.pid IS DISTINCT FROM excluded.pid OR "
                            "heartbeats.state NOT IN ('STOPPED', 'EXITED', 'FATAL')",
                            [heartbeat_row(wid, **fields) for wid, fields in beats.items()])

    def heartbeats(self) -> dict[str, dict]:
        """worker id -> its last heartbeat. The manager's (a spool): its own workers' from the spool,
        current to the write; a reader's: every shard's from the database, as of the last mirror."""
        if self.spool is not None:
            return self.spool.heartbeats()
        with self._cursor() as cur:
            cur.execute("SELECT * FROM heartbeats ORDER BY worker_id")
            return {r["worker_id"]: {**r, "ready": bool(r["ready"])} for r in cur.fetchall()}

    def save_worker_state(self, mode: str, worker_id: str, checkpoint: datetime,
                          warmup: list[bytes] | None = None) -> None:
        """Advance a worker's checkpoint (never backwards): in the spool when there is one."""
        if self.spool is not None:
            self.spool.save_worker_state(mode, worker_id, checkpoint, warmup)
            return
        point = checkpoint.astimezone(timezone.utc).isoformat(timespec="microseconds")
        lines = None if warmup is None else b"\n".join(warmup).decode()
        with self._cursor() as cur:
            cur.execute(_STATE_UPSERT, (mode, worker_id, point, lines, now_iso()))

    def worker_state(self, mode: str, worker_id: str) -> tuple[datetime, list[bytes]] | None:
        """(checkpoint, warm-up bars as JSON lines) of a worker in `mode`, or None."""
        if self.spool is not None:
            return self.spool.worker_state(mode, worker_id)
        with self._cursor() as cur:
            cur.execute("SELECT checkpoint, warmup FROM worker_state WHERE mode = %s AND worker_id = %s",
                        (mode, worker_id))
            row = cur.fetchone()
        if row is None:
            return None
        return datetime.fromisoformat(row["checkpoint"]), [line.encode() for line in (row["warmup"] or "").splitlines()
                                                           if line]

    # ---------------------------------------------------------------- resources, events, the manager's tick

    def record_resources(self, rows: list[tuple[str, float, float, float]]) -> None:
        """One sample per (worker_id, cpu_percent, rss_mb, uss_mb), ts now, in one transaction that
        also prunes samples older than resources_keep_s."""
        now = time.time()
        ts, cutoff = iso(now), iso(now - self.resources_keep_s)
        with self._cursor(transaction=True) as cur:
            cur.executemany("INSERT INTO resources (worker_id, ts, cpu_percent, rss_mb, uss_mb) "
                            "VALUES (%s, %s, %s, %s, %s)", [(w, ts, cpu, rss, uss) for w, cpu, rss, uss in rows])
            cur.execute("DELETE FROM resources WHERE ts < %s", (cutoff,))

    def resources(self, latest_only: bool = True) -> dict[str, dict]:
        """As sqlite.py's: each worker's newest sample, or its kept history as columns."""
        cols = ("ts", "cpu_percent", "rss_mb", "uss_mb")
        with self._cursor() as cur:
            if latest_only:
                cur.execute("SELECT DISTINCT ON (worker_id) * FROM resources ORDER BY worker_id, id DESC")
                return {r["worker_id"]: {c: r[c] for c in cols} for r in cur.fetchall()}
            cur.execute("SELECT * FROM resources ORDER BY worker_id, ts, id")
            out: dict[str, dict] = {}
            for r in cur.fetchall():
                history = out.setdefault(r["worker_id"], {c: [] for c in cols})
                for c in cols:
                    history[c].append(r[c])
            return out

    def event(self, worker_id: str | None, kind: str, detail: str | dict = "") -> None:
        """Append an event; only the newest events_keep are kept."""
        text = detail if isinstance(detail, str) else json.dumps(detail, default=str, sort_keys=True)
        with self._cursor(transaction=True) as cur:
            self._events(cur, [(now_iso(), worker_id, kind, text)])

    def _events(self, cur: psycopg.Cursor, events: list[tuple[str, str | None, str, str]]) -> None:
        cur.executemany("INSERT INTO events (ts, worker_id, kind, detail) VALUES (%s, %s, %s, %s)", events)
        cur.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - %s", (self.events_keep,))

    def record(self, instances: list[dict], events: list[tuple[str, str | None, str, str]], *,
               manager: tuple[int, str] | None = None) -> None:
        """The manager's tick in one transaction: its instance rows, events and beat, its lease
        renewed (LeaseLost when another manager took the shard), and what changed in its spool since
        the last tick mirrored: heartbeats and worker_state. What fails to be written is mirrored
        again at the next tick (the spool keeps it)."""
        beats, states = self._spool_changes()
        self._ticking.set()  # the tick renews the lease from now on
        with self._cursor(transaction=True) as cur:
            if self._shard is not None:
                self._renew(cur)
            self._upsert_instances(cur, instances)
            if events:
                self._events(cur, events)
            if manager is not None:
                now = now_iso()
                cur.execute("INSERT INTO managers (host, pid, run_id, started_at, ts, shard) VALUES "
                            "(%s, %s, %s, %s, %s, %s) ON CONFLICT (host, pid) DO UPDATE SET ts = excluded.ts, "
                            "run_id = excluded.run_id, shard = excluded.shard",
                            (socket.gethostname(), *manager, now, now, self._shard))
            if beats:
                cur.executemany(_HEARTBEAT_UPSERT, [heartbeat_row(b["worker_id"], **{
                    k: b[k] for k in ("pid", "state", "last_bar_time", "checkpoint", "signals", "rejections",
                                      "errors", "ready", "ts", "paused_keys")}) for b in beats])
            if states:
                cur.executemany(_STATE_UPSERT, states)
        for b in beats:
            self._mirrored_beats[b["worker_id"]] = b["ts"]
        for mode, wid, point, _, updated in states:
            self._mirrored_points[mode, wid] = (point, updated)
            self._mirrored_state = max(self._mirrored_state, updated)

    def _spool_changes(self) -> tuple[list[dict], list[tuple]]:
        """The spool's heartbeats not mirrored yet, and its worker_state rows updated since the last
        mirror (at the same millisecond too: the upsert is idempotent)."""
        if self.spool is None:
            return [], []
        beats = [b for wid, b in self.spool.heartbeats().items() if self._mirrored_beats.get(wid) != b["ts"]]
        states = [s for s in self.spool.worker_states_since(self._mirrored_state)
                  if self._mirrored_points.get((s[0], s[1])) != (s[2], s[4])]
        return beats, states

    def managers(self) -> list[dict]:
        """The managers that wrote this store, newest beat first: host, pid, run_id, started_at, ts, shard."""
        with self._cursor() as cur:
            cur.execute("SELECT * FROM managers ORDER BY ts DESC")
            return cur.fetchall()

    def events(self, worker_id: str | None = None, limit: int = 100) -> list[dict]:
        """The newest `limit` events (of one worker, or all), oldest first."""
        where, args = ("WHERE worker_id = %s", [worker_id]) if worker_id is not None else ("", [])
        with self._cursor() as cur:
            cur.execute(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT %s", [*args, limit])
            return list(reversed(cur.fetchall()))


def _describe(dsn: str) -> str:
    """`postgresql://user@host:port/dbname` of a DSN, without its password (for messages and logs)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - an unparsable DSN fails at connect with libpq's message
        return "postgresql (unparsable DSN)"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    user = f"{info['user']}@" if info.get("user") else ""
    return f"postgresql://{user}{host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"
