"""QuantConnect CSV: one file per mode, client, strategy and UTC day, read by a LEAN custom data class.

Layout `<output_dir>/<mode>/quantconnect/<client>/<strategy>/<YYYYMMDD>.csv`, columns `CSV_COLUMNS`
(docs/outputs.md), the last one the mode, so a reader configured for one mode can skip any other.
`time` is when the signal became available, rounded up to the second so a backtest never sees a
signal before it existed; the file's day is that time's UTC date.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Self

import polars as pl

from signalgen.config.models import RunConfig
from signalgen.outputs import client_batch
from signalgen.outputs.base import Output
from signalgen.signals.types import SIGNAL_SCHEMA
from signalgen.errors import storage_error

CSV_COLUMNS = ("time", "symbol", "direction", "confidence", "magnitude", "weight", "period", "signal_id", "mode")
_SAFE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # the config's SafeId: safe as a folder name
_TEMP = re.compile(r"^\.\d{8}\.csv\.\d+\.tmp$")  # what _merge_into writes before its rename


def csv_rows(signals: pl.DataFrame) -> pl.DataFrame:
    """Signals as CSV rows (every column a formatted string) plus `strategy_id` and `day`."""
    t = pl.col("generated_at").dt.convert_time_zone("UTC")
    whole = t.dt.truncate("1s")
    up = pl.when(whole < t).then(whole + pl.duration(seconds=1)).otherwise(whole)
    # Decimal casts give fixed decimals ("0.500000"), which float formatting cannot.
    return signals.select(
        "strategy_id",
        up.dt.to_string("%Y%m%d").alias("day"),
        up.dt.to_string("%Y-%m-%d %H:%M:%S").alias("time"),
        "symbol",
        pl.col("direction").cast(pl.String),
        pl.col("confidence").cast(pl.Decimal(38, 6)).cast(pl.String),
        pl.col("magnitude").cast(pl.Decimal(38, 8)).cast(pl.String),
        pl.col("weight").cast(pl.Decimal(38, 6)).cast(pl.String),
        pl.col("period").cast(pl.String),
        "signal_id",
        "mode",
    )


class QuantConnectCsvOutput(Output):
    """Writes one client's signals as LEAN-readable CSV day files.

    `write()` buffers; `flush()` merges the buffered rows into every touched day file by
    signal_id (the new row wins), sorts by time, symbol, signal_id, and replaces the file
    atomically (temp file, fsync, rename), so a re-run rewrites rows instead of appending
    duplicates and a reader never sees half a file. If `flush()` raises, the buffered rows are
    dropped: the caller replays from its checkpoint and the merge makes the replay harmless.
    """

    def __init__(self, output_dir: Path | str, client_id: str, mode: str) -> None:
        for what, name in (("client id", client_id), ("mode", mode)):
            if not _SAFE.match(name):
                raise ValueError(f"{what} {name!r} is not a safe folder name")
        self.client_id, self.mode = client_id, mode
        self.root = Path(output_dir) / mode / "quantconnect" / client_id
        self._pending: list[pl.DataFrame] = []
        self._owned: dict[str, tuple[str, str]] = {}  # strategy -> (after, up to) CSV `time` text
        # signal ids this output wrote since it was opened, per strategy: what `own` keeps in its
        # interval even when they were flushed before (a writer serving workers flushes every commit)
        self._written: dict[str, set[str]] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig, client_id: str) -> Self:
        return cls(Path(cfg.root) / cfg.environment.paths.output_dir, client_id, cfg.mode.name.value)

    def open(self) -> None:
        """Create the client's folder and remove temporary files a killed run left in it (the
        recorder is the only writer of these files, so no temporary file here is in use)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for tmp in self.root.glob("*/.*.tmp"):
                if _TEMP.match(tmp.name):
                    tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise storage_error(self.root, exc) from exc

    def write(self, batch: pl.DataFrame) -> None:
        """Buffer signals of this client and mode (ValueError for any other client's or mode's row)."""
        batch = client_batch(batch, self.client_id, self.mode)
        if "retracted" in batch.columns:  # stream rows: a file holds current signals (own() drops the rest)
            batch = batch.filter(~pl.col("retracted")).select(SIGNAL_SCHEMA.names())
        bad = [s for s in batch["strategy_id"].unique().to_list() if not (s and _SAFE.match(s))]
        if bad:
            raise ValueError(f"strategy ids {bad} are not safe folder names")
        if batch.height:
            self._pending.append(batch)

    def own(self, strategy_id: str, start: datetime, end: datetime) -> None:
        """Declare the rows this output was given since it opened (flushed already or still buffered)
        to be all of `strategy_id`'s signals whose time is in (start, end] (a finished batch run): the
        next flush drops every other row of that interval from its day files — days left without
        signals included — so a re-run with another config leaves no signal the run no longer
        produces, whether the run flushed once at its end or at every group commit."""
        self._owned[strategy_id] = (_csv_time(start), _csv_time(end))

    def flush(self) -> None:
        """Merge buffered signals into their day files; durable when this returns.

        A file or folder that cannot be written raises StorageError naming it."""
        try:
            self._flush()
        except OSError as exc:
            raise storage_error(self.root, exc) from exc

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        owned, self._owned = self._owned, {}
        days: dict[tuple[str, str], pl.DataFrame] = {}
        if pending:
            batch = pl.concat(pending)
            for strategy, ids in batch.group_by("strategy_id").agg("signal_id").iter_rows():
                self._written.setdefault(strategy, set()).update(ids)
            rows = csv_rows(batch)
            days = {(str(s), str(d)): df.select(CSV_COLUMNS)
                    for (s, d), df in rows.partition_by("strategy_id", "day", as_dict=True).items()}
        for strategy, (after, up_to) in owned.items():
            first, last = after[:10].replace("-", ""), up_to[:10].replace("-", "")
            for path in (self.root / strategy).glob("*.csv"):
                if first <= path.stem <= last:
                    days.setdefault((strategy, path.stem), pl.DataFrame(schema={c: pl.String for c in CSV_COLUMNS}))
        if not days:
            return
        folders = {self.root / strategy for strategy, _ in days}
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        # each file ends in an fsync, which releases the GIL: a few threads overlap the disk waits
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda item: _merge_into(self.path_for(*item[0]), item[1], owned.get(item[0][0]),
                                                   self._written.get(item[0][0], set())),
                          days.items()))
        for folder in folders:  # make the renames themselves durable
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Flush what is still buffered."""
        self.flush()

    def path_for(self, strategy_id: str, day: str) -> Path:
        """The file holding `strategy_id`'s signals of `day` (YYYYMMDD)."""
        return self.root / strategy_id / f"{day}.csv"


