from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from signalgen.errors import StorageError
from signalgen.outputs.base import Output
from signalgen.outputs.quantconnect import CSV_COLUMNS, QuantConnectCsvOutput
from tests.unit.outputs.factories import START, signal_frame

HEADER = "time,symbol,direction,confidence,magnitude,weight,period,signal_id,mode"


@pytest.fixture
def out(tmp_path):
    o = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")
    o.open()
    return o


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def _one(signal_id: str, generated_at: datetime, **values) -> pl.DataFrame:
    """One signal with chosen values; the rest from the factory."""
    row = signal_frame(1).with_columns(signal_id=pl.lit(signal_id), generated_at=pl.lit(generated_at))
    casts = {k: row.schema[k] for k in values}
    return row.with_columns(**{k: pl.lit(v) for k, v in values.items()}).cast(casts)


def test_is_an_output(out):
    assert isinstance(out, Output)


def test_header_and_number_formats(out):
    t = datetime(2024, 3, 4, 15, 0, tzinfo=UTC)
    out.write(pl.concat([
        _one("a", t, symbol="AAPL", direction=1, confidence=0.5, magnitude=-0.000123456789, weight=0.1234567,
             period=12),
        _one("b", t, symbol="MSFT", direction=-1, confidence=1.0, magnitude=None, weight=0.0, period=3),
        _one("c", t, symbol="SPY", direction=0, confidence=0.9999999, magnitude=0.02, weight=0.25, period=1),
    ]))
    out.flush()
    assert _lines(out.path_for("swing_high_v1", "20240304")) == [
        HEADER,
        "2024-03-04 15:00:00,AAPL,1,0.500000,-0.00012346,0.123457,12,a,historical",
        "2024-03-04 15:00:00,MSFT,-1,1.000000,,0.000000,3,b,historical",
        "2024-03-04 15:00:00,SPY,0,1.000000,0.02000000,0.250000,1,c,historical",
    ]
    assert ",".join(CSV_COLUMNS) == HEADER


def test_time_is_availability_rounded_up_to_the_second(out):
    t = datetime(2024, 3, 4, 23, 59, 58, tzinfo=UTC)
    out.write(pl.concat([
        _one("exact", t),
        _one("micro", t + timedelta(microseconds=1)),
        _one("late", t + timedelta(seconds=1, microseconds=500_000)),  # 23:59:59.5 -> next day
    ]).with_columns(bar_time=pl.lit(t - timedelta(minutes=5))))
    out.flush()
    day1 = _lines(out.path_for("swing_high_v1", "20240304"))
    day2 = _lines(out.path_for("swing_high_v1", "20240305"))
    assert [line.split(",")[0] for line in day1[1:]] == ["2024-03-04 23:59:58", "2024-03-04 23:59:59"]
    assert [line.split(",")[-2] for line in day1[1:]] == ["exact", "micro"]
    assert day2[1].startswith("2024-03-05 00:00:00,") and day2[1].endswith(",late,historical")


def test_rows_sorted_by_time_symbol_id_and_split_by_strategy_and_day(out, tmp_path):
    df = pl.concat([
        signal_frame(40, symbols=("MSFT", "AAPL", "GOOG"), step=timedelta(hours=3)),
        signal_frame(10, strategy_id="mean_rev_v2", step=timedelta(hours=7), seed=1),
    ])
    out.write(df.reverse())
    out.flush()
    root = tmp_path / "historical" / "quantconnect" / "ikenna"
    written = {p.relative_to(root).as_posix() for p in root.rglob("*.csv")}
    expected = df.select("strategy_id", pl.col("generated_at").dt.strftime("%Y%m%d").alias("day")).unique()
    assert written == {f"{s}/{d}.csv" for s, d in expected.iter_rows()}
    total = 0
    for path in root.rglob("*.csv"):
        rows = pl.read_csv(path, infer_schema=False)
        assert rows.columns == list(CSV_COLUMNS)
        assert rows.equals(rows.sort("time", "symbol", "signal_id"))
        assert (rows["time"].str.slice(0, 10).str.replace_all("-", "") == path.stem).all()
        total += rows.height
    assert total == df.height


def test_rerun_rewrites_rows_without_duplicates(out):
    df = signal_frame(30, step=timedelta(hours=1))
    out.write(df)
    out.flush()
    path = out.path_for("swing_high_v1", "20240102")
    first = path.read_text()
    out.write(df)
    out.flush()
    assert path.read_text() == first  # same signals again: same bytes
    changed = df.head(3).with_columns(confidence=pl.lit(0.75))
    extra = signal_frame(2, step=timedelta(hours=1), start=datetime(2024, 1, 2, 23, 0, tzinfo=UTC),
                         symbols=("TSLA",))
    out.write(pl.concat([changed, extra]))
    out.flush()
    rows = pl.read_csv(path, infer_schema=False)
    assert rows["signal_id"].is_unique().all()
    assert rows.height == df.filter(pl.col("generated_at").dt.day() == 2).height + 1
    assert rows.filter(pl.col("signal_id").is_in(changed["signal_id"].to_list()))["confidence"].to_list() == [
        "0.750000"] * 3


def test_flush_replaces_the_file_atomically(out):
    out.write(signal_frame(4))
    out.flush()
    path = out.path_for("swing_high_v1", "20240102")
    inode = path.stat().st_ino
    out.write(signal_frame(4, seed=5))
    out.flush()
    second = path.read_text()
    assert path.stat().st_ino != inode  # a new file renamed over the old, not rewritten in place
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    # A write that cannot finish leaves the old file whole.
    (path.parent / f".{path.name}.{os.getpid()}.tmp").mkdir()
    out.write(signal_frame(4, seed=9))
    with pytest.raises(StorageError, match=r"cannot write .*\.tmp: Is a directory"):
        out.flush()
    assert path.read_text() == second


