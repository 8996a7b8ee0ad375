"""The control store: many OS processes writing at once, commands from other programs, results, waiting."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import pytest

from signalgen.config.loader import load_config
from signalgen.errors import StorageError
from signalgen.process.states import State
from signalgen.storage.control import Command, ControlStore, epoch, iso
from signalgen.storage.control.postgres import PostgresControlStore

from ..config.helpers import copy_demo

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def opener(request, tmp_path: Path):
    """A function opening the control store of this test: the SQLite file, or a fresh PostgreSQL
    database (the contract below holds for both; tests of a file's own behaviour use SQLite alone)."""
    if request.param == "sqlite":
        return lambda **kw: ControlStore(tmp_path / "control.sqlite", **kw)
    dsn = request.getfixturevalue("pg_dsn")
    return lambda **kw: PostgresControlStore(dsn, **kw)


def sql(store, statement: str, args: tuple = ()) -> list[tuple]:
    """Run `statement` (`?` placeholders) as another program would, on its own connection; its rows."""
    if isinstance(store, PostgresControlStore):
        import psycopg

        with psycopg.connect(store.dsn, autocommit=True) as con:
            cur = con.execute(statement.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []
    with sqlite3.connect(store.path) as con:
        return con.execute(statement, args).fetchall()


def insert_command(store, columns: str, args: tuple) -> int:
    """A strategy_commands row inserted by another program; its id."""
    return sql(store, f"INSERT INTO strategy_commands ({columns}) VALUES ({', '.join('?' * len(args))}) "
               "RETURNING id", args)[0][0]


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
WRITERS, BEATS, COMMAND_EVERY = 8, 200, 10


def _writer(opener, n: int, barrier, errors) -> None:
    """One writer process: heartbeats, plus a command, an event and an instance update every 10th beat."""
    try:
        store = opener()
        barrier.wait(30)  # all start at once, on a file none has created yet
        wid = f"client.strategy.SYM{n}.5m"
        for i in range(BEATS):
            store.heartbeat(wid, pid=os.getpid(), state="RUNNING", last_bar_time=None, checkpoint=None,
                            signals=i, rejections=2 * i, errors=0, ready=True)
            if i % COMMAND_EVERY == 0:
                store.submit("pause", wid, {"n": n, "i": i})
                store.event(wid, "beat", {"i": i})
                store.set_instance(wid, state="RUNNING", pid=os.getpid(), restarts=i)
        store.close()
    except BaseException:
        errors.put(f"writer {n}: {traceback.format_exc()}")
        raise


def test_concurrent_writers_lose_nothing(opener) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(WRITERS + 1), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(opener, n, barrier, errors)) for n in range(WRITERS)]
    for p in procs:
        p.start()
    barrier.wait(30)
    start = time.perf_counter()
    reader = opener()
    seen = 0
    while any(p.is_alive() for p in procs):  # a reader polling as the manager does, meanwhile
        seen = max(seen, len(reader.pending()))
        procs[-1].join(0.005)
    for p in procs:
        p.join(60)
    elapsed = time.perf_counter() - start
    problems = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert problems == [] and [p.exitcode for p in procs] == [0] * WRITERS, problems

    beats = reader.heartbeats()
    assert sorted(beats) == sorted(f"client.strategy.SYM{n}.5m" for n in range(WRITERS))
    assert {(b["signals"], b["rejections"], b["ready"]) for b in beats.values()} == {(BEATS - 1, 2 * BEATS - 2, True)}
    commands = reader.pending()
    per_writer = BEATS // COMMAND_EVERY
    assert len(commands) == WRITERS * per_writer == len({c.id for c in commands})
    assert sorted((c.parameters["n"], c.parameters["i"]) for c in commands) == sorted(
        (n, i) for n in range(WRITERS) for i in range(0, BEATS, COMMAND_EVERY))
    assert len(reader.events(limit=10_000)) == WRITERS * per_writer
    assert {r["restarts"] for r in reader.instances()} == {BEATS - COMMAND_EVERY}
    writes = WRITERS * (BEATS + 3 * per_writer)
    print(f"\n{WRITERS} processes: {writes} writes in {elapsed:.2f} s = {writes / elapsed:,.0f} writes/s "
          f"(reader saw up to {seen} pending)")


