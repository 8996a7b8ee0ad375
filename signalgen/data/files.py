"""Bars from files: `<data_dir>/<timeframe>/<SYMBOL>.parquet` or `.csv`, or a hive folder
`<data_dir>/<timeframe>/symbol=<SYMBOL>/*.parquet`.

Files need bar_time (bar END time; CSV: ISO 8601 text, UTC unless it carries an offset; parquet: a
datetime, UTC if naive) and open, high, low, close, volume. symbol and timeframe columns are optional
(taken from the path). Rows come back in file order: ordering problems are for `validate_bars`
to find and report, not to be hidden by a sort here. Ranges are (start, end] on bar_time, as for
synthetic bars.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from signalgen.data.schema import BAR_SCHEMA
from signalgen.errors import DataError

_VALUES = ("open", "high", "low", "close", "volume")
_TIME = BAR_SCHEMA["bar_time"]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class FilesSource:
    """Market data read from a folder of parquet / CSV files (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    def symbols(self, timeframe: str) -> list[str]:
        """Symbols with a file for this timeframe, sorted; empty if the folder does not exist."""
        folder = self.data_dir / timeframe
        if not folder.is_dir():
            return []
        found = set()
        for path in folder.iterdir():
            if path.is_file() and path.suffix in (".parquet", ".csv"):
                found.add(path.stem)
            elif path.is_dir() and path.name.startswith("symbol=") and any(path.glob("*.parquet")):
                found.add(path.name.removeprefix("symbol="))
        return sorted(found)

    def _find(self, symbol: str, timeframe: str) -> Path:
        folder = self.data_dir / timeframe
        candidates = [folder / f"{symbol}.parquet", folder / f"{symbol}.csv", folder / f"symbol={symbol}"]
        for path in candidates:
            if path.is_file() or (path.is_dir() and any(path.glob("*.parquet"))):
                return path
        raise DataError(f"no bars for {symbol} {timeframe}: searched {', '.join(map(str, candidates))}")

    def _scan(self, path: Path, symbol: str, timeframe: str) -> pl.LazyFrame:
        if path.suffix == ".csv":
            lf = pl.scan_csv(path, schema_overrides={"bar_time": pl.String, "symbol": pl.String,
                                                     "timeframe": pl.String})
        else:
            lf = pl.scan_parquet(path / "*.parquet" if path.is_dir() else path, hive_partitioning=False)
        try:
            schema = lf.collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataError(f"{path}: cannot read: {exc}") from exc
        for col in ("bar_time", *_VALUES):
            if col not in schema:
                raise DataError(f"{path}: missing column {col!r} (has {', '.join(schema.names())})")
        for col in _VALUES:
            if not schema[col].is_numeric():
                raise DataError(f"{path}: column {col!r} must be numeric, found {schema[col]}")
        time_type = schema["bar_time"]
        if time_type == pl.String:
            bar_time = pl.col("bar_time").str.to_datetime(time_unit="us", time_zone="UTC", strict=True)
        elif isinstance(time_type, pl.Datetime):
            bar_time = pl.col("bar_time")
            bar_time = (bar_time.dt.replace_time_zone("UTC") if time_type.time_zone is None
                        else bar_time.dt.convert_time_zone("UTC"))
            bar_time = bar_time.cast(_TIME)
        else:
            raise DataError(f"{path}: column 'bar_time' must be a datetime or ISO text, found {time_type}")
        def text(col: str, default: str) -> pl.Expr:
            return (pl.col(col).cast(pl.String) if col in schema else pl.lit(default)).alias(col)

        return lf.select(
            text("symbol", symbol),
            text("timeframe", timeframe),
            bar_time.alias("bar_time"),
            *(pl.col(c).cast(pl.Float64) for c in _VALUES),
        )

    def load(self, symbol: str, timeframe: str, start: datetime | None = None,
             end: datetime | None = None) -> pl.DataFrame:
        """Bars of one symbol with bar_time in (start, end] (BAR_SCHEMA, file order).

        Raises:
            DataError: no file for the symbol (names the paths searched), or a file with missing or
                unusable columns (names the file and the column).
        """
        path = self._find(symbol, timeframe)
        lf = self._scan(path, symbol, timeframe)
        if start is not None:
            lf = lf.filter(pl.col("bar_time") > _utc(start))
        if end is not None:
            lf = lf.filter(pl.col("bar_time") <= _utc(end))
        try:
            return lf.collect().cast(dict(BAR_SCHEMA))
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{path}: {exc}") from exc

    def iter_chunks(self, symbol: str, timeframe: str, start: datetime | None, end: datetime | None,
                    chunk_bars: int) -> Iterator[pl.DataFrame]:
        """`load`, yielded as consecutive frames of at most chunk_bars rows.

        The range is read once and sliced (zero-copy): one symbol's bars fit in memory (a year of
        1m bars is ~35 MB).
        """
        if chunk_bars < 1:
            raise ValueError(f"chunk_bars must be >= 1, got {chunk_bars}")
        bars = self.load(symbol, timeframe, start, end)
        for offset in range(0, bars.height, chunk_bars):
            yield bars.slice(offset, chunk_bars)
