"""DuckDB-only behaviour: the file, its lock, its column types, migrations of old files and the
newest-bar shortcut. What every store does is the contract suite's (test_store_contract.py)."""

from __future__ import annotations

import multiprocessing
import os
from datetime import UTC, datetime

import duckdb
import polars as pl
import pytest

from signalgen.errors import TransientError
from signalgen.storage.base import OWNER_FIELDS, RUN_SCHEMA, RunRecord
from signalgen.storage.duckdb import DuckDBStore, sql_type
from tests.unit.outputs.factories import rejection_frame, signal_frame
from tests.unit.storage.store_fixtures import hold_read_only, try_open_store


@pytest.fixture
def store(tmp_path):
    with DuckDBStore(tmp_path / "deep" / "er" / "signals.duckdb") as s:
        yield s


def test_open_creates_parent_folders_and_is_idempotent(tmp_path):
    path = tmp_path / "a" / "b" / "s.duckdb"
    with DuckDBStore(path) as s:
        s.write_signals(signal_frame(4))
    with DuckDBStore(path) as s:  # schema creation again: no error, data kept
        assert s.count("signals") == 4
        assert set(s.query("SELECT table_name FROM information_schema.tables")["table_name"]) == {
            "signals", "rejections", "bar_rejections", "runs", "superseded_signals", "superseded_rejections",
            "worker_checkpoints", "signal_revisions"}


def test_column_types(store):
    """(That rows round-trip is the store contract's, tests/unit/storage/test_store_contract.py.)"""
    store.write_signals(signal_frame(20))
    types = dict(store.query("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name IN ('signals', 'rejections') AND column_name IN "
                             "('models', 'reasons', 'bar_time')").iter_rows())
    assert types["models"].startswith("STRUCT(") and types["models"].endswith(")[]")
    assert types["reasons"] == "VARCHAR[]"
    assert types["bar_time"] == "TIMESTAMP WITH TIME ZONE"


def test_failed_write_rolls_back(store):
    store.write_signals(signal_frame(10))
    # A constraint the INSERT half will break, after the DELETE half has run.
    store.con.execute("ALTER TABLE signals ALTER COLUMN period SET NOT NULL")
    bad = signal_frame(10).with_columns(weight=pl.lit(0.5), period=pl.lit(None, pl.Int32))
    with pytest.raises(duckdb.ConstraintException):
        store.write_signals(bad)
    assert store.count("signals") == 10
    assert store.count("signals", weight=0.5) == 0


def test_closed_store_refuses_work(tmp_path):
    s = DuckDBStore(tmp_path / "s.duckdb")
    with pytest.raises(RuntimeError, match="open"):
        s.count("signals")


def test_second_process_gets_transient_error_naming_the_lock(tmp_path):
    path = tmp_path / "locked.duckdb"
    ctx = multiprocessing.get_context("spawn")  # a fork would share this process's open database
    with DuckDBStore(path) as store:
        store.write_signals(signal_frame(3))
        results = ctx.Queue()
        child = ctx.Process(target=try_open_store, args=(str(path), results))
        child.start()
        kind, message = results.get(timeout=60)
        child.join(timeout=30)
    assert kind == TransientError.__name__
    assert str(path) in message and "locked by another process" in message
    assert f"pid {os.getpid()}" in message
    # Once the writer has gone, the next one gets in.
    child = ctx.Process(target=try_open_store, args=(str(path), results))
    child.start()
    assert results.get(timeout=60) == ("ok", "3")
    child.join(timeout=30)


