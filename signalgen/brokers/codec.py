"""The entry codec every stream shares (Redis entries, Pub/Sub messages, the local JSON-lines file),
and the bar entry's fields with what publishing bars counts (`PublishStats`) on either broker.

A signal or rejection travels as `{"v": SCHEMA_VERSION, "id": <its id>, "data": <one JSON object>}`:
the object is the record's row with datetimes as ISO-8601 UTC (docs/streams.md). `decision_entries`
builds them from a batch's `Decisions`; `decode_rows` turns JSON back into the record frame, bit for
bit.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import polars as pl

from signalgen.config.models import timeframe_delta
from signalgen.signals.records import _EPOCH, SMALL_BATCH, Decisions
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA, stream_rows

SCHEMA_VERSION = "1"
ISO_UTC = "%Y-%m-%dT%H:%M:%S%.6fZ"  # as the local stream (outputs/local.py)


def _wire(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col(c).dt.convert_time_zone("UTC").dt.to_string(ISO_UTC)
                           for c, t in df.schema.items() if isinstance(t, pl.Datetime))


def json_lines(df: pl.DataFrame) -> list[bytes]:
    """Each row as one JSON object (datetimes ISO-8601 UTC), the format of the local stream's lines."""
    if not df.height:
        return []
    buf = io.BytesIO()
    _wire(df).write_ndjson(buf)
    return buf.getvalue().splitlines()


def decode_rows(lines: list[bytes], schema: pl.Schema) -> pl.DataFrame:
    """JSON objects (as `json_lines` writes them) back into a frame of `schema`, bit for bit."""
    if not lines:
        return schema.to_frame()
    wire = pl.Schema({c: (pl.String if isinstance(t, pl.Datetime) else pl.Int64 if t in (pl.Int8, pl.Int32) else t)
                      for c, t in schema.items()})
    df = pl.read_ndjson(io.BytesIO(b"\n".join(lines) + b"\n"), schema=wire)
    return df.with_columns(pl.col(c).str.to_datetime(ISO_UTC, time_unit="us", time_zone="UTC")
                           for c, t in schema.items() if isinstance(t, pl.Datetime)).cast(schema)


def record_entries(df: pl.DataFrame, id_column: str) -> list[dict[str, bytes | str]]:
    """Stream entries of signal or rejection rows: `v`, `id`, `data` (docs/streams.md)."""
    return [{"v": SCHEMA_VERSION, "id": i, "data": line} for i, line in zip(df[id_column], json_lines(df))]


def signal_entries(signals: pl.DataFrame) -> list[dict[str, bytes | str]]:
    """Entries of a client's signal stream with each signal's `revision` and `retracted` in `data`
    (STREAM_SCHEMA rows, as the store's `Written.stream` returns them; plain signals are first
    deliveries). What `RedisOutput` sends, and what a writer of the clients' streams (the recorder)
    sends after its store write (docs/streams.md, "Revisions and retractions")."""
    return record_entries(stream_rows(signals), "signal_id")


