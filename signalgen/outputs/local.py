"""The local-dev internal stream: one JSON-lines file per mode and client, appended to.

Layout `<messaging.path>/<mode>/<client>.jsonl`: a live consumer reads `<path>/live/`, which no
historical, simulation or mock run ever writes. Each line is one stream entry: the STREAM_SCHEMA fields
(the signal's, `mode` included, then `revision` and `retracted`), datetimes as ISO-8601 UTC strings
("2024-01-02T14:30:00.000000Z"), `models` as a list of {model_id, version, output} objects.

A signal is appended once, and again only when the store gives it a new revision (what it says
changed, or a re-run retracted it): re-running a range leaves the file byte-identical. Delivery is
still at-least-once (a crash between the append and the checkpoint replays it), so consumers keep
the highest revision of each signal_id and drop a retracted one (`read_stream` does).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Self

import polars as pl

from signalgen.config.models import RunConfig
from signalgen.outputs import client_batch
from signalgen.outputs.base import Output
from signalgen.signals.types import SIGNAL_SCHEMA, STREAM_SCHEMA, VOLATILE, stream_rows
from signalgen.errors import storage_error

ISO_UTC = "%Y-%m-%dT%H:%M:%S%.6fZ"
_TIMES = ("bar_time", "generated_at")


def to_json_lines(signals: pl.DataFrame) -> bytes:
    """Signals (SIGNAL_SCHEMA or STREAM_SCHEMA) as JSON lines, one object per row, each ending in a newline."""
    buf = io.BytesIO()
    signals.with_columns(pl.col(_TIMES).dt.convert_time_zone("UTC").dt.to_string(ISO_UTC)).write_ndjson(buf)
    return buf.getvalue()


def read_stream(path: Path | str, dedupe: bool = True) -> pl.DataFrame:
    """A stream file as a consumer sees it: with `dedupe`, its current signals (SIGNAL_SCHEMA): the
    highest revision of each id, the last copy of it, unless that one is a retraction; without,
    every line (STREAM_SCHEMA; a line from before revisions reads as revision 0, not retracted).

    An unterminated last line is a write in progress or one cut short by a crash; it is skipped
    (the writer replays it).
    """
    data = Path(path).read_bytes() if Path(path).exists() else b""
    data = data[: data.rfind(b"\n") + 1]
    if not data:
        return (SIGNAL_SCHEMA if dedupe else STREAM_SCHEMA).to_frame()
    # Read narrow ints and datetimes as JSON gives them, then cast to the schema.
    wire = pl.Schema({**STREAM_SCHEMA, "direction": pl.Int64, "period": pl.Int64, "revision": pl.Int64,
                      **dict.fromkeys(_TIMES, pl.String)})
    df = pl.read_ndjson(io.BytesIO(data), schema=wire).with_columns(
        pl.col(_TIMES).str.to_datetime(ISO_UTC, time_unit="us", time_zone="UTC"),
        pl.col("revision").fill_null(0), pl.col("retracted").fill_null(False),
    ).cast(STREAM_SCHEMA)
    if not dedupe:
        return df
    newest = df.filter(pl.col("revision") == pl.col("revision").max().over("signal_id"))
    current = newest.unique("signal_id", keep="last", maintain_order=True)
    return current.filter(~pl.col("retracted")).select(SIGNAL_SCHEMA.names())


def content_digests(signals: pl.DataFrame) -> dict[str, bytes]:
    """signal_id -> digest of what the entry says (its JSON line without the VOLATILE fields; the
    revision and retraction included).

    Hashing the serialized line makes a signal read back from a file and the same signal built in
    memory digest alike (the JSON text round-trips exactly). The last row of an id wins.
    """
    return dict(zip(signals["signal_id"], _digests(stream_rows(signals)), strict=True))


def _digests(signals: pl.DataFrame) -> list[bytes]:
    """Each row's content digest (`content_digests`), in row order."""
    blank = signals.with_columns(pl.lit(None, signals.schema[c]).alias(c) for c in VOLATILE)
    return [hashlib.blake2b(line, digest_size=16).digest() for line in to_json_lines(blank).splitlines()]