def test_a_command_inserted_by_another_program_is_pending(opener) -> None:
    store = opener()
    assert store.pending() == []  # creates the tables, as the manager does at start
    sql = ("INSERT INTO strategy_commands (strategy_id, command, status) "
           "VALUES ('ikenna.swing_high_v1.*', 'pause', 'pending');")
    if isinstance(store, PostgresControlStore):  # the operator's tool
        subprocess.run(["psql", store.dsn, "-c", sql], check=True, timeout=30, capture_output=True)
    elif shutil.which("sqlite3"):  # the operator's tool
        subprocess.run(["sqlite3", str(store.path), sql], check=True, timeout=30)
    else:  # any other program writing plain SQL
        subprocess.run([sys.executable, "-c", f"import sqlite3; c = sqlite3.connect({str(store.path)!r}); "
                        f"c.execute({sql!r}); c.commit()"], check=True, timeout=30)
    [cmd] = store.pending()
    assert (cmd.strategy_id, cmd.command, cmd.parameters, cmd.status, cmd.processed_at, cmd.result) == (
        "ikenna.swing_high_v1.*", "pause", {}, "pending", None, None)
    assert ISO.match(cmd.created_at) and abs(epoch(cmd.created_at) - time.time()) < 60


def test_a_row_with_bad_parameters_fails_instead_of_crashing_the_reader(opener) -> None:
    store = opener()
    good = store.submit("resume", "a.b.C.5m")
    for params in ("[1", "[1]"):
        insert_command(store, "strategy_id, command, parameters_json", ("x", "pause", params))
    assert [c.id for c in store.pending()] == [good]
    bad = store.command(good + 1)
    assert bad.status == "failed" and bad.result == {"error": "parameters_json is not a JSON object: '[1'"}
    assert store.command(good + 2).result == {"error": "parameters_json is not a JSON object: '[1]'"}


HOSTILE_ROWS = {  # (strategy_id, command, parameters_json, created_at or None for the default) -> reason
    "deep": ("x", "pause", "[" * 2000 + "]" * 2000, None),
    "deep_object": ("x", "add-strategy", '{"a":' * 40 + "1" + "}" * 40, None),
    "big_params": ("x", "add-strategy", '{"config": "' + "y" * (64 * 1024) + '"}', None),
    "big_id": ("x" * 5_000_000, "pause", "{}", None),
    "big_command": ("x", "p" * 5000, "{}", None),
    "yesterday": ("x", "pause", "{}", "yesterday"),
    "blob_command": ("x", b"pause", "{}", None),
    "blob_id": (b"odum.*", "pause", "{}", None),  # TEXT affinity turns numbers into text, not blobs
    "blob_params": ("x", "pause", b"{}", None),
}
REASONS = {"deep": "nests deeper than 32 levels", "deep_object": "nests deeper than 32 levels",
           "big_params": "over the limit of 65,536 bytes", "big_id": "strategy_id is 5,000,000 characters, over the limit of 4,096",
           "big_command": "command is 5,000 characters", "yesterday": "created_at is not an ISO 8601 time: 'yesterday'",
           "blob_command": "command is bytes, not text", "blob_id": "strategy_id is bytes, not text",
           "blob_params": "parameters_json is bytes"}


def test_hostile_rows_fail_with_a_bounded_reason_and_the_good_ones_stay_pending(opener) -> None:
    # each of these crashed or stalled the manager, or would echo megabytes: a deep array raised
    # RecursionError in pending(), 'yesterday' a ValueError at the manager's start
    store = opener()
    first = store.submit("resume", "a.b.C.5m")
    ids = {}
    for name, (sid, command, params, created) in HOSTILE_ROWS.items():
        if isinstance(store, PostgresControlStore) and name.startswith("blob_"):
            continue  # the server refuses a bytea value in a text column: such a row cannot exist
        cols = "strategy_id, command, parameters_json" + (", created_at" if created else "")
        ids[name] = insert_command(store, cols, (sid, command, params) + ((created,) if created else ()))
    last = store.submit("pause", "a.b.C.5m")
    assert [c.id for c in store.pending()] == [first, last]
    for name, cid in ids.items():
        cmd = store.command(cid)
        assert cmd.status == "failed", name
        error = cmd.result["error"]
        assert REASONS[name] in error, (name, error)
        assert len(error) < 400, (name, len(error))  # an excerpt of the input at most, never the input
    assert store.pending() == store.pending()  # nothing new fails: the bad rows are done with


