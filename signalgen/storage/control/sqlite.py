"""The SQLite control store (`control.type: sqlite`, the default): worker instances, commands,
heartbeats, resource samples and events in one file. Also the node-local spool of the PostgreSQL
store (postgres.py), where workers write and its manager mirrors from.

Separate from the signal store, and written by many processes at once: the manager (instances,
events, resources, command results), every worker (its heartbeat, or the writer relaying it), the CLI
and any other program (command rows, e.g. `sqlite3 var/local-dev/control.sqlite "INSERT INTO strategy_commands ..."`).

Why this is safe with many writers: WAL mode (readers never block the writer, the writer never
blocks readers), `busy_timeout` 5 s (a writer waits for the write lock instead of failing), and no
transaction ever reads before it writes without holding the lock: single statements run in
autocommit, multi-statement writes start with `BEGIN IMMEDIATE`. (A deferred transaction that reads
first and then writes after another process committed gets SQLITE_BUSY at once, which no timeout
retries: the usual source of "database is locked".) `synchronous=NORMAL`: a commit survives the
process being killed; only a power loss can drop the last commits, and this is control state.

One connection per process and thread, opened on first use; a connection inherited across a fork is
abandoned, never used or closed, as SQLite requires.

Timestamps (base.py) are what `strftime('%Y-%m-%dT%H:%M:%fZ', 'now')` writes, so rows inserted by
other programs get the same format by default.

One manager per store: it holds an exclusive flock on `<path>.lock` (`hold`).
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signalgen.errors import SignalgenError, StorageError
from signalgen.storage.control.base import (BOUNDED_COLUMNS, MAX_FIELD_CHARS, TIME_FIELDS, INSTANCE_COLUMNS, Command,
                                            ControlStoreCorrupt, command_of_row, control_path_of, found_command,
                                            heartbeat_row, iso, now_iso, time_value, wait_command)

if TYPE_CHECKING:
    from signalgen.config.models import EnvironmentConfig, RunConfig

log = logging.getLogger(__name__)


def _guarded(method: Callable) -> Callable:
    """A ControlStore method whose SQLite errors become one-line StorageErrors naming the file
    (ControlStoreCorrupt when the file is damaged): callers never see a traceback from sqlite3."""
    @functools.wraps(method)
    def call(self: ControlStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _storage_error(self.path, exc) from exc
    return call


# A read-only descriptor of each control store file per process, for `ControlStore._replaced`'s look at
# its header — never closed: SQLite locks with POSIX locks, which a process loses on a file when it
# closes *any* descriptor of that file, so closing one would drop the locks of every connection of
# the process (the manager holds two stores of one file: its own and the writer's relay)
_PROBES: dict[tuple[int, int, int], int] = {}
_PROBES_LOCK = threading.Lock()


def _probe_of(path: Path) -> tuple[int, tuple[int, int]]:
    """(this process's read-only descriptor of the file at `path`, its (device, inode))."""
    st = os.stat(path)
    key = (os.getpid(), st.st_dev, st.st_ino)
    with _PROBES_LOCK:
        fd = _PROBES.get(key)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)  # the file opened, should it have been replaced since the stat
            key = (os.getpid(), st.st_dev, st.st_ino)
            fd = _PROBES.setdefault(key, fd)
    return fd, key[1:]


def _storage_error(path: Path, exc: sqlite3.Error, doing: str = "") -> StorageError:
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    cls = ControlStoreCorrupt if code in _CORRUPT_CODES else StorageError
    return cls(f"control store {path}{doing}: {' '.join(str(exc).split())[:300]}")