def test_a_store_from_before_modes_gets_bar_rejection_modes_from_its_runs(tmp_path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # bar_rejections as it was, and the run that wrote it
        con.execute("CREATE TABLE bar_rejections (symbol VARCHAR, timeframe VARCHAR, "
                    "bar_time TIMESTAMPTZ, reason VARCHAR, detail VARCHAR, run_id VARCHAR)")
        con.execute("INSERT INTO bar_rejections VALUES ('AAPL', '5m', '2024-03-01 00:00:00+00', 'gap', '', 'r1')")
        cols = ", ".join(f'"{c}" {sql_type(t)}' for c, t in RUN_SCHEMA.items())
        con.execute(f"CREATE TABLE runs ({cols})")
        con.execute("INSERT INTO runs (run_id, mode, status) VALUES ('r1', 'mock', 'ok')")
    with DuckDBStore(path) as s:
        assert s.count("bar_rejections", mode="mock", run_id="r1") == 1


def test_a_store_from_before_run_provenance_gets_its_columns_and_keeps_its_runs(tmp_path):
    """Before: a store created by an older version kept its `runs` table as it was, and recording a run
    with provenance failed (no such column)."""
    path = tmp_path / "old.duckdb"
    old = {c: t for c, t in RUN_SCHEMA.items()  # nor the columns that came after them
           if c not in ("data_source", "seed", "data_files", "config", *OWNER_FIELDS, "shard")}
    with duckdb.connect(str(path)) as con:
        cols = ", ".join(f'"{c}" {sql_type(t)}' for c, t in old.items())
        con.execute(f"CREATE TABLE runs ({cols})")
        con.execute("INSERT INTO runs (run_id, mode, status, bars) VALUES ('old', 'historical', 'ok', 12)")
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    with DuckDBStore(path) as s:
        s.start_run(RunRecord(run_id="new", config_hash="h", mode="mock", environment="local-dev", start=t0, end=t0,
                              started_at=t0, clients=[], data_source="synthetic", seed=3, config={"seed": 3}))
        rows = {r["run_id"]: r for r in s.query("SELECT * FROM runs").iter_rows(named=True)}
        assert list(s.query("SELECT * FROM runs").columns) == list(RUN_SCHEMA.names())
    assert rows["old"]["bars"] == 12 and rows["old"]["data_source"] is None and rows["old"]["config"] is None
    assert (rows["new"]["data_source"], rows["new"]["seed"], rows["new"]["config"]) == ("synthetic", 3, '{"seed": 3}')


def test_a_store_from_before_run_owners_gets_their_columns_and_abandons_its_unfinished_runs(tmp_path):
    """A run recorded before owners were has none: this store holds the file alone, so its writer is gone."""
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        cols = ", ".join(f'"{c}" {sql_type(t)}' for c, t in RUN_SCHEMA.items()
                         if c not in (*OWNER_FIELDS, "shard"))  # shards came after owners
        con.execute(f"CREATE TABLE runs ({cols})")
        con.execute("INSERT INTO runs (run_id, mode, status) VALUES ('done', 'mock', 'ok'), ('killed', 'mock', NULL)")
    with DuckDBStore(path) as s:
        assert list(s.query("SELECT * FROM runs").columns) == list(RUN_SCHEMA.names())
        assert s.abandon_stale_runs(datetime(2025, 1, 1, tzinfo=UTC)) == ["killed"]
        assert s.count("runs", status="ok") == 1


def test_a_writer_waits_out_a_reader_holding_the_file_for_one_query(tmp_path):
    # Without the wait, a run started while `signals list` held the file exited 75 (TransientError).
    path = tmp_path / "read.duckdb"
    with DuckDBStore(path) as s:
        s.write_signals(signal_frame(3))
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    reader = ctx.Process(target=hold_read_only, args=(str(path), 0.5, ready))
    reader.start()
    assert ready.get(timeout=60) == "held"
    with DuckDBStore(path, lock_wait_s=10) as s:  # gets in once the reader lets go
        assert s.count("signals") == 3
    reader.join(timeout=30)
    with pytest.raises(TransientError, match="locked by another process"):
        reader = ctx.Process(target=hold_read_only, args=(str(path), 3, ready))
        reader.start()
        assert ready.get(timeout=60) == "held"
        try:
            DuckDBStore(path, lock_wait_s=0.2).open()  # a holder that stays: the wait is bounded
        finally:
            reader.join(timeout=30)


def _decision_keys(store) -> pl.DataFrame:
    return store.query("SELECT client_id, strategy_id, symbol, timeframe, bar_time, mode FROM signals UNION ALL "
                       "SELECT client_id, strategy_id, symbol, timeframe, bar_time, mode FROM rejections")


def test_bars_newer_than_any_stored_skip_the_replace_and_older_ones_still_replace(tmp_path, monkeypatch):
    path = tmp_path / "s.duckdb"
    df = rejection_frame(40, symbols=("AAPL", "MSFT"))  # 20 bars of each worker
    replaced: list[int] = []
    monkeypatch.setattr(DuckDBStore, "_replace_stored", lambda self, keys, real=DuckDBStore._replace_stored:
                        (replaced.append(keys.height), real(self, keys)))
    with DuckDBStore(path) as s:
        s.write_rejections(df.head(20))
        s.write_rejections(df.slice(20, 10))  # every bar newer than its worker's newest: no probe, no delete
        assert replaced == []
        s.write_rejections(df.slice(16, 10))  # a replay overlapping the newest bars: replaced
        assert replaced == [10]
        assert s.count("rejections") == 30
    with DuckDBStore(path) as s:  # reopened: the newest bars are read from the file, not assumed absent
        s.write_rejections(df.slice(24, 16).with_columns(run_id=pl.lit("run-2")))
        assert replaced == [10, 16]
        assert s.count("rejections") == 40 and s.count("rejections", run_id="run-2") == 16
        assert not _decision_keys(s).is_duplicated().any()


def test_a_group_of_fresh_and_replayed_workers_replaces_only_the_replayed_bars(store, monkeypatch):
    a = rejection_frame(6, symbols=("AAPL",), client_id="ada")
    b = signal_frame(6, symbols=("MSFT",), client_id="bea")
    store.write_decisions(b.head(3), a.head(3))
    replaced: list[pl.DataFrame] = []
    monkeypatch.setattr(DuckDBStore, "_replace_stored", lambda self, keys, real=DuckDBStore._replace_stored:
                        (replaced.append(keys), real(self, keys)))
    # ada replays its last bar and goes on; bea is a new worker in mock mode: nothing of it stored
    store.write_decisions(b.with_columns(mode=pl.lit("mock")), a.slice(2, 4))
    assert [set(k["client_id"]) for k in replaced] == [{"ada"}]
    assert store.count("rejections") == 6 and store.count("signals") == 9
    assert not _decision_keys(store).is_duplicated().any()


def test_a_failed_write_does_not_move_the_newest_stored_bar(store):
    df = signal_frame(10, symbols=("AAPL",))
    store.write_signals(df.head(5))
    store.con.execute("ALTER TABLE signals ALTER COLUMN period SET NOT NULL")
    with pytest.raises(duckdb.ConstraintException):
        store.write_signals(df.with_columns(period=pl.lit(None, pl.Int32)))
    store.con.execute("ALTER TABLE signals ALTER COLUMN period DROP NOT NULL")
    store.write_signals(df)  # bars 0-4 stored, 5-9 not: the replay must replace 0-4, not add them again
    assert store.count("signals") == 10