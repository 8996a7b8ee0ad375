from __future__ import annotations

import json
import multiprocessing
import os
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.data.schema import BAR_REJECTION_SCHEMA
from signalgen.errors import TransientError
from signalgen.signals.types import SIGNAL_SCHEMA
from signalgen.storage.base import FINISH_FIELDS, RUN_SCHEMA, RunRecord
from signalgen.storage.duckdb import DuckDBStore, sql_type
from tests.unit.outputs.factories import START, rejection_frame, signal_frame
from tests.unit.storage.store_fixtures import hold_read_only, try_open_store


@pytest.fixture
def store(tmp_path):
    with DuckDBStore(tmp_path / "deep" / "er" / "signals.duckdb") as s:
        yield s


def _bar_rejections(n: int, run_id: str | None = "run-1") -> pl.DataFrame:
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    df = pl.DataFrame({
        "symbol": ["AAPL"] * n,
        "timeframe": ["5m"] * n,
        "bar_time": [t0 + timedelta(minutes=5 * i) for i in range(n)],
        "reason": ["gap" if i % 2 else "non_finite" for i in range(n)],
        "detail": [f"row {i}" for i in range(n)],
    }).cast(dict(BAR_REJECTION_SCHEMA))
    return df if run_id is None else df.with_columns(run_id=pl.lit(run_id))


def test_open_creates_parent_folders_and_is_idempotent(tmp_path):
    path = tmp_path / "a" / "b" / "s.duckdb"
    with DuckDBStore(path) as s:
        s.write_signals(signal_frame(4))
    with DuckDBStore(path) as s:  # schema creation again: no error, data kept
        assert s.count("signals") == 4
        assert set(s.query("SELECT table_name FROM information_schema.tables")["table_name"]) == {
            "signals", "rejections", "bar_rejections", "runs", "superseded_signals", "superseded_rejections",
            "worker_checkpoints", "signal_revisions"}


def test_signals_round_trip_keeps_types(store):
    df = signal_frame(20)
    assert store.write_signals(df) == 20
    back = store.query("SELECT * FROM signals ORDER BY signal_id")
    assert back.schema == SIGNAL_SCHEMA
    assert_frame_equal(back, df.sort("signal_id"))
    types = dict(store.query("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name IN ('signals', 'rejections') AND column_name IN "
                             "('models', 'reasons', 'bar_time')").iter_rows())
    assert types["models"].startswith("STRUCT(") and types["models"].endswith(")[]")
    assert types["reasons"] == "VARCHAR[]"
    assert types["bar_time"] == "TIMESTAMP WITH TIME ZONE"


def test_writing_the_same_batch_twice_leaves_the_same_rows(store):
    df = signal_frame(50)
    store.write_signals(df)
    store.write_signals(df)
    assert store.count("signals") == 50
    assert_frame_equal(store.query("SELECT * FROM signals ORDER BY signal_id"), df.sort("signal_id"))


def test_rewrite_replaces_changed_values(store):
    df = signal_frame(30)
    store.write_signals(df)
    changed = df.head(10).with_columns(confidence=pl.lit(0.99), run_id=pl.lit("run-2"))
    store.write_signals(changed)
    assert store.count("signals") == 30
    assert store.count("signals", run_id="run-2", confidence=0.99) == 10
    assert store.count("signals", run_id="run-1") == 20


def test_duplicate_ids_within_one_batch_keep_the_last(store):
    df = signal_frame(5)
    dup = pl.concat([df, df.with_columns(weight=pl.lit(0.125))])
    assert store.write_signals(dup) == 5
    assert store.count("signals", weight=0.125) == 5


def test_rejections_upsert_and_keep_reason_lists(store):
    df = rejection_frame(40)
    store.write_rejections(df)
    store.write_rejections(df.with_columns(run_id=pl.lit("run-2")))
    assert store.count("rejections") == 40
    assert store.count("rejections", run_id="run-2") == 40
    back = store.query("SELECT * FROM rejections ORDER BY rejection_id")
    assert_frame_equal(back, df.with_columns(run_id=pl.lit("run-2")).sort("rejection_id"))
    two = store.query("SELECT count(*) AS n FROM rejections WHERE len(reasons) = 2")["n"].item()
    assert two == df.filter(pl.col("reasons").list.len() == 2).height > 0