def _csv_time(t: datetime) -> str:
    """`t` as CSV `time` text, rounded up to the second like every row's time."""
    whole = t.astimezone(timezone.utc).replace(microsecond=0)
    return f"{whole + timedelta(seconds=1) if whole < t else whole:%Y-%m-%d %H:%M:%S}"


def _merge_into(path: Path, new: pl.DataFrame, replace: tuple[str, str] | None = None,
                keep: set[str] = frozenset()) -> None:
    """Rewrite `path` with its rows merged with `new` by signal_id; rows whose time falls in
    `replace` = (after, up to] are dropped first unless their id is in `keep` (their interval is
    owned by what this output wrote: `new` and `keep`)."""
    if path.exists():
        old = pl.read_csv(path, infer_schema=False)
        if tuple(old.columns) != CSV_COLUMNS:
            raise ValueError(f"{path}: header {old.columns} is not {list(CSV_COLUMNS)}; not merging into it")
        if replace:
            old = old.filter((pl.col("time") <= replace[0]) | (pl.col("time") > replace[1])
                             | pl.col("signal_id").is_in(list(keep)))
        new = pl.concat([old, new]).unique(subset="signal_id", keep="last", maintain_order=True)
    new = new.sort("time", "symbol", "signal_id")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            new.write_csv(f, line_terminator="\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):  # keep the original error
            tmp.unlink(missing_ok=True)
        raise
