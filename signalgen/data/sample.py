"""Real daily bars that work offline: the stock sample bundled with bokeh_sampledata.

`stocks.csv.gz` holds AAPL, MSFT, IBM, GOOG and FB daily OHLCV for 2000-2013 (public domain),
unadjusted (splits show as price jumps). The file is read as package data with polars; neither
pandas nor bokeh_sampledata's loader modules are imported. Rows are written as they are: bad ones
are for `validate_bars` to reject.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import polars as pl

from signalgen.data.schema import BAR_SCHEMA

_PACKAGE = "bokeh_sampledata"
_FILE = ("_data", "stocks.csv.gz")
_SESSION_CLOSE = "16h"  # bar_time = the session's close, 16:00 New York time
_EXCHANGE_TZ = "America/New_York"


def sample_bars() -> pl.DataFrame:
    """All sample bars as BAR_SCHEMA (timeframe "1d"), in file order."""
    resource = importlib.resources.files(_PACKAGE).joinpath(*_FILE)
    raw = pl.read_csv(resource.read_bytes(), schema_overrides={"Date": pl.String})
    close_time = (pl.col("Date").str.to_date("%Y-%m-%d").cast(pl.Datetime("us"))
                  .dt.offset_by(_SESSION_CLOSE)
                  .dt.replace_time_zone(_EXCHANGE_TZ)
                  .dt.convert_time_zone("UTC"))
    return raw.select(
        pl.col("Ticker").alias("symbol"),
        pl.lit("1d").alias("timeframe"),
        close_time.alias("bar_time"),
        pl.col("Open").alias("open"),
        pl.col("High").alias("high"),
        pl.col("Low").alias("low"),
        pl.col("Close").alias("close"),
        pl.col("Volume").alias("volume"),
    ).cast(dict(BAR_SCHEMA))


def import_sample(data_dir: Path) -> list[tuple[Path, int]]:
    """Write `<data_dir>/1d/<TICKER>.parquet` for every ticker of the sample (rewrites).

    Returns:
        (path, rows) for each file written, by ticker.
    """
    bars = sample_bars()
    folder = Path(data_dir) / "1d"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (ticker,), group in sorted(bars.group_by("symbol", maintain_order=True), key=lambda kv: kv[0]):
        path = folder / f"{ticker}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        group.write_parquet(tmp)
        tmp.replace(path)  # a reader never sees a half-written file
        written.append((path, group.height))
    return written