def test_bar_rejections_upsert_by_symbol_timeframe_time_reason_mode(store):
    store.write_bar_rejections(_bar_rejections(6, run_id=None), run_id="run-1", mode="historical")
    store.write_bar_rejections(_bar_rejections(6, run_id="run-2"), mode="historical")
    assert store.count("bar_rejections") == 6
    assert store.count("bar_rejections", run_id="run-2") == 6
    other_reason = _bar_rejections(1).with_columns(reason=pl.lit("high_below_low"))
    store.write_bar_rejections(other_reason, mode="historical")  # same bar, another reason: a new row
    assert store.count("bar_rejections") == 7
    with pytest.raises(ValueError, match="run_id"):
        store.write_bar_rejections(_bar_rejections(1, run_id=None), mode="historical")
    with pytest.raises(ValueError, match="mode"):
        store.write_bar_rejections(_bar_rejections(1))


def test_a_mock_run_leaves_historical_bar_rejections_alone(store):
    store.write_bar_rejections(_bar_rejections(6, run_id="hist"), mode="historical")
    store.write_bar_rejections(_bar_rejections(6, run_id="mock"), mode="mock")
    assert store.count("bar_rejections", mode="historical", run_id="hist") == 6
    assert store.count("bar_rejections", mode="mock", run_id="mock") == 6


def test_frames_off_schema_are_refused(store):
    with pytest.raises(ValueError, match="missing \\['weight'\\]"):
        store.write_signals(signal_frame(3).drop("weight"))
    with pytest.raises(ValueError, match="direction"):
        store.write_signals(signal_frame(3).with_columns(pl.col("direction").cast(pl.Int64)))
    assert store.write_signals(signal_frame(0)) == 0
    assert store.count("signals") == 0


def test_failed_write_rolls_back(store):
    store.write_signals(signal_frame(10))
    # A constraint the INSERT half will break, after the DELETE half has run.
    store.con.execute("ALTER TABLE signals ALTER COLUMN period SET NOT NULL")
    bad = signal_frame(10).with_columns(weight=pl.lit(0.5), period=pl.lit(None, pl.Int32))
    with pytest.raises(duckdb.ConstraintException):
        store.write_signals(bad)
    assert store.count("signals") == 10
    assert store.count("signals", weight=0.5) == 0


def test_runs_round_trip(store):
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    run = RunRecord(run_id="run-9", config_hash="abc123", mode="historical", environment="local-dev",
                    start=t0, end=t0 + timedelta(days=30), started_at=datetime(2025, 5, 1, 12, tzinfo=UTC),
                    clients=["ikenna", "zara"])
    store.start_run(run)
    store.start_run(run)  # a restarted recorder: still one row
    assert store.count("runs") == 1
    assert store.count("runs", status=None) == 1
    store.finish_run("run-9", finished_at=datetime(2025, 5, 1, 12, 5, tzinfo=UTC), status="ok", bars=1_000,
                     signals=40, rejections=900, bar_rejections=3, elapsed_s=2.5, bars_per_s=400.0,
                     peak_rss_mb=312.5, rejections_by_reason={"below_confidence": 800, "no_consensus": 100})
    row = store.query("SELECT * FROM runs").row(0, named=True)
    assert row["clients"] == ["ikenna", "zara"]
    assert row["start"] == t0 and row["end"] == t0 + timedelta(days=30)
    assert row["status"] == "ok" and row["bars"] == 1_000 and row["peak_rss_mb"] == 312.5
    assert json.loads(row["rejections_by_reason"]) == {"below_confidence": 800, "no_consensus": 100}
    assert set(FINISH_FIELDS) == set(row) - {"run_id", "config_hash", "mode", "environment", "start",
                                             "end", "started_at", "clients", "data_source", "seed",
                                             "data_files", "config"}
    with pytest.raises(ValueError, match="unknown run fields"):
        store.finish_run("run-9", colour="red")
    with pytest.raises(KeyError):
        store.finish_run("never", status="failed")


def test_count_rejects_unknown_tables_and_columns(store):
    with pytest.raises(ValueError, match="unknown table"):
        store.count("signals; DROP TABLE runs")
    with pytest.raises(ValueError, match="no columns"):
        store.count("signals", **{"1=1 OR client_id": "x"})


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


