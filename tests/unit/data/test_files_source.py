from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.data.files import FilesSource
from signalgen.data.schema import BAR_SCHEMA
from signalgen.data.synthetic import synthetic_bars
from signalgen.errors import DataError

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
HEADER = "bar_time,open,high,low,close,volume"


@pytest.fixture()
def bars() -> pl.DataFrame:
    return synthetic_bars(["BTCUSD"], "5m", T0, T0 + timedelta(hours=10), seed=1)


def write_csv(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_parquet_round_trip_and_symbols(tmp_path, bars):
    (tmp_path / "5m").mkdir()
    bars.write_parquet(tmp_path / "5m" / "BTCUSD.parquet")
    bars.with_columns(pl.lit("ETHUSD").alias("symbol")).write_parquet(tmp_path / "5m" / "ETHUSD.parquet")
    src = FilesSource(tmp_path)
    assert src.symbols("5m") == ["BTCUSD", "ETHUSD"]
    assert src.symbols("1h") == []
    assert_frame_equal(src.load("BTCUSD", "5m"), bars)


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
    got = FilesSource(tmp_path).load("AAPL", "1h")
    assert got.schema == BAR_SCHEMA
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
    assert_frame_equal(src.load("BTCUSD", "5m"), bars)


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
    assert_frame_equal(pl.concat(chunks), bars)


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
