from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import polars as pl

from signalgen.data.files import FilesSource
from signalgen.data.sample import import_sample
from signalgen.data.schema import BAR_SCHEMA
from signalgen.data.validation import validate_bars

ROWS = {"AAPL": 3270, "FB": 196, "GOOG": 2148, "IBM": 3270, "MSFT": 3270}


def test_writes_one_parquet_per_ticker(tmp_path):
    written = import_sample(tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), n) for p, n in written] == [
        (f"1d/{t}.parquet", n) for t, n in ROWS.items()]
    aapl = pl.read_parquet(tmp_path / "1d" / "AAPL.parquet")
    assert aapl.schema == BAR_SCHEMA
    assert aapl["timeframe"].unique().to_list() == ["1d"] and aapl["symbol"].unique().to_list() == ["AAPL"]
    first = aapl.row(0, named=True)
    assert (first["open"], first["high"], first["low"], first["close"], first["volume"]) == (
        118.56, 132.06, 118.5, 130.31, 9616100.0)


def test_bar_time_is_the_new_york_close_in_utc(tmp_path):
    import_sample(tmp_path)
    times = pl.read_parquet(tmp_path / "1d" / "MSFT.parquet")["bar_time"]
    assert times[0] == datetime(2000, 3, 1, 21, tzinfo=timezone.utc)  # EST: 16:00 = 21:00 UTC
    summer = times.filter(times.dt.date() == datetime(2000, 7, 3).date())
    assert summer.to_list() == [datetime(2000, 7, 3, 20, tzinfo=timezone.utc)]  # EDT: 20:00 UTC


def test_idempotent_and_readable_by_the_files_source(tmp_path):
    first = import_sample(tmp_path)
    before = pl.read_parquet(tmp_path / "1d" / "IBM.parquet")
    assert import_sample(tmp_path) == first
    assert pl.read_parquet(tmp_path / "1d" / "IBM.parquet").equals(before)
    src = FilesSource(tmp_path)
    assert src.symbols("1d") == sorted(ROWS)
    checked = validate_bars(src.load("AAPL", "1d"), "1d")
    assert checked.removed == 0 and checked.bars.height == ROWS["AAPL"]
    assert checked.counts["gap"] == 3  # 9/11, the 2007 national day of mourning, hurricane Sandy


def test_does_not_import_pandas_or_the_loader_modules(tmp_path):
    code = ("import sys; from signalgen.data.sample import import_sample; "
            f"import_sample({str(tmp_path)!r}); "
            "bad = [m for m in sys.modules if m == 'pandas' or m.startswith('bokeh_sampledata.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
