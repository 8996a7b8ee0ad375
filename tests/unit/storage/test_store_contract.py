"""The store contract: every backend of `storage.STORES` keeps the same rows for the same writes.

Each test runs on DuckDB and on BigQuery (the emulator, tests/integration/bigquery; skipped with the
reason when its venv is missing) and reads through the protocol (`read`) or the backends' `count` /
`rows`, never a query language.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.data.schema import BAR_REJECTION_SCHEMA
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA
from signalgen.storage.base import FINISH_FIELDS, RUN_SCHEMA, RunRecord, SignalStore
from signalgen.storage.reads import ReadQuery
from tests.integration.bigquery.servers import bq_endpoint  # noqa: F401 - a fixture
from tests.unit.outputs.factories import START, rejection_frame, signal_frame
from tests.unit.storage.reads_fixtures import RUN_ID, fill_store

BACKENDS = ["duckdb", pytest.param("bigquery", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_store(backend, tmp_path, request):
    """A function returning a new store object over one place (a file, a dataset prefix), unopened."""
    if backend == "duckdb":
        from signalgen.storage.duckdb import DuckDBStore

        return lambda: DuckDBStore(tmp_path / "deep" / "signals.duckdb")
    from signalgen.storage.bigquery import BigQueryStore

    endpoint = request.getfixturevalue("bq_endpoint")
    prefix = f"t{uuid.uuid4().hex[:12]}"
    return lambda: BigQueryStore("signalgen-dev", prefix, api_endpoint=endpoint)


@pytest.fixture
def store(make_store):
    s = make_store()
    s.open()
    yield s
    s.close()


def rows(store, table: str) -> pl.DataFrame:
    """Every row of `table`, whatever the backend."""
    if hasattr(store, "query"):
        return store.query(f"SELECT * FROM {table}")
    return store.rows(table)


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


def _run(run_id: str, **kw) -> RunRecord:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    return RunRecord(**{"run_id": run_id, "config_hash": "h", "mode": "historical", "environment": "local-dev",
                        "start": t0, "end": t0, "started_at": t0, "clients": ["ikenna"], **kw})


def test_meets_the_protocol(store):
    assert isinstance(store, SignalStore)
    with store.serve_reads():
        assert store.read(ReadQuery(kind="signals")).is_empty()


def test_signals_round_trip_keeps_types(store):
    df = signal_frame(20)
    assert store.write_signals(df) == 20
    back = rows(store, "signals").sort("signal_id")
    assert back.schema == SIGNAL_SCHEMA
    assert_frame_equal(back, df.sort("signal_id"))


def test_writing_the_same_batch_twice_leaves_the_same_rows(store):
    df = signal_frame(50)
    store.write_signals(df)
    store.write_signals(df)
    assert store.count("signals") == 50
    assert_frame_equal(rows(store, "signals").sort("signal_id"), df.sort("signal_id"))


def test_rewrite_replaces_changed_values(store):
    df = signal_frame(30)
    store.write_signals(df)
    store.write_signals(df.head(10).with_columns(confidence=pl.lit(0.99), run_id=pl.lit("run-2")))
    assert store.count("signals") == 30
    assert store.count("signals", run_id="run-2", confidence=0.99) == 10
    assert store.count("signals", run_id="run-1") == 20


def test_duplicate_ids_within_one_batch_keep_the_last(store):
    df = signal_frame(5)
    assert store.write_signals(pl.concat([df, df.with_columns(weight=pl.lit(0.125))])) == 5
    assert store.count("signals", weight=0.125) == 5


def test_rejections_upsert_and_keep_reason_lists(store):
    df = rejection_frame(40)
    store.write_rejections(df)
    store.write_rejections(df.with_columns(run_id=pl.lit("run-2")))
    assert store.count("rejections") == 40
    assert store.count("rejections", run_id="run-2") == 40
    back = rows(store, "rejections").sort("rejection_id")
    assert_frame_equal(back, df.with_columns(run_id=pl.lit("run-2")).sort("rejection_id"))
    assert back.filter(pl.col("reasons").list.len() == 2).height == df.filter(pl.col("reasons").list.len() == 2).height > 0


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


def test_bar_rejections_without_a_time_are_replaced_not_added_on_a_rerun(store):
    bars = pl.DataFrame({"symbol": ["AAPL"] * 3, "timeframe": ["1d"] * 3,
                         "bar_time": [None, None, datetime(2024, 1, 2, tzinfo=UTC)],
                         "reason": ["non_finite"] * 3,
                         "detail": ["line 3: bar_time is empty", "line 9: bar_time is empty", "close=nan"]},
                        schema=BAR_REJECTION_SCHEMA)
    for _ in range(3):
        store.write_bar_rejections(bars, run_id="r", mode="historical")
    assert store.count("bar_rejections") == 3


def test_frames_off_schema_are_refused(store):
    with pytest.raises(ValueError, match="missing \\['weight'\\]"):
        store.write_signals(signal_frame(3).drop("weight"))
    with pytest.raises(ValueError, match="direction"):
        store.write_signals(signal_frame(3).with_columns(pl.col("direction").cast(pl.Int64)))
    assert store.write_signals(signal_frame(0)) == 0
    assert store.count("signals") == 0


def test_count_rejects_unknown_tables_and_columns(store):
    with pytest.raises(ValueError, match="unknown table"):
        store.count("signals; DROP TABLE runs")
    with pytest.raises(ValueError, match="no columns"):
        store.count("signals", **{"1=1 OR client_id": "x"})


def test_an_unopened_store_refuses_writes(make_store):
    with pytest.raises(RuntimeError, match="open"):
        make_store().write_signals(signal_frame(1))


def test_a_store_nobody_has_written_reads_empty(make_store, backend):
    if backend == "duckdb":  # a file must exist to be read: its first holder makes it
        with make_store():
            pass
    store = make_store()
    for kind, schema in (("runs", RUN_SCHEMA), ("signals", SIGNAL_SCHEMA), ("rejections", REJECTION_SCHEMA)):
        assert store.read(ReadQuery(kind=kind)).schema == schema
        assert store.read(ReadQuery(kind=kind)).is_empty()


def test_a_mock_write_leaves_historical_rows_alone(store):
    hist_s, hist_r = signal_frame(20), rejection_frame(20, start=START + timedelta(days=1))
    store.write_decisions(hist_s, hist_r)
    store.write_decisions(signal_frame(20, mode="mock", run_id="mock-1"),
                          rejection_frame(20, start=START + timedelta(days=1), mode="mock", run_id="mock-1"))
    assert_frame_equal(rows(store, "signals").filter(mode="historical").sort("signal_id"), hist_s.sort("signal_id"))
    assert_frame_equal(rows(store, "rejections").filter(mode="historical").sort("rejection_id"),
                       hist_r.sort("rejection_id"))
    assert store.count("signals", mode="mock") == store.count("rejections", mode="mock") == 20


def _new_version(df: pl.DataFrame, id_col: str, run_id: str) -> pl.DataFrame:
    """The same bars decided by another model version: other ids, same natural keys."""
    make = signal_frame if id_col == "signal_id" else rejection_frame
    other = make(df.height, symbols=("ZZZ",), start=START + timedelta(days=400))[id_col]
    return df.with_columns(other.alias(id_col), run_id=pl.lit(run_id))


def _decision_keys(store) -> pl.DataFrame:
    key = ["client_id", "strategy_id", "symbol", "timeframe", "bar_time", "mode"]
    return pl.concat([rows(store, "signals").select(key), rows(store, "rejections").select(key)])


def test_a_new_model_version_supersedes_the_old_decision_of_each_bar(store):
    v1_s, v1_r = signal_frame(10), rejection_frame(10, start=START + timedelta(hours=1))
    store.write_decisions(v1_s, v1_r)
    # v2 turns the first half of v1's signals into rejections and keeps the rest as signals
    v2_s = _new_version(v1_s.tail(5), "signal_id", "run-2")
    moved = _new_version(rejection_frame(10).head(5), "rejection_id", "run-2")
    v2_r = pl.concat([moved, _new_version(v1_r, "rejection_id", "run-2")])
    for _ in range(2):  # a replay of v2 changes nothing
        store.write_decisions(v2_s, v2_r)
        current = _decision_keys(store)
        assert current.height == 20 and not current.is_duplicated().any()  # one decision per bar
        assert set(rows(store, "signals")["signal_id"]) == set(v2_s["signal_id"])
        assert store.count("superseded_signals") == 10 and store.count("superseded_rejections") == 10
    audit = rows(store, "superseded_signals").sort("signal_id")
    assert_frame_equal(audit.drop("superseded_by", "superseded_by_run"), v1_s.sort("signal_id"))
    assert set(audit["superseded_by_run"]) == {"run-2"}
    assert set(audit["superseded_by"]) <= set(v2_s["signal_id"]) | set(moved["rejection_id"])


def test_a_group_of_fresh_and_replayed_workers_keeps_one_decision_per_bar(store):
    a = rejection_frame(6, symbols=("AAPL",), client_id="ada")
    b = signal_frame(6, symbols=("MSFT",), client_id="bea")
    store.write_decisions(b.head(3), a.head(3))
    store.write_decisions(b.with_columns(mode=pl.lit("mock")), a.slice(2, 4))
    assert store.count("rejections") == 6 and store.count("signals") == 9
    assert not _decision_keys(store).is_duplicated().any()


def _stream(store, signals=None, rejections=None) -> dict[str, tuple[int, bool]]:
    written = store.write_decisions(SIGNAL_SCHEMA.to_frame() if signals is None else signals,
                                    REJECTION_SCHEMA.to_frame() if rejections is None else rejections)
    return {r["signal_id"]: (r["revision"], r["retracted"]) for r in written.stream.iter_rows(named=True)}


def test_revisions_and_retractions_follow_what_each_bar_says(store):
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


def test_checkpoints_are_kept_per_worker_and_mode(make_store):
    t1, t2 = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC)
    with make_store() as s:
        s.write_checkpoints("mock", {"a": t1, "b": t1})
        s.write_checkpoints("mock", {"a": t2})  # replaces a's, keeps b's
        s.write_checkpoints("simulation", {"a": t1})  # modes are namespaces
        s.write_checkpoints("mock", {})
    with make_store() as s:  # durable across a reopen
        assert s.checkpoints("mock") == {"a": t2, "b": t1}
        assert s.checkpoints("simulation") == {"a": t1} and s.checkpoints("live") == {}


def test_runs_round_trip(store):
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    run = RunRecord(run_id="run-9", config_hash="abc123", mode="historical", environment="local-dev",
                    start=t0, end=t0 + timedelta(days=30), started_at=datetime(2025, 5, 1, 12, tzinfo=UTC),
                    clients=["ikenna", "zara"], shard="1/4")
    store.start_run(run)
    store.start_run(run)  # a restarted recorder: still one row
    assert store.count("runs") == 1 and store.count("runs", status=None) == 1
    store.finish_run("run-9", finished_at=datetime(2025, 5, 1, 12, 5, tzinfo=UTC), status="ok", bars=1_000,
                     signals=40, rejections=900, bar_rejections=3, elapsed_s=2.5, bars_per_s=400.0,
                     peak_rss_mb=312.5, rejections_by_reason={"below_confidence": 800, "no_consensus": 100})
    back = store.read(ReadQuery(kind="runs"))
    assert back.schema == RUN_SCHEMA
    row = back.row(0, named=True)
    assert row["clients"] == ["ikenna", "zara"] and row["shard"] == "1/4"
    assert row["start"] == t0 and row["end"] == t0 + timedelta(days=30)
    assert row["status"] == "ok" and row["bars"] == 1_000 and row["peak_rss_mb"] == 312.5
    assert json.loads(row["rejections_by_reason"]) == {"below_confidence": 800, "no_consensus": 100}
    assert (row["host"], row["pid"]) == (socket.gethostname(), os.getpid())  # its owner
    assert set(FINISH_FIELDS) == set(row) - {"run_id", "config_hash", "mode", "environment", "start",
                                             "end", "started_at", "clients", "data_source", "seed",
                                             "data_files", "config", "host", "pid", "shard"}
    with pytest.raises(ValueError, match="unknown run fields"):
        store.finish_run("run-9", colour="red")
    with pytest.raises(KeyError):
        store.finish_run("never", status="failed")


def test_a_run_keeps_its_provenance(store):
    files = {"5m/BTCUSD.parquet": "ab" * 32, "5m/symbol=ETHUSD/part-0.parquet": "cd" * 32}
    config = {"data_source": "files", "clients": [{"id": "ikenna", "quantconnect": {"api_token_env": "X (set)"}}]}
    store.start_run(_run("r", data_source="files", seed=7, data_files=files, config=config))
    row = store.read(ReadQuery(kind="runs")).row(0, named=True)
    assert (row["data_source"], row["seed"]) == ("files", 7)
    assert (json.loads(row["data_files"]), json.loads(row["config"])) == (files, config)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_abandon_stale_runs_marks_only_runs_whose_writer_is_gone(store, backend, monkeypatch):
    import signalgen.storage.base as base

    owners = {"dead": (socket.gethostname(), _dead_pid()), "alive": (socket.gethostname(), os.getpid()),
              "elsewhere": ("another-host", _dead_pid()), "done": (socket.gethostname(), _dead_pid()),
              "ownerless": (None, None)}
    for run_id, owner in owners.items():
        monkeypatch.setattr(base, "run_owner", lambda owner=owner: dict(zip(("host", "pid"), owner)))
        monkeypatch.setattr(f"signalgen.storage.{backend}.run_owner", base.run_owner)
        store.start_run(_run(run_id, started_at=datetime.now(UTC)))
    store.finish_run("done", status="ok", finished_at=datetime(2024, 1, 1, tzinfo=UTC))
    now = datetime(2025, 1, 1, tzinfo=UTC)
    # one holder (DuckDB's lock): a run without an owner was left by a writer that is gone; a shared
    # store (BigQuery) cannot tell, so it leaves it, as it leaves another host's runs
    expected = ["dead", "ownerless"] if backend == "duckdb" else ["dead"]
    assert store.abandon_stale_runs(now) == expected
    assert store.count("runs", status="abandoned", finished_at=now) == len(expected)
    assert store.count("runs", status=None) == 5 - 1 - len(expected)
    assert store.abandon_stale_runs(now) == []


def test_a_reused_pid_does_not_keep_a_run_alive(store, backend, monkeypatch):
    # this process started before the run's recorded start: the run's writer was another process
    # that had this pid (a restarted container's pid 1)
    monkeypatch.setattr(f"signalgen.storage.{backend}.run_owner",
                        lambda: {"host": socket.gethostname(), "pid": os.getpid()})
    store.start_run(_run("old", started_at=datetime.now(UTC) + timedelta(days=1)))
    assert store.abandon_stale_runs(datetime.now(UTC)) == []  # younger than this process: alive
    store.start_run(_run("older", started_at=datetime(2000, 1, 1, tzinfo=UTC)))
    assert store.abandon_stale_runs(datetime.now(UTC)) == ["older"]


# ------------------------------------------------------------------ read(ReadQuery)

@pytest.fixture
def filled(store):
    fill_store(store)
    return store


def _rows(store, **spec):
    return store.read(ReadQuery(**spec)).to_dicts()


def test_read_filters_select_what_they_name(filled):
    assert len(_rows(filled, kind="signals")) == 16
    mock = _rows(filled, kind="signals", modes=("mock",))
    assert len(mock) == 4 and {r["client_id"] for r in mock} == {"odum"}
    assert {r["mode"] for r in _rows(filled, kind="signals", clients=("ikenna",))} == {"historical"}
    assert {r["symbol"] for r in _rows(filled, kind="signals", symbols=("MSFT",))} == {"MSFT"}
    assert _rows(filled, kind="signals", strategies=("nope",)) == []
    assert _rows(filled, kind="signals", clients=("nobody",)) == []
    assert len(_rows(filled, kind="rejections")) == 6
    assert len(_rows(filled, kind="signals", run_id=RUN_ID)) == 16 and _rows(filled, kind="signals", run_id="x") == []
    assert _rows(filled, kind="runs", clients=("odum",))[0]["run_id"] == RUN_ID
    assert _rows(filled, kind="runs", clients=("someone",)) == []


def test_read_time_range_is_start_exclusive_end_inclusive(filled):
    rows_ = _rows(filled, kind="signals", clients=("ikenna",), start=START, end=START + timedelta(minutes=10))
    assert sorted({r["bar_time"] for r in rows_}) == [START + timedelta(minutes=5), START + timedelta(minutes=10)]
    assert len(rows_) == 4
    since = _rows(filled, kind="signals", since=START + timedelta(minutes=25))
    assert {r["bar_time"] for r in since} == {START + timedelta(minutes=25)}


def test_read_newest_and_limit(filled):
    got = _rows(filled, kind="signals", clients=("ikenna",), newest=True, limit=3)
    assert [r["bar_time"] for r in got] == [START + timedelta(minutes=25)] * 2 + [START + timedelta(minutes=20)]
    assert all(isinstance(r["signal_id"], str) and len(r["signal_id"]) == 36 for r in got)
    oldest = _rows(filled, kind="signals", limit=2)
    assert [r["bar_time"] for r in oldest] == [START, START]


def test_read_counts(filled):
    counts = filled.read(ReadQuery(kind="signals", count_by=("client_id", "mode")))
    assert counts.schema == pl.Schema({"client_id": pl.String, "mode": pl.String, "count": pl.Int64})
    assert counts.rows() == [("ikenna", "historical", 12), ("odum", "mock", 4)]
    assert filled.read(ReadQuery(kind="rejections", count_by=())).rows() == [(6,)]
    assert filled.read(ReadQuery(kind="signals", clients=("nobody",), count_by=("symbol",))).is_empty()


def test_read_returns_the_decisions_as_written(filled):
    back = filled.read(ReadQuery(kind="signals", modes=("historical",)))
    assert back.schema == SIGNAL_SCHEMA
    assert_frame_equal(back.sort("signal_id"), signal_frame(12, run_id=RUN_ID).sort("signal_id"))