def test_a_mock_write_leaves_historical_rows_alone(store):
    # same worker, same bars and models: the same ids in both modes
    hist_s, hist_r = signal_frame(20), rejection_frame(20, start=START + timedelta(days=1))
    store.write_decisions(hist_s, hist_r)
    store.write_decisions(signal_frame(20, mode="mock", run_id="mock-1"),
                          rejection_frame(20, start=START + timedelta(days=1), mode="mock", run_id="mock-1"))
    # before the fix the mock write deleted the 40 historical rows (upsert by id alone)
    assert_frame_equal(store.query("SELECT * FROM signals WHERE mode = 'historical' ORDER BY signal_id"),
                       hist_s.sort("signal_id"))
    assert_frame_equal(store.query("SELECT * FROM rejections WHERE mode = 'historical' ORDER BY rejection_id"),
                       hist_r.sort("rejection_id"))
    assert store.count("signals", mode="mock") == store.count("rejections", mode="mock") == 20


def _new_version(df: pl.DataFrame, id_col: str, run_id: str) -> pl.DataFrame:
    """The same bars decided by another model version: other ids, same natural keys."""
    other = signal_frame(df.height, symbols=("ZZZ",), start=START + timedelta(days=400))[id_col] \
        if id_col == "signal_id" else rejection_frame(df.height, symbols=("ZZZ",),
                                                      start=START + timedelta(days=400))[id_col]
    return df.with_columns(other.alias(id_col), run_id=pl.lit(run_id))


def test_a_new_model_version_supersedes_the_old_decision_of_each_bar(store):
    v1_s, v1_r = signal_frame(10), rejection_frame(10, start=START + timedelta(hours=1))
    store.write_decisions(v1_s, v1_r)
    # v2 turns the first half of v1's signals into rejections and keeps the rest as signals
    v2_s = _new_version(v1_s.tail(5), "signal_id", "run-2")
    moved = _new_version(rejection_frame(10).head(5), "rejection_id", "run-2")
    v2_r = pl.concat([moved, _new_version(v1_r, "rejection_id", "run-2")])
    for _ in range(2):  # a replay of v2 changes nothing
        store.write_decisions(v2_s, v2_r)
        current = store.query(
            "SELECT client_id, strategy_id, symbol, timeframe, bar_time, mode FROM signals UNION ALL "
            "SELECT client_id, strategy_id, symbol, timeframe, bar_time, mode FROM rejections")
        assert current.height == 20 and not current.is_duplicated().any()  # one decision per bar
        assert set(store.query("SELECT signal_id FROM signals")["signal_id"]) == set(v2_s["signal_id"])
        assert store.count("superseded_signals") == 10 and store.count("superseded_rejections") == 10
    audit = store.query("SELECT * FROM superseded_signals ORDER BY signal_id")
    assert_frame_equal(audit.drop("superseded_by", "superseded_by_run"), v1_s.sort("signal_id"))
    assert set(audit["superseded_by_run"]) == {"run-2"}
    assert set(audit["superseded_by"]) <= set(v2_s["signal_id"]) | set(moved["rejection_id"])


def test_abandon_stale_runs_marks_runs_without_a_status(store):
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    for run_id in ("killed-1", "killed-2", "done"):
        store.start_run(RunRecord(run_id=run_id, config_hash="h", mode="historical", environment="local-dev",
                                  start=t0, end=t0, started_at=t0, clients=["ikenna"]))
    store.finish_run("done", status="ok", finished_at=t0)
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert store.abandon_stale_runs(now) == ["killed-1", "killed-2"]
    assert store.count("runs", status="abandoned", finished_at=now) == 2
    assert store.count("runs", status="ok") == 1
    assert store.abandon_stale_runs(now) == []


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


def test_a_run_keeps_its_provenance(store):
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    files = {"5m/BTCUSD.parquet": "ab" * 32, "5m/symbol=ETHUSD/part-0.parquet": "cd" * 32}
    config = {"data_source": "files", "clients": [{"id": "ikenna", "quantconnect": {"api_token_env": "X (set)"}}]}
    store.start_run(RunRecord(run_id="r", config_hash="h", mode="historical", environment="local-dev", start=t0,
                              end=t0, started_at=t0, clients=["ikenna"], data_source="files", seed=7,
                              data_files=files, config=config))
    row = store.query("SELECT data_source, seed, data_files, config FROM runs").row(0, named=True)
    assert (row["data_source"], row["seed"]) == ("files", 7)
    assert (json.loads(row["data_files"]), json.loads(row["config"])) == (files, config)


def test_a_store_from_before_run_provenance_gets_its_columns_and_keeps_its_runs(tmp_path):
    """Before: a store created by an older version kept its `runs` table as it was, and recording a run
    with provenance failed (no such column)."""
    path = tmp_path / "old.duckdb"
    old = {c: t for c, t in RUN_SCHEMA.items() if c not in ("data_source", "seed", "data_files", "config")}
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