BUSY_TIMEOUT_MS = 5000
IDENTITY_CHECK_S = 1.0  # how often a connection checks that the file it writes is still the store's
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_SQLITE_MAGIC = b"SQLite format 3\x00"
SCHEMA_VERSION = 1
_NOW_SQL = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS strategy_instances (
    id          TEXT PRIMARY KEY,           -- worker id client.strategy.symbol.timeframe
    client      TEXT, strategy TEXT, symbol TEXT, timeframe TEXT, mode TEXT, config_hash TEXT,
    state       TEXT,                       -- signalgen.process.states.State
    pid         INTEGER,
    started_at  TEXT, state_since TEXT,
    restarts    INTEGER NOT NULL DEFAULT 0, -- every restart
    failures    INTEGER NOT NULL DEFAULT 0, -- consecutive failures
    exit_code   INTEGER, reason TEXT,
    updated_at  TEXT NOT NULL DEFAULT ({_NOW_SQL})
);
CREATE TABLE IF NOT EXISTS strategy_commands (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    strategy_id     TEXT,                   -- worker id, glob or client/strategy name; NULL = the manager
    command         TEXT NOT NULL,
    parameters_json TEXT NOT NULL DEFAULT '{{}}',
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'completed', 'failed')),
    created_at      TEXT NOT NULL DEFAULT ({_NOW_SQL}),
    processed_at    TEXT,
    result_json     TEXT
);
CREATE INDEX IF NOT EXISTS strategy_commands_pending ON strategy_commands (id) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS heartbeats (
    worker_id     TEXT PRIMARY KEY,
    pid           INTEGER, state TEXT, last_bar_time TEXT, checkpoint TEXT,
    signals       INTEGER NOT NULL DEFAULT 0, rejections INTEGER NOT NULL DEFAULT 0,
    errors        INTEGER NOT NULL DEFAULT 0, ready INTEGER NOT NULL DEFAULT 0,
    ts            TEXT NOT NULL,
    paused_keys   INTEGER NOT NULL DEFAULT 0    -- Pub/Sub ordering keys whose publishing waits for a retry
);
CREATE TABLE IF NOT EXISTS resources (
    worker_id TEXT NOT NULL, ts TEXT NOT NULL, cpu_percent REAL, rss_mb REAL, uss_mb REAL
);
CREATE INDEX IF NOT EXISTS resources_worker_ts ON resources (worker_id, ts);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, worker_id TEXT, kind TEXT NOT NULL, detail TEXT
);
CREATE TABLE IF NOT EXISTS worker_state (  -- a worker's own durable state where its broker keeps none (Pub/Sub)
    mode        TEXT NOT NULL,
    worker_id   TEXT NOT NULL,
    checkpoint  TEXT NOT NULL,              -- the last bar whose decisions the broker confirmed (ISO, us)
    warmup      TEXT,                       -- JSON lines of the bars before it that its features need
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (mode, worker_id)
);
CREATE TABLE IF NOT EXISTS managers (       -- the manager holding this store's lock: its last beat
    pid INTEGER PRIMARY KEY, run_id TEXT, started_at TEXT NOT NULL, ts TEXT NOT NULL
);
PRAGMA user_version = {SCHEMA_VERSION};
"""


def _migrations(con: sqlite3.Connection) -> str:
    """Statements that bring a store made by an earlier release up to SCHEMA (columns it lacks)."""
    have = {row[1] for row in con.execute("PRAGMA table_info(heartbeats)")}
    if have and "paused_keys" not in have:
        return "ALTER TABLE heartbeats ADD COLUMN paused_keys INTEGER NOT NULL DEFAULT 0;\n"
    return ""



_HEARTBEAT_UPSERT = (
    "INSERT INTO heartbeats (worker_id, pid, state, last_bar_time, checkpoint, signals, rejections, errors, ready, "
    "ts, paused_keys) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (worker_id) DO UPDATE SET "
    "pid = excluded.pid, state = excluded.state, last_bar_time = excluded.last_bar_time, "
    "checkpoint = excluded.checkpoint, signals = excluded.signals, rejections = excluded.rejections, "
    "errors = excluded.errors, ready = excluded.ready, ts = excluded.ts, paused_keys = excluded.paused_keys")



def _switch_to_wal(con: sqlite3.Connection) -> None:
    """WAL mode (persistent: once per file). Switching needs the file to itself and SQLite does not
    call the busy handler for it, so processes opening a new store at once retry here instead."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class ControlStore:
    """The control store at `path` (created with its folder on first use). See the module docstring.

    Args:
        path: the SQLite file.
        resources_keep_s: resource samples older than this are pruned when new ones are recorded.
        events_keep: only the newest this many events are kept.
    """

    shared = False  # one manager holds it (a file lock), not one per shard (leases)

    def __init__(self, path: Path | str, *, resources_keep_s: float = 600.0, events_keep: int = 10_000) -> None:
        self.path = Path(path)
        self.resources_keep_s = resources_keep_s
        self.events_keep = events_keep
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connections: list[sqlite3.Connection] = []
        self._schema_ready = False
        self.generation = 0  # moves on when the file was found deleted or replaced, or was quarantined
        self._identity: tuple[int, int] | None = None
        self._checked_at = 0.0
        self._damaged: ControlStoreCorrupt | None = None
        self._probe: int | None = None  # the process's read-only descriptor of the file (`_probe_of`)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ControlStore:
        """The environment's control store: `control.path` resolved against the run's root."""
        return cls(control_path_of(cfg))

    @classmethod
    def for_environment(cls, environment: EnvironmentConfig, root: Path,
                        shard: tuple[int, int] | None = None) -> ControlStore:
        """`control.path` under `root` (one file for every shard: one manager holds it)."""
        return cls(root / environment.control.path)

    def __repr__(self) -> str:
        return f"ControlStore({str(self.path)!r})"

    def __getstate__(self) -> dict:
        # picklable (e.g. in a worker's args): the child opens its own connection
        return {"path": self.path, "resources_keep_s": self.resources_keep_s, "events_keep": self.events_keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], resources_keep_s=state["resources_keep_s"],  # type: ignore[misc]
                      events_keep=state["events_keep"])

    # ---------------------------------------------------------------- connections

    @property
    def con(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use; a fork gets fresh ones). At most every
        IDENTITY_CHECK_S it checks that the file is still the one it opened: a store deleted or
        replaced while in use is reopened (created anew), never written blindly into an unlinked file."""
        if self._pid != os.getpid():  # inherited across a fork: abandon, never close (SQLite's rule)
            self._local, self._connections, self._pid = threading.local(), [], os.getpid()
            self._lock, self._schema_ready, self._probe = threading.Lock(), False, None  # the child opens its own
        if self._damaged is not None:
            raise self._damaged
        local = self._local
        con = getattr(local, "con", None)
        if con is not None and (local.generation != self.generation or self._replaced()):
            with self._lock:
                self._connections.remove(con)
            con.close()
            con = local.con = None
        if con is None:
            generation = self.generation
            con = self._connect()
            local.con, local.generation = con, generation
        return con

    def _replaced(self) -> bool:
        """True (once, for every thread: the generation moves on) when the file at `path` is not the
        one this store opened: deleted, renamed away or replaced. ControlStoreCorrupt when it is the
        same file but no longer starts as a SQLite database (overwritten in place: this connection's
        pages in the WAL would hide it from us, but not from any new reader).

        The header is read through the process's probe descriptor of the file (`_probe_of`), never one
        opened and closed here: that would drop the process's SQLite locks on the file."""
        now = time.monotonic()
        if now < self._checked_at + IDENTITY_CHECK_S:
            return False
        self._checked_at = now
        try:
            st = os.stat(self.path)
            identity = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if identity == self._identity:
            head = os.pread(self._probe, len(_SQLITE_MAGIC), 0) if self._probe is not None else b""
            if head and head != _SQLITE_MAGIC:  # every thread's calls fail from now on, until quarantine()
                self._damaged = ControlStoreCorrupt(f"control store {self.path}: file is not a database "
                                                    "(overwritten)")
                raise self._damaged
            return False
        with self._lock:
            if identity != self._identity:  # another thread may have seen it first
                log.debug("control store %s was %s: opening it anew", self.path,
                            "deleted" if identity is None else "replaced")
                self.generation += 1
                self._identity, self._schema_ready, self._probe = identity, False, None
        return True

    def _connect(self) -> sqlite3.Connection:
        con = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit; transactions are explicit BEGIN IMMEDIATE (see docstring).
            # check_same_thread=False only so close() can close every thread's connection.
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _switch_to_wal(con)
            con.execute("PRAGMA synchronous = NORMAL")
            con.row_factory = sqlite3.Row
            with self._lock:
                if not self._schema_ready:
                    try:  # executescript() would commit an open transaction first: the script holds its own
                        con.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\n{_migrations(con)}COMMIT;")
                    except BaseException:
                        if con.in_transaction:
                            con.execute("ROLLBACK")
                        raise
                    self._schema_ready = True
                self._probe, self._identity = _probe_of(self.path)
                self._checked_at = time.monotonic()
                self._connections.append(con)
            return con
        except OSError as exc:
            if con is not None:
                con.close()
            raise StorageError(f"cannot open control store {self.path}: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            if con is not None:
                con.close()
            raise _storage_error(self.path, exc, " cannot be opened") from exc

    def quarantine(self) -> Path:
        """Move a damaged store aside (with its -wal and -shm files), so that the next use creates a
        new one; returns where it went. For the manager, the store's owner, when it gets
        ControlStoreCorrupt."""
        self.close()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(f"{self.path}{suffix}", f"{target}{suffix}")
            except FileNotFoundError:
                pass
        with self._lock:
            self.generation += 1
            self._identity, self._damaged = None, None
        return target

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the write lock from its first statement."""
        con = self.con
        with _immediate(con):
            yield con

    def close(self) -> None:
        """Close every connection this process opened (any thread's). The store reopens on next use."""
        with self._lock:
            if self._pid == os.getpid():
                for con in self._connections:
                    con.close()
            self._connections, self._local, self._schema_ready, self._probe = [], threading.local(), False, None

    @contextmanager
    def hold(self, shard: tuple[int, int] = (0, 1), run_id: str = "") -> Iterator[None]:
        """One manager per store (any shard): an exclusive flock on `<path>.lock`, which holds the
        manager's pid; SignalgenError naming it when another manager holds it."""
        path = Path(f"{self.path}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise SignalgenError(f"a manager (pid {other}) already runs on {self.path}; `stop` it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def leases(self) -> list[dict]:
        """None: one manager holds this store by a file lock (`hold`), not a lease."""
        return []

    def __enter__(self) -> ControlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_guarded
    def ping(self) -> None:
        """A trivial write (the schema version, rewritten as it is, in a write transaction): StorageError
        when the store cannot be written. What a health check calls."""
        with self._write() as con:
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ---------------------------------------------------------------- instances

    @_guarded
    def upsert_instances(self, rows: list[dict]) -> None:
        """Insert or update `strategy_instances` rows by `id`, in one transaction. A row sets only the
        columns it names (times may be epoch floats or datetimes); `updated_at` is set to now."""
        with self._write() as con:
            _upsert_instances(con, rows)

    def set_instance(self, worker_id: str, **fields: Any) -> None:
        """Set some columns of one instance (inserting the row if it is new)."""
        self.upsert_instances([{"id": worker_id, **fields}])

    @_guarded
    def instances(self) -> list[dict]:
        """Every instance row, by id."""
        return [dict(r) for r in self.con.execute("SELECT * FROM strategy_instances ORDER BY id")]

    @_guarded
    def remove_instance(self, worker_id: str) -> None:
        """Forget a worker (removed by a reload): its instance, heartbeat and resource rows; events stay."""
        with self._write() as con:
            con.execute("DELETE FROM strategy_instances WHERE id = ?", (worker_id,))
            con.execute("DELETE FROM heartbeats WHERE worker_id = ?", (worker_id,))
            con.execute("DELETE FROM resources WHERE worker_id = ?", (worker_id,))

    # ---------------------------------------------------------------- commands

    @_guarded
    def submit(self, command: str, strategy_id: str | None = None, parameters: dict | None = None) -> int:
        """Insert a pending command row; returns its id."""
        cur = self.con.execute(
            f"INSERT INTO strategy_commands (strategy_id, command, parameters_json, status, created_at) "
            f"VALUES (?, ?, ?, 'pending', {_NOW_SQL})", (strategy_id, command, json.dumps(parameters or {})))
        return int(cur.lastrowid or 0)

    @_guarded
    def pending(self) -> list[Command]:
        """Pending commands, oldest first. A row another program wrote with parameters_json that is not a
        JSON object is marked failed here (with the reason) instead of being returned."""
        rows = self.con.execute(f"SELECT {BOUNDED_COLUMNS} FROM strategy_commands WHERE status = 'pending' "
                                "ORDER BY id").fetchall()
        commands = []
        for row in rows:
            try:
                commands.append(command_of_row(row))
            except ValueError as exc:
                self.fail(row["id"], str(exc))
        return commands

    @_guarded
    def complete(self, id: int, result: dict) -> bool:
        """Mark a pending command completed with `result`. False when it was no longer pending."""
        return self._finish(id, "completed", result)

    @_guarded
    def fail(self, id: int, error: str) -> bool:
        """Mark a pending command failed; result_json is {"error": error} (cut to MAX_FIELD_CHARS: an
        error quotes input only in excerpts, this bounds the rest). False when no longer pending."""
        return self._finish(id, "failed", {"error": error[:MAX_FIELD_CHARS]})

    def _finish(self, id: int, status: str, result: dict) -> bool:
        cur = self.con.execute(
            f"UPDATE strategy_commands SET status = ?, processed_at = {_NOW_SQL}, result_json = ? "
            "WHERE id = ? AND status = 'pending'", (status, json.dumps(result, default=str, ensure_ascii=False), id))
        if cur.rowcount == 0:
            self.command(id)  # KeyError when there is no such command
        return cur.rowcount == 1

    @_guarded
    def command(self, id: int) -> Command:
        """One command by id; KeyError when there is none."""
        return found_command(self.con.execute(f"SELECT {BOUNDED_COLUMNS} FROM strategy_commands WHERE id = ?",
                                              (id,)).fetchone(), id)

    wait = wait_command

    # ---------------------------------------------------------------- heartbeats

    @_guarded
    def heartbeat(self, worker_id: str, *, pid: int, state: str, last_bar_time: datetime | str | None,
                  checkpoint: datetime | str | None, signals: int, rejections: int, errors: int,
                  ready: bool, ts: str | None = None, paused_keys: int = 0) -> None:
        """Upsert this worker's heartbeat, `ts` now unless given (one autocommit statement: cheap, lock-safe)."""
        self.con.execute(_HEARTBEAT_UPSERT, heartbeat_row(worker_id, pid, state, last_bar_time, checkpoint, signals,
                                                          rejections, errors, ready, ts, paused_keys))

    @_guarded
    def relay_heartbeats(self, beats: dict[str, dict]) -> None:
        """Upsert heartbeats a worker sent over another channel (the writer's connection: `heartbeat`'s
        fields with their `ts`), all in one transaction. A relayed beat arrives late, so it never replaces
        the final state (STOPPED, EXITED, FATAL) the same process wrote directly as it left."""
        with self._write() as con:
            con.executemany(_HEARTBEAT_UPSERT + " WHERE heartbeats.pid IS NOT excluded.pid OR heartbeats.state "
                            "NOT IN ('STOPPED', 'EXITED', 'FATAL')",
                            [heartbeat_row(wid, **fields) for wid, fields in beats.items()])

    @_guarded
    def heartbeats(self) -> dict[str, dict]:
        """worker id -> its last heartbeat (`ready` as bool, times as ISO text)."""
        out = {}
        for row in self.con.execute("SELECT * FROM heartbeats ORDER BY worker_id"):
            beat = dict(row)
            beat["ready"] = bool(beat["ready"])
            out[beat["worker_id"]] = beat
        return out

    # ---------------------------------------------------------------- a worker's own state

    @_guarded
    def save_worker_state(self, mode: str, worker_id: str, checkpoint: datetime,
                          warmup: list[bytes] | None = None) -> None:
        """Advance a worker's checkpoint in `mode` (never backwards), with the bars its features need
        before it (`warmup`, JSON lines) when given: one statement, so both move together."""
        point = checkpoint.astimezone(timezone.utc).isoformat(timespec="microseconds")
        lines = None if warmup is None else b"\n".join(warmup).decode()
        self.con.execute(
            "INSERT INTO worker_state (mode, worker_id, checkpoint, warmup, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (mode, worker_id) DO UPDATE SET checkpoint = excluded.checkpoint, "
            "warmup = COALESCE(excluded.warmup, worker_state.warmup), updated_at = excluded.updated_at "
            "WHERE excluded.checkpoint >= worker_state.checkpoint", (mode, worker_id, point, lines, now_iso()))

    @_guarded
    def worker_state(self, mode: str, worker_id: str) -> tuple[datetime, list[bytes]] | None:
        """(checkpoint, warm-up bars as JSON lines) of a worker in `mode`, or None."""
        row = self.con.execute("SELECT checkpoint, warmup FROM worker_state WHERE mode = ? AND worker_id = ?",
                               (mode, worker_id)).fetchone()
        if row is None:
            return None
        return datetime.fromisoformat(row[0]), [line.encode() for line in (row[1] or "").splitlines() if line]

    @_guarded
    def worker_states_since(self, updated_at: str) -> list[tuple]:
        """(mode, worker_id, checkpoint, warmup, updated_at) of every worker_state row updated at or
        after `updated_at` (ISO text; '' = all): what a PostgreSQL store's manager mirrors."""
        return [tuple(r) for r in self.con.execute(
            "SELECT mode, worker_id, checkpoint, warmup, updated_at FROM worker_state WHERE updated_at >= ? "
            "ORDER BY updated_at", (updated_at,))]

    @_guarded
    def seed_worker_state(self, rows: list[tuple]) -> None:
        """Rows (mode, worker_id, checkpoint, warmup, updated_at) from a shared store, in one
        transaction; a checkpoint never goes backwards (one this file has that is newer stays)."""
        with self._write() as con:
            con.executemany(
                "INSERT INTO worker_state (mode, worker_id, checkpoint, warmup, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (mode, worker_id) DO UPDATE SET checkpoint = excluded.checkpoint, "
                "warmup = COALESCE(excluded.warmup, worker_state.warmup), updated_at = excluded.updated_at "
                "WHERE excluded.checkpoint > worker_state.checkpoint", rows)

    # ---------------------------------------------------------------- resources and events

    @_guarded
    def record_resources(self, rows: list[tuple[str, float, float, float]]) -> None:
        """Insert one sample per (worker_id, cpu_percent, rss_mb, uss_mb), ts = now; samples older than
        resources_keep_s are pruned in the same transaction."""
        now = time.time()
        ts, cutoff = iso(now), iso(now - self.resources_keep_s)
        with self._write() as con:
            con.executemany("INSERT INTO resources (worker_id, ts, cpu_percent, rss_mb, uss_mb) VALUES (?, ?, ?, ?, ?)",
                            [(w, ts, cpu, rss, uss) for w, cpu, rss, uss in rows])
            con.execute("DELETE FROM resources WHERE ts < ?", (cutoff,))

    @_guarded
    def resources(self, latest_only: bool = True) -> dict[str, dict]:
        """worker id -> its newest sample {ts, cpu_percent, rss_mb, uss_mb}; with latest_only=False, its
        kept history as columns {ts: [...], cpu_percent: [...], rss_mb: [...], uss_mb: [...]}, oldest first."""
        cols = ("ts", "cpu_percent", "rss_mb", "uss_mb")
        if latest_only:
            # newest by rowid, not ts: two samples can share a millisecond
            rows = self.con.execute("SELECT r.* FROM resources r JOIN (SELECT max(rowid) AS rid FROM resources "
                                    "GROUP BY worker_id) m ON r.rowid = m.rid ORDER BY r.worker_id")
            return {r["worker_id"]: {c: r[c] for c in cols} for r in rows}
        out: dict[str, dict] = {}
        for r in self.con.execute("SELECT * FROM resources ORDER BY worker_id, ts, rowid"):
            history = out.setdefault(r["worker_id"], {c: [] for c in cols})
            for c in cols:
                history[c].append(r[c])
        return out

    @_guarded
    def event(self, worker_id: str | None, kind: str, detail: str | dict = "") -> None:
        """Append an event (detail: text, or a dict stored as JSON); only the newest events_keep are kept."""
        text = detail if isinstance(detail, str) else json.dumps(detail, default=str, sort_keys=True)
        with self._write() as con:
            cur = con.execute("INSERT INTO events (ts, worker_id, kind, detail) VALUES (?, ?, ?, ?)",
                              (now_iso(), worker_id, kind, text))
            con.execute("DELETE FROM events WHERE id <= ?", ((cur.lastrowid or 0) - self.events_keep,))

    @_guarded
    def record(self, instances: list[dict], events: list[tuple[str, str | None, str, str]], *,
               manager: tuple[int, str] | None = None) -> None:
        """One transaction of the manager's tick: instance rows (as `upsert_instances`), events as
        (ts, worker_id, kind, detail text), and the manager's own beat (pid, run_id) when given — a
        write every tick, so a store that cannot be written is noticed even when nothing changed."""
        with self._write() as con:
            _upsert_instances(con, instances)
            if events:
                con.executemany("INSERT INTO events (ts, worker_id, kind, detail) VALUES (?, ?, ?, ?)", events)
                con.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?", (self.events_keep,))
            if manager is not None:
                now = now_iso()
                con.execute("INSERT INTO managers (pid, run_id, started_at, ts) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (pid) DO UPDATE SET ts = excluded.ts", (*manager, now, now))

    @_guarded
    def managers(self) -> list[dict]:
        """The managers that wrote this store, newest beat first: pid, run_id, started_at, ts."""
        return [dict(r) for r in self.con.execute("SELECT * FROM managers ORDER BY ts DESC")]

    @_guarded
    def events(self, worker_id: str | None = None, limit: int = 100) -> list[dict]:
        """The newest `limit` events (of one worker, or all), oldest first."""
        where, args = ("WHERE worker_id = ?", [worker_id]) if worker_id is not None else ("", [])
        rows = self.con.execute(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        return [dict(r) for r in reversed(rows.fetchall())]


def _upsert_instances(con: sqlite3.Connection, rows: list[dict]) -> None:
    now = now_iso()
    for row in rows:
        fields = {k: time_value(v) if k in TIME_FIELDS else v for k, v in row.items()}
        fields["updated_at"] = now
        unknown = set(fields) - set(INSTANCE_COLUMNS)
        if unknown or "id" not in fields:
            raise ValueError(f"strategy_instances has no column {', '.join(sorted(unknown))}"
                             if unknown else "an instance row needs its 'id' (the worker id)")
        cols = list(fields)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id")
        con.execute(f"INSERT INTO strategy_instances ({', '.join(cols)}) VALUES "
                    f"({', '.join('?' * len(cols))}) ON CONFLICT (id) DO UPDATE SET {updates}",
                    [fields[c] for c in cols])


@contextmanager
def _immediate(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")