def _iso_us(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class _Layout:
    """Where a record schema keeps its times, its floats and its model outputs (by column index)."""

    names: tuple[str, ...]
    times: tuple[int, ...]
    floats: tuple[int, ...]
    models: int

    @classmethod
    def of(cls, schema: pl.Schema) -> _Layout:
        types = list(schema.values())
        return cls(tuple(schema.names()), tuple(i for i, t in enumerate(types) if isinstance(t, pl.Datetime)),
                   tuple(i for i, t in enumerate(types) if t == pl.Float64), schema.names().index("models"))


_SIGNAL_LAYOUT, _REJECTION_LAYOUT = _Layout.of(SIGNAL_SCHEMA), _Layout.of(REJECTION_SCHEMA)


def _row_entries(rows: list[tuple], layout: _Layout) -> list[dict]:
    """Stream entries of `Records` rows (SIGNAL_SCHEMA or REJECTION_SCHEMA columns, times as epoch
    microseconds): the JSON `json_lines` writes for the same rows — floats by `repr`, NaN as null."""
    entries = []
    for row in rows:
        values = list(row)
        for i in layout.times:
            values[i] = _iso_us(values[i])
        for i in layout.floats:
            if not math.isfinite(values[i]):
                values[i] = None
        for m in values[layout.models]:
            if m["output"] is not None and not math.isfinite(m["output"]):
                m["output"] = None
        record = dict(zip(layout.names, values))
        entries.append({"v": SCHEMA_VERSION, "id": row[0], "data": json.dumps(record, separators=(",", ":"))})
    return entries


def decision_entries(decisions: Decisions) -> tuple[list[dict], list[dict]]:
    """(signal entries, rejection entries) of one batch: `record_entries(decisions.frames())`, built from
    `Decisions.records()` in plain Python for a small batch (a live bar) — the same records, decoded bit
    for bit (tests/integration/redis/test_streams.py) — and through polars for a large one."""
    if decisions.bars > SMALL_BATCH:
        signals, rejections = decisions.frames()
        return record_entries(signals, "signal_id"), record_entries(rejections, "rejection_id")
    records = decisions.records()
    return _row_entries(records.signals, _SIGNAL_LAYOUT), _row_entries(records.rejections, _REJECTION_LAYOUT)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------- bars


BAR_VALUES = ("open", "high", "low", "close", "volume")


def latest_end(timeframe: str, max_ahead: timedelta, now: datetime | None = None) -> datetime:
    """The latest bar end a stream accepts now: one bar interval plus `max_ahead` after the wall
    clock. A later bar is refused (`feed`) or dead-lettered (a live worker): Redis refuses any ID
    not above a stream's last, so one bar from the future would shut out every real bar before it."""
    return (now or datetime.now(timezone.utc)) + timeframe_delta(timeframe) + max_ahead


def encode_bar(bar: dict) -> dict[str, str]:
    """A BAR_SCHEMA row as entry fields: strings, floats by `repr` (exact round trip)."""
    return {"v": SCHEMA_VERSION, "symbol": bar["symbol"], "timeframe": bar["timeframe"],
            "bar_time": iso(bar["bar_time"]), **{c: repr(float(bar[c])) for c in BAR_VALUES}}


@dataclass
class PublishStats:
    published: int = 0
    already_there: int = 0  # IDs Redis refused as not above the stream's last: published before
    refused: int = 0        # bars ending too far after the wall clock (`latest_end`): not published
    refused_examples: list[str] = field(default_factory=list)  # the first few, "SYMBOL tf bar_time"

    def refuse(self, bar: dict) -> None:
        self.refused += 1
        if len(self.refused_examples) < 3:
            self.refused_examples.append(f"{bar['symbol']} {bar['timeframe']} {iso(bar['bar_time'])}")


def paced(frames: Iterable[pl.DataFrame], columns: Sequence[str], *, speed: float, max_ahead: timedelta | None,
          stats: PublishStats) -> Iterator[tuple[datetime, list[dict], float, int]]:
    """A feed's bars, one bar time at a time (in order within each frame): (bar time, its bars, the
    monotonic time at which to publish them — paced at `speed` x real time from the first bar time;
    0 publishes at once —, how many bars it had). With `max_ahead`, bars ending after `latest_end`
    when their turn comes are refused into `stats` and left out."""
    origin: tuple[datetime, float] | None = None
    for frame in frames:
        if not frame.height:
            continue
        frame = frame.select(columns).sort("bar_time", maintain_order=True)
        for (bar_time,), group in frame.group_by("bar_time", maintain_order=True):
            at = time.monotonic()
            if speed > 0:
                if origin is None:
                    origin = (bar_time, at)
                at = origin[1] + (bar_time - origin[0]).total_seconds() / speed
            rows = list(group.iter_rows(named=True))
            if max_ahead is not None:  # judged at their turn, without waiting for the ones refused then
                due = datetime.now(timezone.utc) + timedelta(seconds=max(at - time.monotonic(), 0.0))
                late = [b for b in rows if b["bar_time"] > latest_end(b["timeframe"], max_ahead, due)]
                for bar in late:
                    stats.refuse(bar)
                    rows.remove(bar)
            yield bar_time, rows, at, group.height