def test_complete_and_fail_set_processed_at_and_result(opener) -> None:
    store = opener()
    a = store.submit("pause", "w1", {"why": "test"})
    b = store.submit("restart", "nope")
    c = store.submit("stop")
    assert [x.id for x in store.pending()] == [a, b, c]
    assert store.complete(a, {"paused": ["w1"]}) is True
    assert store.fail(b, "no worker matches 'nope'") is True
    assert [x.id for x in store.pending()] == [c]
    done, failed = store.command(a), store.command(b)
    assert (done.status, done.result, done.parameters) == ("completed", {"paused": ["w1"]}, {"why": "test"})
    assert (failed.status, failed.result, failed.strategy_id) == ("failed", {"error": "no worker matches 'nope'"}, "nope")
    assert ISO.match(done.processed_at) and done.created_at <= done.processed_at
    assert store.complete(a, {"again": True}) is False and store.command(a).result == {"paused": ["w1"]}
    assert store.fail(a, "late") is False and store.command(a).status == "completed"
    with pytest.raises(KeyError, match="no command with id 999"):
        store.complete(999, {})
    with pytest.raises(KeyError):
        store.command(999)
    # what an operator reads back with sqlite3 or psql
    error = "result_json::json->>'error'" if isinstance(store, PostgresControlStore) else "json_extract(result_json, '$.error')"
    assert sql(store, f"SELECT status, {error} FROM strategy_commands WHERE id = ?", (b,)) == [
        ("failed", "no worker matches 'nope'")]


def _complete_later(opener, command_id: int, delay: float) -> None:
    time.sleep(delay)  # stands for the manager's poll interval
    opener().complete(command_id, {"by": os.getpid()})


def test_wait_returns_when_another_process_completes(opener) -> None:
    store = opener()
    cid = store.submit("pause", "w1")
    proc = multiprocessing.get_context("fork").Process(target=_complete_later, args=(opener, cid, 0.3))
    start = time.monotonic()
    proc.start()
    cmd = store.wait(cid, timeout=10)
    took = time.monotonic() - start
    proc.join(10)
    assert cmd.status == "completed" and cmd.result == {"by": proc.pid}
    assert 0.3 <= took < 5


def test_wait_gives_the_pending_command_back_after_the_timeout(opener) -> None:
    store = opener()
    cid = store.submit("pause", "w1")
    start = time.monotonic()
    cmd = store.wait(cid, timeout=0.2)
    assert cmd.status == "pending" and 0.2 <= time.monotonic() - start < 2


def test_from_config_resolves_against_root(tmp_path: Path) -> None:
    root = copy_demo(tmp_path / "demo")
    cfg = load_config("local-dev", "mock", root=root)
    store = ControlStore.from_config(cfg)
    assert store.path == root.resolve() / "var" / "local-dev" / "control.sqlite"
    store.submit("stop")  # creates the folder and the file
    assert store.path.is_file()
    other = tmp_path / "elsewhere" / "c.sqlite"
    env = root / "environments" / "local-integration.yaml"
    env.write_text(env.read_text().replace("path: var/local-integration/control.sqlite", f"path: {other}"))
    assert ControlStore.from_config(load_config("local-integration", "mock", root=root)).path == other


