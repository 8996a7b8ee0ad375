"""Bars from files: `<data_dir>/<timeframe>/<SYMBOL>.parquet` or `.csv`, or a hive folder
`<data_dir>/<timeframe>/symbol=<SYMBOL>/*.parquet`.

Files need bar_time (bar END time; CSV: ISO 8601 text, UTC unless it carries an offset; parquet: a
datetime, UTC if naive) and open, high, low, close, volume. symbol and timeframe columns are optional
(taken from the path). Rows come back in file order: ordering problems are for `validate_bars`
to find and report, not to be hidden by a sort here. Ranges are (start, end] on bar_time, as for
synthetic bars.

A file that cannot be used at all (missing, empty, no rows, not a table, a required column missing
or holding no usable value) is a DataError: one line naming the file, never its bytes. A row that
cannot be read (a cell that is not a number or a time, a symbol or timeframe that contradicts the
path) is kept with a `problem` (BAR_PROBLEM_SCHEMA) for `validate_bars` to reject and record; the
rest of the file is used. See docs/data.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from signalgen.data.schema import BAR_PROBLEM_SCHEMA, BAR_SCHEMA, BarReason
from signalgen.errors import DataError

_VALUES = ("open", "high", "low", "close", "volume")
_TIME = BAR_SCHEMA["bar_time"]
_SHOWN = 24  # characters of a bad cell shown in a rejection's detail
# ISO 8601 after a space separator is turned into "T"; an offset (or Z) is optional, seconds too.
_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M%#z", "%Y-%m-%dT%H:%M",
                 "%Y-%m-%d")
_SNIFF_BYTES = 4096


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def bounded(text: object, limit: int = 60) -> str:
    """`text` made safe for a one-line message: non-printable characters as '?', at most `limit` chars."""
    s = "".join(ch if ch.isprintable() else "?" for ch in str(text)[: limit + 1])
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _shown(col: str) -> pl.Expr:
    """A cell as bounded, printable text for a rejection detail."""
    cell = pl.col(col).cast(pl.String).str.replace_all(r"[^\x20-\x7E]", "?")
    return pl.concat_str(pl.lit(f"{col}='"), cell.str.slice(0, _SHOWN),
                         pl.when(cell.str.len_chars() > _SHOWN).then(pl.lit("…")).otherwise(pl.lit("")),
                         pl.lit("'"))


def _parse_time(col: str) -> pl.Expr:
    text = pl.col(col).str.strip_chars().str.replace(r"^(\d{4}-\d\d-\d\d) ", "${1}T")
    return pl.coalesce([text.str.to_datetime(f, time_unit="us", time_zone="UTC", strict=False)
                        for f in _TIME_FORMATS])


def _check_text(path: Path) -> None:
    """A CSV must be UTF-8 text: refuse binary files before polars echoes their bytes as column names."""
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or type(exc).__name__}") from exc
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the sniff boundary
            raise DataError(f"{path}: not a CSV text file (not UTF-8 at byte {exc.start})") from None
    if b"\x00" in head:
        raise DataError(f"{path}: not a CSV text file (binary bytes)")


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

    def digests(self, symbol: str, timeframe: str) -> dict[str, str]:
        """sha256 of each file the series is read from, by its path under the data folder ({} when the
        series has no file; "unreadable (<reason>)" for a file that cannot be read)."""
        try:
            path = self._find(symbol, timeframe)
        except DataError:
            return {}
        out = {}
        for file in sorted(path.glob("*.parquet")) if path.is_dir() else [path]:
            name = file.relative_to(self.data_dir).as_posix()
            try:
                with file.open("rb") as f:
                    out[name] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as exc:
                out[name] = f"unreadable ({exc.strerror or type(exc).__name__})"
        return out

    def _read(self, path: Path) -> pl.DataFrame:
        """Every row of the file, raw (CSV cells as text), with a 0-based `_row`."""
        try:
            if path.is_file() and path.stat().st_size == 0:
                raise DataError(f"{path}: empty file (0 bytes)")
            if path.suffix == ".csv":
                _check_text(path)
                lf = pl.scan_csv(path, infer_schema=False)  # text: cells are parsed (and judged) below
            else:
                lf = pl.scan_parquet(path / "*.parquet" if path.is_dir() else path, hive_partitioning=False)
            schema = lf.collect_schema()
            missing = [c for c in ("bar_time", *_VALUES) if c not in schema]
            if missing:
                names = ", ".join(repr(bounded(n, 16)) for n in schema.names()[:5])
                more = f" and {len(schema) - 5} more" if len(schema) > 5 else ""
                raise DataError(f"{path}: missing column {missing[0]!r} (has {names or 'none'}{more})")
            keep = [c for c in ("symbol", "timeframe", "bar_time", *_VALUES) if c in schema]
            df = lf.select(keep).with_row_index("_row").collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            # polars' messages can quote file content: keep the kind and a bounded text only
            raise DataError(f"{path}: cannot read: {type(exc).__name__}: {bounded(exc, 80)}") from exc
        if df.height == 0:
            raise DataError(f"{path}: no rows")
        return df

    def _parse(self, path: Path, raw: pl.DataFrame, symbol: str, timeframe: str) -> pl.DataFrame:
        """BAR_SCHEMA + BAR_PROBLEM_SCHEMA + `_row`: cells parsed, unreadable ones null and marked."""
        where = "line" if path.suffix == ".csv" else "row"
        offset = 2 if path.suffix == ".csv" else 1  # 1-based, after the CSV header line
        empty_time = (pl.col("bar_time").is_null(), BarReason.NON_FINITE, pl.lit("bar_time is empty"))
        parsed, problems = {}, [empty_time]
        for col in ("bar_time", *_VALUES):
            dtype = raw.schema[col]
            if dtype == pl.String:
                value = _parse_time(col) if col == "bar_time" else \
                    pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
                what = "an ISO 8601 time" if col == "bar_time" else "a number"
                problems.append((pl.col(col).is_not_null() & value.is_null(), BarReason.UNPARSABLE,
                                 pl.concat_str(_shown(col), pl.lit(f" is not {what}"))))
            elif col == "bar_time" and isinstance(dtype, pl.Datetime):
                value = (pl.col(col).dt.replace_time_zone("UTC") if dtype.time_zone is None
                         else pl.col(col).dt.convert_time_zone("UTC")).cast(_TIME)
            elif col != "bar_time" and dtype.is_numeric():
                value = pl.col(col).cast(pl.Float64)
            else:
                need = "a datetime or ISO text" if col == "bar_time" else "numeric"
                raise DataError(f"{path}: column {col!r} must be {need}, found {dtype}")
            parsed[col] = value
        for col, default, reason in (("symbol", symbol, BarReason.SYMBOL_MISMATCH),
                                     ("timeframe", timeframe, BarReason.TIMEFRAME_MISMATCH)):
            if col in raw.columns:
                text = pl.col(col).cast(pl.String).str.strip_chars()
                problems.append((text.is_not_null() & (text != default), reason,
                                 pl.concat_str(_shown(col), pl.lit(f" contradicts the file's {default}"))))
        df = raw.with_columns(
            _problem(problems, 0).alias("problem"),
            pl.concat_str(pl.lit(f"{where} "), pl.col("_row") + offset, pl.lit(": "), _problem(problems, 1))
            .alias("problem_detail"),
            pl.lit(symbol).alias("symbol"), pl.lit(timeframe).alias("timeframe"),
            **{col: value.alias(col) for col, value in parsed.items()},
        )
        for col in ("bar_time", *_VALUES):  # a column in which nothing parses is the wrong column
            cells = raw.height - raw[col].null_count()
            if raw.schema[col] == pl.String and cells and df[col].null_count() == df.height:
                need = "an ISO 8601 time" if col == "bar_time" else "numeric"
                raise DataError(f"{path}: column {col!r} must be {need}: none of its {cells} values parses")
        return df.select("_row", *BAR_SCHEMA.names(), *BAR_PROBLEM_SCHEMA.names()).cast(
            {**BAR_SCHEMA, **BAR_PROBLEM_SCHEMA})

    def load(self, symbol: str, timeframe: str, start: datetime | None = None,
             end: datetime | None = None) -> pl.DataFrame:
        """Bars of one symbol with bar_time in (start, end], file order: BAR_SCHEMA + BAR_PROBLEM_SCHEMA.

        A row whose bar_time is null or unreadable belongs to the range of the nearest earlier row
        with a time (or the next one, at the top of the file), so exactly one range reports it.

        Raises:
            DataError: no file for the symbol (names the paths searched), or a file that cannot be
                used at all (names the file and what is wrong, never its content).
        """
        path = self._find(symbol, timeframe)
        df = self._parse(path, self._read(path), symbol, timeframe)
        if start is not None or end is not None:
            near = pl.col("bar_time").forward_fill().backward_fill()
            inside = pl.lit(True)
            if start is not None:
                inside &= near > _utc(start)
            if end is not None:
                inside &= near <= _utc(end)
            df = df.filter(inside | near.is_null())
        return df.drop("_row")

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


def _problem(problems: list[tuple[pl.Expr, BarReason, pl.Expr]], part: int) -> pl.Expr:
    """The first problem's reason (part 0) or detail (part 1), null when the row has none."""
    out: pl.Expr = pl.lit(None, pl.String)
    for cond, reason, detail in reversed(problems):  # built from the last so the first wins
        out = pl.when(cond).then(pl.lit(reason.value) if part == 0 else detail).otherwise(out)
    return out