class LocalStreamOutput(Output):
    """Appends one client's signals of one mode to `<path>/<mode>/<client>.jsonl`.

    `open()` indexes the file (signal_id -> content digest); `flush()` appends, in one write, the
    buffered signals that are new or whose content changed, then fsyncs the file. If it raises,
    the file is cut back to where the append began (no half lines), the index is unchanged and
    the buffered signals are dropped; the caller replays from its checkpoint. A file that cannot
    be written raises StorageError naming it.
    """

    def __init__(self, path: Path | str, client_id: str, mode: str) -> None:
        self.client_id, self.mode = client_id, mode
        self.file = Path(path) / mode / f"{client_id}.jsonl"
        self._fd: int | None = None
        self._pending: list[pl.DataFrame] = []
        self._sent: dict[str, bytes] = {}  # signal_id -> content digest of its last line

    @classmethod
    def from_config(cls, cfg: RunConfig, client_id: str) -> Self:
        return cls(Path(cfg.root) / cfg.environment.messaging.path, client_id, cfg.mode.name.value)

    def open(self) -> None:
        if self._fd is not None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: after a failed write no stale bytes wait in a buffer to be written later.
            fd = os.open(self.file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # A crash mid-append can leave a partial last line; drop it so the next line starts clean.
                os.ftruncate(fd, _complete_length(fd))
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise storage_error(self.file, exc) from exc
        self._fd = fd
        self._sent = content_digests(read_stream(self.file, dedupe=False))

    def write(self, batch: pl.DataFrame) -> None:
        """Buffer signals of this client and mode (ValueError for any other client's or mode's row);
        rows without a revision are first deliveries."""
        batch = client_batch(batch, self.client_id, self.mode)
        if batch.height:
            self._pending.append(stream_rows(batch))

    def flush(self) -> None:
        """Append the buffered signals that are new or changed; durable (fsynced) when this returns."""
        errors = self.flush_all([self])
        if errors:
            raise errors[0]

    @classmethod
    def flush_all(cls, outputs: list[LocalStreamOutput]) -> list[Exception]:
        """Flush several clients' streams: their buffered signals serialised and digested in one
        polars pass (a writer serving 50 clients paid ~1.5 ms of polars per client and group), then
        each file appended and fsynced on its own; a file that fails costs the others nothing."""
        errors: list[Exception] = []
        ready: dict[str, LocalStreamOutput] = {}
        for out in outputs:
            if out._fd is None:
                errors.append(RuntimeError(f"{out.file}: call open() first"))
            elif out._pending:
                if out.client_id in ready:  # two files of one client (never in one writer): one at a time
                    errors += cls.flush_all([ready.pop(out.client_id)]) + cls.flush_all([out])
                else:
                    ready[out.client_id] = out
        if not ready:
            return errors
        frames = [frame for out in ready.values() for frame in out._pending]
        for out in ready.values():
            out._pending = []
        try:
            signals = pl.concat(frames).unique(["client_id", "signal_id"], keep="last", maintain_order=True)
            digests = _digests(signals)
            lines = to_json_lines(signals).split(b"\n")[:-1]  # one per row, as writing each row alone gives it
        except Exception as exc:  # noqa: BLE001 - every stream of the group failed alike
            return errors + [exc] * len(ready)
        rows: dict[str, list[tuple[str, bytes, bytes]]] = {client: [] for client in ready}
        for client, signal_id, digest, line in zip(signals["client_id"], signals["signal_id"], digests, lines,
                                                    strict=True):
            rows[client].append((signal_id, digest, line + b"\n"))
        for client, out in ready.items():
            try:
                out._append(rows[client])
            except Exception as exc:  # noqa: BLE001 - one failing file must not block the others
                errors.append(exc)
        return errors

    def _append(self, rows: list[tuple[str, bytes, bytes]]) -> None:
        """Append the lines of the (signal id, digest, line) rows whose content is new, then fsync."""
        news = [line for signal_id, digest, line in rows if self._sent.get(signal_id) != digest]
        if not news:
            return
        data = memoryview(b"".join(news))
        start = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except BaseException as exc:
            os.ftruncate(self._fd, start)
            if isinstance(exc, OSError):
                raise storage_error(self.file, exc) from exc
            raise
        self._sent.update((signal_id, digest) for signal_id, digest, _ in rows)

    def close(self) -> None:
        """Flush what is still buffered and close the file."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = None


def _complete_length(fd: int) -> int:
    """Length of the file up to and including its last newline."""
    pos = os.fstat(fd).st_size
    while pos > 0:
        step = min(1 << 16, pos)
        pos -= step
        chunk = os.pread(fd, step, pos)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return pos + cut + 1
    return 0