def test_instances_upsert_only_the_columns_given(opener) -> None:
    store = opener()
    store.upsert_instances([
        {"id": "a.s.X.5m", "client": "a", "strategy": "s", "symbol": "X", "timeframe": "5m", "mode": "mock",
         "config_hash": "h1", "state": State.STARTING, "pid": 11, "started_at": 1_700_000_000.25},
        {"id": "a.s.Y.5m", "client": "a", "state": "STOPPED"},
    ])
    store.set_instance("a.s.X.5m", state=State.RUNNING, state_since=datetime(2025, 1, 1, tzinfo=timezone.utc),
                       restarts=2)
    x, y = store.instances()
    assert (x["id"], x["state"], x["pid"], x["config_hash"], x["restarts"], x["failures"]) == (
        "a.s.X.5m", "RUNNING", 11, "h1", 2, 0)
    assert (x["started_at"], x["state_since"]) == ("2023-11-14T22:13:20.250Z", "2025-01-01T00:00:00.000Z")
    assert ISO.match(x["updated_at"]) and y["state"] == "STOPPED" and y["pid"] is None
    with pytest.raises(ValueError, match="no column colour"):
        store.set_instance("a.s.X.5m", colour="red")
    with pytest.raises(ValueError, match="needs its 'id'"):
        store.upsert_instances([{"state": "RUNNING"}])
    store.heartbeat("a.s.X.5m", pid=11, state="RUNNING", last_bar_time=None, checkpoint=None, signals=0,
                    rejections=0, errors=0, ready=False)
    store.record_resources([("a.s.X.5m", 1.0, 50.0, 20.0)])
    store.event("a.s.X.5m", "removed", "by reload")
    store.remove_instance("a.s.X.5m")
    assert [r["id"] for r in store.instances()] == ["a.s.Y.5m"]
    assert store.heartbeats() == {} and store.resources() == {}
    assert [e["kind"] for e in store.events("a.s.X.5m")] == ["removed"]  # history stays


def test_heartbeat_is_an_upsert_with_times_as_text(opener) -> None:
    store = opener()
    bar = datetime(2025, 1, 1, 0, 5, tzinfo=timezone.utc)
    for signals in (1, 2):
        store.heartbeat("w", pid=7, state=State.RUNNING, last_bar_time=bar, checkpoint="2025-01-01T00:00:00.000Z",
                        signals=signals, rejections=3, errors=1, ready=True)
    beat = store.heartbeats()["w"]
    assert {k: v for k, v in beat.items() if k != "ts"} == {
        "worker_id": "w", "pid": 7, "state": "RUNNING", "last_bar_time": "2025-01-01T00:05:00.000Z",
        "checkpoint": "2025-01-01T00:00:00.000Z", "signals": 2, "rejections": 3, "errors": 1, "ready": True, "paused_keys": 0}
    assert abs(epoch(beat["ts"]) - time.time()) < 60


def test_resources_latest_history_and_pruning(opener) -> None:
    store = opener(resources_keep_s=60)
    store.pending()  # a sample from two minutes ago: pruned by the next record
    sql(store, "INSERT INTO resources (worker_id, ts, cpu_percent, rss_mb, uss_mb) VALUES ('w1', ?, 9.0, 9.0, 9.0)",
        (iso(time.time() - 120),))
    store.record_resources([("w1", 10.0, 100.0, 30.0), ("w2", 5.0, 80.0, 25.0)])
    store.record_resources([("w1", 12.5, 101.0, 31.0)])
    latest = store.resources()
    assert {w: (r["cpu_percent"], r["rss_mb"], r["uss_mb"]) for w, r in latest.items()} == {
        "w1": (12.5, 101.0, 31.0), "w2": (5.0, 80.0, 25.0)}
    history = store.resources(latest_only=False)
    assert history["w1"]["cpu_percent"] == [10.0, 12.5] and history["w2"]["uss_mb"] == [25.0]
    assert all(ISO.match(t) for t in history["w1"]["ts"])


def test_events_keep_the_newest_and_filter_by_worker(opener) -> None:
    store = opener(events_keep=4)
    for i in range(6):
        store.event(f"w{i % 2}", "restart", {"attempt": i})
    store.event(None, "manager", "started")
    kept = store.events()
    assert [e["detail"] for e in kept] == ['{"attempt": 3}', '{"attempt": 4}', '{"attempt": 5}', "started"]
    assert [e["detail"] for e in store.events("w1")] == ['{"attempt": 3}', '{"attempt": 5}']
    assert [e["detail"] for e in store.events(limit=1)] == ["started"]


def _use_inherited(store: ControlStore, result) -> None:
    store.submit("from-child")
    result.put(len(store.pending()))


def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.sqlite")
    store.submit("from-parent")  # the parent's connection is open across the fork
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(store, result))
    child.start()
    assert result.get(timeout=30) == 2
    child.join(30)
    assert child.exitcode == 0
    assert [c.command for c in store.pending()] == ["from-parent", "from-child"]
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path and [c.command for c in clone.pending()] == ["from-parent", "from-child"]