def test_other_clients_rows_are_refused(out, tmp_path):
    mixed = pl.concat([signal_frame(2), signal_frame(2, client_id="zara")])
    with pytest.raises(ValueError, match="zara"):
        out.write(mixed)
    out.flush()
    assert not list(tmp_path.rglob("*.csv"))
    with pytest.raises(ValueError, match="safe folder"):
        out.write(signal_frame(1, strategy_id="../escape"))


def test_refuses_to_merge_into_a_foreign_file(out):
    path = out.path_for("swing_high_v1", "20240102")
    path.parent.mkdir(parents=True)
    path.write_text("a,b\n1,2\n")
    out.write(signal_frame(2))
    with pytest.raises(ValueError, match="header"):
        out.flush()
    assert path.read_text() == "a,b\n1,2\n"


def test_close_flushes(tmp_path):
    o = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")
    o.open()
    o.write(signal_frame(3))
    o.close()
    assert len(_lines(o.path_for("swing_high_v1", "20240102"))) == 4


def test_half_a_million_signals_over_a_year_in_seconds(out, tmp_path):
    df = signal_frame(500_000, symbols=("AAPL", "MSFT", "GOOG", "AMZN"), step=timedelta(minutes=4),
                      latency=timedelta(milliseconds=1500))
    out.write(df)
    started = time.perf_counter()
    out.flush()
    elapsed = time.perf_counter() - started
    files = list((tmp_path / "historical" / "quantconnect" / "ikenna" / "swing_high_v1").glob("*.csv"))
    assert len(files) == df["generated_at"].dt.date().n_unique() > 300
    assert sum(len(_lines(f)) - 1 for f in files) == 500_000
    assert elapsed < 15, f"flush of 500k signals took {elapsed:.1f}s"  # ~1 s measured on 2 cores


def test_owned_range_replaces_rows_inside_and_keeps_rows_outside(tmp_path):
    earlier = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")  # an earlier run's output
    earlier.open()
    first = signal_frame(6, step=timedelta(hours=1))  # 2024-01-02 14:30 .. 16:30, two symbols
    earlier.write(first)
    earlier.close()
    keep = first.filter(pl.col("bar_time") <= START + timedelta(hours=1))
    out = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")  # this run wrote nothing inside
    out.open()
    out.own("swing_high_v1", START + timedelta(hours=1), START + timedelta(hours=3))
    out.flush()  # nothing new inside the owned interval: its rows go, the rest stays
    rows = _lines(out.path_for("swing_high_v1", "20240102"))
    assert rows[0] == ",".join(CSV_COLUMNS)
    assert {line.split(",")[-2] for line in rows[1:]} == set(keep["signal_id"]) and keep.height == 4


def test_owned_range_keeps_what_this_output_flushed_before(tmp_path):
    """A writer serving worker processes flushes at every group commit: `own` at the run's end keeps
    every row the run wrote, and drops only the earlier run's rows it no longer produces."""
    frame = signal_frame(6, step=timedelta(hours=1))
    earlier = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")
    earlier.open()
    earlier.write(frame)
    earlier.close()
    ours = frame.filter(pl.col("bar_time") <= START + timedelta(hours=1))  # the re-run no longer makes the rest
    out = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")
    out.open()
    for part in ours.iter_slices(2):  # written and flushed in steps, as group commits do
        out.write(part)
        out.flush()
    out.own("swing_high_v1", START - timedelta(hours=1), START + timedelta(hours=3))
    out.flush()
    rows = _lines(out.path_for("swing_high_v1", "20240102"))
    assert {line.split(",")[-2] for line in rows[1:]} == set(ours["signal_id"]) and ours.height < frame.height


def test_layout_is_per_mode_with_a_mode_column(tmp_path):
    for mode in ("historical", "mock"):
        o = QuantConnectCsvOutput(tmp_path, "ikenna", mode)
        o.open()
        o.write(signal_frame(4, mode=mode))
        o.close()
    hist = tmp_path / "historical/quantconnect/ikenna/swing_high_v1/20240102.csv"
    mock = tmp_path / "mock/quantconnect/ikenna/swing_high_v1/20240102.csv"
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.csv")} == {
        hist.relative_to(tmp_path).as_posix(), mock.relative_to(tmp_path).as_posix()}
    assert {line.rsplit(",", 1)[1] for line in _lines(hist)[1:]} == {"historical"}
    assert {line.rsplit(",", 1)[1] for line in _lines(mock)[1:]} == {"mock"}
    o = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")
    with pytest.raises(ValueError, match="mock"):  # a mock row reaching historical files is a routing bug
        o.write(signal_frame(1, mode="mock"))


def test_open_removes_temporary_files_a_killed_run_left(tmp_path):
    out = QuantConnectCsvOutput(tmp_path, "ikenna", "historical")
    out.open()
    out.write(signal_frame(4))
    out.flush()
    day = out.path_for("swing_high_v1", "20240102")
    stale = day.with_name(f".{day.name}.999999.tmp")  # what a SIGKILL between write and rename leaves
    stale.write_text("half a file")
    other = day.with_name("notes.tmp")  # not ours: kept
    other.write_text("x")
    QuantConnectCsvOutput(tmp_path, "ikenna", "historical").open()
    assert not stale.exists() and other.exists() and day.exists()
