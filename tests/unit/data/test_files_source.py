from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.data.files import FilesSource
from signalgen.data.schema import BAR_PROBLEM_SCHEMA, BAR_SCHEMA
from signalgen.data.synthetic import synthetic_bars
from signalgen.data.validation import validate_bars
from signalgen.errors import DataError

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
HEADER = "bar_time,open,high,low,close,volume"


@pytest.fixture()
def bars() -> pl.DataFrame:
    return synthetic_bars(["BTCUSD"], "5m", T0, T0 + timedelta(hours=10), seed=1)


def write_csv(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def clean(loaded: pl.DataFrame) -> pl.DataFrame:
    """The BAR_SCHEMA part of `load`'s result, after checking no row carries a problem."""
    assert loaded.schema == pl.Schema({**BAR_SCHEMA, **BAR_PROBLEM_SCHEMA})
    assert loaded["problem"].null_count() == loaded.height, loaded.filter(pl.col("problem").is_not_null())
    return loaded.select(BAR_SCHEMA.names())


def test_parquet_round_trip_and_symbols(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    bars.write_parquet(tmp_path / "5m" / "BTCUSD.parquet")
    bars.with_columns(pl.lit("ETHUSD").alias("symbol")).write_parquet(tmp_path / "5m" / "ETHUSD.parquet")
    src = FilesSource(tmp_path)
    assert src.symbols("5m") == ["BTCUSD", "ETHUSD"]
    assert src.symbols("1h") == []
    assert_frame_equal(clean(src.load("BTCUSD", "5m")), bars)


def test_range_is_start_exclusive_end_inclusive(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    bars.write_parquet(tmp_path / "5m" / "BTCUSD.parquet")
    got = FilesSource(tmp_path).load("BTCUSD", "5m", T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    assert got["bar_time"][0] == T0 + timedelta(hours=1, minutes=5)
    assert got["bar_time"][-1] == T0 + timedelta(hours=2)
    assert got.height == 12


@pytest.mark.parametrize("first, second", [
    ("2025-01-01T01:00:00Z", "2025-01-01T02:00:00Z"),
    ("2025-01-01T03:00:00+02:00", "2025-01-01T04:00:00+02:00"),
    ("2025-01-01 01:00:00", "2025-01-01 02:00:00"),  # no offset: UTC
])
def test_csv_iso_times_become_utc_and_missing_columns_come_from_the_path(tmp_path, first, second):
    rows = f"{second},10.5,11,10,10.8,200\n{first},10,11,9,10.5,100\n"
    write_csv(tmp_path / "1h" / "AAPL.csv", f"{HEADER}\n{rows}")
    got = clean(FilesSource(tmp_path).load("AAPL", "1h"))
    assert got["bar_time"].to_list() == [T0 + timedelta(hours=2), T0 + timedelta(hours=1)]  # file order kept
    assert got["symbol"].to_list() == ["AAPL"] * 2 and got["timeframe"].to_list() == ["1h"] * 2
    assert got["volume"].to_list() == [200.0, 100.0]


def test_hive_folder(tmp_path, bars):
    folder = tmp_path / "5m" / "symbol=BTCUSD"
    folder.mkdir(parents=True)
    bars.head(50).drop("symbol").write_parquet(folder / "part-0.parquet")
    bars.slice(50).drop("symbol").write_parquet(folder / "part-1.parquet")
    src = FilesSource(tmp_path)
    assert src.symbols("5m") == ["BTCUSD"]
    assert_frame_equal(clean(src.load("BTCUSD", "5m")), bars)


def test_naive_and_foreign_zone_parquet_times(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    naive = pl.col("bar_time").dt.replace_time_zone(None)
    bars.with_columns(naive).write_parquet(tmp_path / "5m" / "A.parquet")
    bars.with_columns(pl.col("bar_time").dt.convert_time_zone("Asia/Tokyo").dt.cast_time_unit("ms")
                      ).write_parquet(tmp_path / "5m" / "B.parquet")
    src = FilesSource(tmp_path)
    assert src.load("A", "5m")["bar_time"].equals(bars["bar_time"])
    assert src.load("B", "5m")["bar_time"].equals(bars["bar_time"])


def test_iter_chunks_cover_the_range(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    bars.write_parquet(tmp_path / "5m" / "BTCUSD.parquet")
    chunks = list(FilesSource(tmp_path).iter_chunks("BTCUSD", "5m", None, None, chunk_bars=50))
    assert [c.height for c in chunks] == [50, 50, 20]
    assert_frame_equal(clean(pl.concat(chunks)), bars)


def test_missing_symbol_names_the_paths_searched(tmp_path):
    with pytest.raises(DataError, match=r"no bars for NOPE 5m: searched .*5m/NOPE\.parquet.*5m/NOPE\.csv"):
        FilesSource(tmp_path).load("NOPE", "5m")


def test_missing_column_names_file_and_column(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    path = tmp_path / "5m" / "BTCUSD.parquet"
    bars.drop("volume").write_parquet(path)
    with pytest.raises(DataError, match=r"BTCUSD\.parquet: missing column 'volume'"):
        FilesSource(tmp_path).load("BTCUSD", "5m")


def test_non_numeric_column_names_file_and_column(tmp_path):
    write_csv(tmp_path / "1h" / "X.csv", f"{HEADER}\n2025-01-01T01:00:00Z,10,11,9,abc,1\n")
    with pytest.raises(DataError, match=r"X\.csv: column 'close' must be numeric"):
        FilesSource(tmp_path).load("X", "1h")


def test_unparseable_time_is_a_data_error(tmp_path):
    write_csv(tmp_path / "1h" / "X.csv", f"{HEADER}\nyesterday,10,11,9,10,1\n")
    with pytest.raises(DataError, match=r"X\.csv"):
        FilesSource(tmp_path).load("X", "1h")


# ---------------------------------------------------------------- files that cannot be used at all


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert str(path) in message and "\n" not in message and len(message) < len(str(path)) + 160, message
    assert message.isprintable(), message
    return message


@pytest.mark.parametrize("name", ["X.csv", "X.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / "1h" / name
    write_csv(path, "")
    with pytest.raises(DataError, match=r"empty file \(0 bytes\)") as err:
        FilesSource(tmp_path).load("X", "1h")
    one_line_naming(err, path)


def test_header_only_and_zero_row_files_have_no_rows(tmp_path, bars):
    write_csv(tmp_path / "1h" / "X.csv", HEADER + "\n")
    (tmp_path / "5m").mkdir()
    bars.head(0).write_parquet(tmp_path / "5m" / "Y.parquet")
    for symbol, timeframe, path in (("X", "1h", tmp_path / "1h" / "X.csv"),
                                    ("Y", "5m", tmp_path / "5m" / "Y.parquet")):
        with pytest.raises(DataError, match="no rows") as err:
            FilesSource(tmp_path).load(symbol, timeframe)
        one_line_naming(err, path)


def test_rows_outside_the_range_give_zero_bars_not_an_error(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    bars.write_parquet(tmp_path / "5m" / "BTCUSD.parquet")
    got = FilesSource(tmp_path).load("BTCUSD", "5m", T0 + timedelta(days=30), T0 + timedelta(days=31))
    assert got.height == 0 and got.schema == pl.Schema({**BAR_SCHEMA, **BAR_PROBLEM_SCHEMA})


@pytest.mark.parametrize("name", ["X.csv", "X.parquet"])
def test_garbage_file_is_named_without_echoing_its_bytes(tmp_path, name):
    path = tmp_path / "1h" / name
    path.parent.mkdir(parents=True)
    garbage = bytes(range(256)) * 4 + b"\xff\xfe,\x00\n" * 50
    path.write_bytes(garbage)
    with pytest.raises(DataError) as err:
        FilesSource(tmp_path).load("X", "1h")
    one_line_naming(err, path)


def test_garbage_text_header_is_bounded(tmp_path):
    path = tmp_path / "1h" / "X.csv"
    write_csv(path, ",".join("col" + "y" * 500 + str(i) for i in range(40)) + "\n1,2\n")
    with pytest.raises(DataError, match=r"missing column 'bar_time' \(has .* and 35 more\)") as err:
        FilesSource(tmp_path).load("X", "1h")
    one_line_naming(err, path)


def test_column_of_the_wrong_type_in_parquet(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    bars.with_columns(pl.col("close") > 0).write_parquet(tmp_path / "5m" / "X.parquet")
    with pytest.raises(DataError, match=r"X\.parquet: column 'close' must be numeric, found Boolean"):
        FilesSource(tmp_path).load("X", "5m")


# ---------------------------------------------------------------- rows that cannot be read


def rejected(tmp_path: Path, symbol: str, timeframe: str, **kwargs):
    """load + validate: (good bars, {reason: [detail, ...]})."""
    checked = validate_bars(FilesSource(tmp_path).load(symbol, timeframe, **kwargs), timeframe)
    found: dict[str, list[str]] = {}
    for reason, detail in checked.rejections.select("reason", "detail").iter_rows():
        found.setdefault(reason, []).append(detail)
    return checked.bars, found


def test_an_unparsable_cell_rejects_its_row_only(tmp_path):
    rows = ["2025-01-01T01:00:00Z,10,11,9,10.5,100", "2025-01-01T02:00:00Z,10,11,9,abc,100",
            "2025-01-01T03:00:00Z,10,11,9,10.5," + "\x07" * 300, "2025-01-01T04:00:00Z,10,11,9,10.5,100"]
    write_csv(tmp_path / "1h" / "X.csv", "\n".join([HEADER, *rows]) + "\n")
    good, found = rejected(tmp_path, "X", "1h")
    assert good["bar_time"].to_list() == [T0 + timedelta(hours=h) for h in (1, 4)]
    assert good.schema == BAR_SCHEMA
    assert found == {"unparsable": ["line 3: close='abc' is not a number",
                                    "line 4: volume='" + "?" * 24 + "…' is not a number"],
                     "gap": ["gap of 10800s after 2025-01-01T01:00:00Z (max 3600s)"]}


def test_an_unparsable_time_rejects_its_row_only(tmp_path):
    rows = ["2025-01-01T01:00:00Z,10,11,9,10.5,100", "yesterday,10,11,9,10.5,100",
            "2025-01-01 03:00,10,11,9,10.5,100"]
    write_csv(tmp_path / "1h" / "X.csv", "\n".join([HEADER, *rows]) + "\n")
    good, found = rejected(tmp_path, "X", "1h")
    assert good["bar_time"].to_list() == [T0 + timedelta(hours=1), T0 + timedelta(hours=3)]
    assert found["unparsable"] == ["line 3: bar_time='yesterday' is not an ISO 8601 time"]


@pytest.mark.parametrize("start", [None, T0])
def test_an_empty_bar_time_is_rejected_and_recorded(tmp_path, start):
    rows = ["2025-01-01T01:00:00Z,10,11,9,10.5,100", ",10,11,9,10.5,100",
            "2025-01-01T02:00:00Z,10,11,9,10.5,100"]
    write_csv(tmp_path / "1h" / "X.csv", "\n".join([HEADER, *rows]) + "\n")
    good, found = rejected(tmp_path, "X", "1h", start=start, end=T0 + timedelta(days=1))
    assert good.height == 2
    assert found == {"non_finite": ["line 3: bar_time is empty"]}


def test_a_row_without_time_is_reported_by_exactly_one_range(tmp_path):
    rows = [f"2025-01-01T0{h}:00:00Z,10,11,9,10.5,100" for h in range(1, 5)]
    rows.insert(2, ",10,11,9,10.5,100")  # after 02:00: belongs to the range holding 02:00
    write_csv(tmp_path / "1h" / "X.csv", "\n".join([HEADER, *rows]) + "\n")
    src = FilesSource(tmp_path)
    cut = T0 + timedelta(hours=2)
    first, second = src.load("X", "1h", T0, cut), src.load("X", "1h", cut, T0 + timedelta(hours=4))
    assert (first.height, second.height) == (3, 2)
    assert first["problem_detail"].to_list()[-1] == "line 4: bar_time is empty"


def test_a_symbol_or_timeframe_column_that_contradicts_the_path_is_rejected(tmp_path):
    header = HEADER + ",symbol,timeframe"
    rows = ["2025-01-01T01:00:00Z,10,11,9,10.5,100,AAPL,1h", "2025-01-01T02:00:00Z,10,11,9,10.5,100,MSFT,1h",
            "2025-01-01T03:00:00Z,10,11,9,10.5,100,AAPL,1d", "2025-01-01T04:00:00Z,10,11,9,10.5,100,,"]
    write_csv(tmp_path / "1h" / "AAPL.csv", "\n".join([header, *rows]) + "\n")
    good, found = rejected(tmp_path, "AAPL", "1h")
    assert good["bar_time"].to_list() == [T0 + timedelta(hours=h) for h in (1, 4)]
    assert good["symbol"].to_list() == ["AAPL"] * 2 and good["timeframe"].to_list() == ["1h"] * 2
    assert found == {"symbol_mismatch": ["line 3: symbol='MSFT' contradicts the file's AAPL"],
                     "timeframe_mismatch": ["line 4: timeframe='1d' contradicts the file's 1h"],
                     "gap": ["gap of 10800s after 2025-01-01T01:00:00Z (max 3600s)"]}


def test_parquet_symbol_mismatch(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    wrong = bars.head(3).with_columns(pl.lit("ETHUSD").alias("symbol"))
    wrong.write_parquet(tmp_path / "5m" / "BTCUSD.parquet")
    good, found = rejected(tmp_path, "BTCUSD", "5m")
    assert good.height == 0
    assert found["symbol_mismatch"] == [f"row {i}: symbol='ETHUSD' contradicts the file's BTCUSD"
                                        for i in (1, 2, 3)]