def test_threads_each_get_a_connection_and_close_closes_them(tmp_path: Path) -> None:
    import threading
    store = ControlStore(tmp_path / "control.sqlite")
    ids: list[int] = []
    threads = [threading.Thread(target=lambda: ids.append(store.submit("t"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == [1, 2, 3, 4]
    store.close()
    assert len(store.pending()) == 4  # reopens on use


def test_an_unwritable_path_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = ControlStore(blocker / "control.sqlite")
    with pytest.raises(StorageError, match=f"cannot open control store {re.escape(str(store.path))}"):
        store.submit("stop")


def test_wal_mode_and_busy_timeout(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.sqlite")
    assert store.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.con.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert isinstance(store.pending(), list) and Command.__dataclass_fields__.keys() == {
        "id", "strategy_id", "command", "parameters", "status", "created_at", "processed_at", "result"}


def test_iso_and_epoch_round_trip() -> None:
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(datetime(2025, 1, 1, 12)) == "2025-01-01T12:00:00.000Z"  # naive means UTC
    assert epoch("2025-01-01T12:00:00.500Z") == datetime(2025, 1, 1, 12, tzinfo=timezone.utc).timestamp() + 0.5
    assert epoch(iso(1_700_000_000.123)) == pytest.approx(1_700_000_000.123, abs=1e-3)


def test_checking_the_file_keeps_this_processs_sqlite_locks(tmp_path: Path) -> None:
    # the check of the file's header opened and closed it: closing any descriptor of a file drops the
    # process's POSIX locks on it, SQLite's included, so another process closing its connection took
    # itself for the last one, checkpointed and deleted the WAL under the manager ('database disk
    # image is malformed', unanswered commands)
    path = tmp_path / "control.sqlite"
    mine, other_store = ControlStore(path), ControlStore(path)
    mine.event(None, "kept", "in the WAL")
    other_store.pending()
    other_store._checked_at = 0.0
    assert other_store._replaced() is False  # a look at the file by another store of this process
    other_store.close()
    code = f"import sqlite3; c = sqlite3.connect({str(path)!r}); c.execute('SELECT count(*) FROM events'); c.close()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert Path(f"{path}-wal").exists()  # this process still holds the store open: nobody deletes its WAL
    mine.event(None, "after", "another process came and went")
    assert [e["kind"] for e in mine.events()] == ["kept", "after"]
    mine.close()


def test_paused_ordering_keys_travel_with_the_heartbeat_and_an_older_store_gets_the_column(tmp_path: Path) -> None:
    """A Pub/Sub worker's paused ordering keys reach the control store (and `status`); a store made
    before the column existed is migrated when opened."""
    import sqlite3

    from signalgen.report import status_table

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:  # the heartbeats table as an earlier release made it
        con.execute("CREATE TABLE heartbeats (worker_id TEXT PRIMARY KEY, pid INTEGER, state TEXT, last_bar_time "
                    "TEXT, checkpoint TEXT, signals INTEGER NOT NULL DEFAULT 0, rejections INTEGER NOT NULL DEFAULT "
                    "0, errors INTEGER NOT NULL DEFAULT 0, ready INTEGER NOT NULL DEFAULT 0, ts TEXT NOT NULL)")
        con.execute("INSERT INTO heartbeats (worker_id, pid, state, ts) VALUES ('a.s.X.5m', 1, 'RUNNING', 'now')")
    with ControlStore(path) as store:
        assert store.heartbeats()["a.s.X.5m"]["paused_keys"] == 0
        store.heartbeat("a.s.X.5m", pid=2, state="RUNNING", last_bar_time=None, checkpoint=None, signals=0,
                        rejections=0, errors=0, ready=True, paused_keys=3)
        assert store.heartbeats()["a.s.X.5m"]["paused_keys"] == 3
    row = {"worker": "a.s.X.5m", "state": "RUNNING", "pid": 2, "uptime_s": 1.0, "last_heartbeat_s": 0.5,
           "signals": 0, "rejections": 0, "errors": 0, "restarts": 0, "exit_code": None, "checkpoint": None,
           "reason": "ready", "paused_keys": 3}
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(status_table([row], "manager: pid 1"))
    assert "a.s.X.5m: 3 Pub/Sub ordering key(s) paused, publishing retried" in console.export_text()