def test_bar_rejections_without_a_time_are_replaced_not_added_on_a_rerun(store):
    # Rows whose time could not be read (NULL bar_time) were stored again by every run, and two of
    # them with one reason in one batch collapsed into one.
    rows = pl.DataFrame({"symbol": ["AAPL"] * 3, "timeframe": ["1d"] * 3,
                         "bar_time": [None, None, datetime(2024, 1, 2, tzinfo=UTC)],
                         "reason": ["non_finite"] * 3,
                         "detail": ["line 3: bar_time is empty", "line 9: bar_time is empty", "close=nan"]},
                        schema=BAR_REJECTION_SCHEMA)
    for _ in range(3):
        store.write_bar_rejections(rows, run_id="r", mode="historical")
    assert store.count("bar_rejections") == 3


def test_checkpoints_are_kept_per_worker_and_mode(tmp_path):
    from datetime import datetime, timezone

    t1, t2 = datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2025, 1, 2, tzinfo=timezone.utc)
    with DuckDBStore(tmp_path / "s.duckdb") as s:
        s.write_checkpoints("mock", {"a": t1, "b": t1})
        s.write_checkpoints("mock", {"a": t2})  # replaces a's, keeps b's
        s.write_checkpoints("simulation", {"a": t1})  # modes are namespaces
        s.write_checkpoints("mock", {})
    with DuckDBStore(tmp_path / "s.duckdb") as s:  # durable across a reopen
        assert s.checkpoints("mock") == {"a": t2, "b": t1}
        assert s.checkpoints("simulation") == {"a": t1} and s.checkpoints("live") == {}


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


def _stream(store, signals=None, rejections=None) -> dict[str, tuple[int, bool]]:
    from signalgen.signals.types import REJECTION_SCHEMA

    written = store.write_decisions(SIGNAL_SCHEMA.to_frame() if signals is None else signals,
                                    REJECTION_SCHEMA.to_frame() if rejections is None else rejections)
    return {r["signal_id"]: (r["revision"], r["retracted"]) for r in written.stream.iter_rows(named=True)}


def test_revisions_and_retractions_follow_what_each_bar_says(store):
    """Before: a re-run that changed or withdrew a streamed signal told no consumer (same id, nothing
    to order the copies by; a signal turned rejection was never streamed again)."""
    import uuid

    sig = signal_frame(4)
    ids = sig["signal_id"].to_list()
    one = {i: sig.filter(pl.col("signal_id") == i) for i in ids}
    assert _stream(store, sig) == {i: (0, False) for i in ids}
    replay = sig.with_columns(run_id=pl.lit("run-2"), latency_us=pl.lit(7, pl.Int64),
                              generated_at=pl.col("generated_at") + timedelta(seconds=3))
    assert _stream(store, replay) == {i: (0, False) for i in ids}  # who, when, how fast: no news
    changed = sig.with_columns(confidence=pl.when(pl.col("signal_id") == ids[0]).then(0.99)
                               .otherwise(pl.col("confidence")))
    assert _stream(store, changed) == {ids[0]: (1, False), **{i: (0, False) for i in ids[1:]}}
    assert _stream(store, changed) == {ids[0]: (1, False), **{i: (0, False) for i in ids[1:]}}

    rejected = rejection_frame(4, run_id="run-3").filter(pl.col("rejection_id") == ids[1])
    written = store.write_decisions(SIGNAL_SCHEMA.to_frame(), rejected)
    assert written.stream.select("signal_id", "revision", "retracted", "run_id", "confidence").rows() == [
        (ids[1], 1, True, "run-3", one[ids[1]]["confidence"].item())]  # what was withdrawn, by whom
    assert _stream(store, rejections=rejected) == {}  # still rejected: nothing to say
    assert _stream(store, one[ids[1]]) == {ids[1]: (2, False)}  # back: above its retraction

    other = one[ids[2]].with_columns(signal_id=pl.lit(str(uuid.uuid4())))  # another model version
    assert _stream(store, other) == {ids[2]: (1, True), other["signal_id"].item(): (0, False)}
    assert _stream(store, one[ids[2]]) == {ids[2]: (2, False), other["signal_id"].item(): (1, True)}
    assert _stream(store, sig.with_columns(mode=pl.lit("mock"))) == {i: (0, False) for i in ids}  # modes apart
    assert store.count("signals", mode="historical") == 4 and store.count("rejections") == 0
