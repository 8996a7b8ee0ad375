"""Redis Streams: key names, connections, and the signal side (`RedisSink` for live workers,
`RedisOutput` for the SignalWriter). Layout and contract: docs/streams.md.

`redis` is imported lazily, here and in `data/redis_bars.py` and `storage/recorder.py`, so only runs
that use Redis need `pip install 'signalgen[redis]'`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

import polars as pl

from signalgen.errors import ConfigError, SignalgenError, StorageError, TransientError
from signalgen.outputs import client_batch
from signalgen.outputs.base import Output
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA, stream_rows

if TYPE_CHECKING:
    import redis as redis_lib

    from signalgen.config.models import RunConfig
    from signalgen.config.workers import WorkerSpec
    from signalgen.modes.engine import Decisions

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
ISO_UTC = "%Y-%m-%dT%H:%M:%S%.6fZ"  # as the local stream (outputs/local.py)
RECORDER_GROUP = "recorder"


def redis_module():
    """The redis package, or ImportError telling how to install it."""
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise ImportError("Redis messaging needs the redis package: pip install 'signalgen[redis]'") from exc
    return redis


@dataclass(frozen=True)
class StreamKeys:
    """Key names under one `messaging.stream_prefix` (docs/streams.md).

    Workers write the `internal` streams, which no client's user may touch; the decision host (the
    recorder) reads them, and is the only writer of the clients' `signals` / `rejections` streams.
    """

    prefix: str = "signalgen"

    def bars(self, symbol: str, timeframe: str) -> str:
        return f"{self.prefix}:bars:{symbol}:{timeframe}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}:deadletter:bars"

    def deadletter_seen(self, symbol: str, timeframe: str) -> str:
        """The set of the ids of `bars(symbol, timeframe)` entries already dead-lettered (one copy each)."""
        return f"{self.prefix}:deadletter:seen:{symbol}:{timeframe}"

    def signals(self, mode: str, client: str) -> str:
        return f"{self.prefix}:{mode}:signals:{client}"

    def rejections(self, mode: str, client: str) -> str:
        return f"{self.prefix}:{mode}:rejections:{client}"

    def internal(self, mode: str, kind: str, client: str) -> str:
        """A worker's decisions of `kind` ("signals" or "rejections") for `client`, before the host."""
        return f"{self.prefix}:{mode}:internal:{kind}:{client}"

    def bar_rejections(self, mode: str) -> str:
        return f"{self.prefix}:{mode}:internal:bar_rejections"

    def forwarded(self, mode: str) -> str:
        """Hash: internal stream -> the id of its last entry the host wrote to a client's stream."""
        return f"{self.prefix}:{mode}:internal:forwarded"

    def checkpoints(self, mode: str) -> str:
        return f"{self.prefix}:{mode}:checkpoints"

    def acl_user(self, client: str) -> str:
        """The Redis user of a client (`clients grant`); no ':' so it fits in a URL's user part."""
        return f"{self.prefix}-{client}"

    def client_streams(self, client: str, modes: tuple[str, ...] | None = None) -> list[str]:
        """A client's own streams — its signals and rejections of every mode (or of `modes`): all the
        keys its user may touch."""
        from signalgen.config.models import Mode

        return [key(m, client) for m in modes or [m.value for m in Mode] for key in (self.signals, self.rejections)]


def acl_key_pattern(key: str) -> str:
    """`key` as an ACL key pattern that matches it alone (glob characters escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in key)


# Creates each stream in KEYS that does not exist yet, empty (an entry added and trimmed at once): a
# client's user may then create consumer groups on its streams but never a key (MKSTREAM finds them).
ENSURE_STREAMS_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('XADD', key, 'MAXLEN', '0', '*', 'v', '0')
  end
end
return #KEYS
"""


def ensure_streams(client: redis_lib.Redis, keys: list[str]) -> None:
    """Create the streams among `keys` that do not exist yet (empty); existing ones are untouched."""
    if keys:
        client.eval(ENSURE_STREAMS_SCRIPT, len(keys), *keys)


# ---------------------------------------------------------------- connections


def connect(cfg: RunConfig, *, username: str | None = None, password: str | None = None,
            password_field: str = "messaging.password_env", socket_timeout: float = 5.0,
            check: bool = True, down: type[SignalgenError] = ConfigError) -> redis_lib.Redis:
    """A client of the environment's Redis, checked with PING unless `check` is false.

    The password is `password` if given, else the value of `messaging.password_env`. Anything wrong at
    start — a URL that does not parse, a server that does not answer, a wrong password — is a
    ConfigError naming the field (exit 2): a worker never loops on a configuration mistake. A server
    that does not answer raises `down` instead: a worker whose manager already reached Redis passes
    TransientError (the server is away, not misconfigured: wait for it). The client does not retry
    by itself (retries are the caller's, who knows what is safe to repeat).
    """
    redis = redis_module()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    m = cfg.environment.messaging
    file = cfg.files.get("environment")
    if m.type != "redis":
        raise ConfigError(f"messaging type {m.type!r} is not redis", file=file, field="messaging.type")
    if password is None and m.password_env:
        password = os.environ.get(m.password_env)
        if password is None:
            raise ConfigError(f"environment variable {m.password_env} is not set", file=file, field=password_field)
    try:
        client = redis.Redis.from_url(m.url, username=username, password=password, socket_timeout=socket_timeout,
                                      socket_connect_timeout=min(socket_timeout, 2.0), retry=Retry(NoBackoff(), 0))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a Redis URL ({exc})", file=file, field="messaging.url") from None
    if check:
        check_connection(client, cfg, password_field=password_field, down=down)
    return client


def own_connection(client: redis_lib.Redis):
    """A connection with `client`'s settings, outside its pool, connected by its first command and
    again by the first after a `disconnect()`: for a hot command sent `straight`."""
    pool = client.connection_pool
    return pool.connection_class(**pool.connection_kwargs)


def straight(conn, *command):
    """`command` on `conn` and its raw reply, without the client's command layer (connection checkout,
    retry wrapper, reply callbacks): ~70 -> ~40 us of CPU per XREAD in process, more on the cold core
    a live bar finds. A lost or timed-out connection is dropped before the error goes up, so a late
    reply can never answer the next command; the next call reconnects."""
    redis = redis_module()
    try:
        conn.send_command(*command)
        return conn.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
        raise


def check_connection(client: redis_lib.Redis, cfg: RunConfig, *, password_field: str,
                     down: type[SignalgenError] = ConfigError) -> None:
    """PING; a failure becomes a ConfigError naming the field at fault (`down` for no answer)."""
    redis = redis_module()
    file = cfg.files.get("environment")
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ConfigError(f"Redis refused the password ({exc})", file=file, field=password_field) from None
    except redis.ResponseError as exc:  # e.g. AUTH without a configured password, NOAUTH
        text = str(exc)
        if "AUTH" in text.upper() or "PASSWORD" in text.upper():
            raise ConfigError(f"Redis refused the login ({text})", file=file, field=password_field) from None
        raise ConfigError(f"Redis at {masked_url(cfg.environment.messaging.url)} answered {text!r}", file=file,
                          field="messaging.url") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        text = f"cannot reach Redis at {masked_url(cfg.environment.messaging.url)} ({exc})"
        if down is not ConfigError:
            raise down(text) from None
        raise ConfigError(f"{text}; is the URL right and the server running?", file=file,
                          field="messaging.url") from None


def masked_url(url: str, username: str | None = None, password: bool = False) -> str:
    """`url` with `username` set (if given) and any password shown as ***."""
    parts = urlsplit(url)
    user = username if username is not None else parts.username
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    auth = ""
    if user:
        auth = quote(user, safe="") + (":***" if password or parts.password else "") + "@"
    elif password or parts.password:
        auth = ":***@"
    return urlunsplit((parts.scheme, auth + host, parts.path, parts.query, parts.fragment))


# ---------------------------------------------------------------- entries


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


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SMALL_BATCH = 64  # up to this many bars, records are built without polars (a live bar: ~30 us, not ~1.5 ms)


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


def read_checkpoints(client: redis_lib.Redis, keys: StreamKeys, mode: str) -> dict[str, datetime]:
    """Worker id -> last bar time durably in the streams (the `<p>:<mode>:checkpoints` hash)."""
    return {k.decode(): datetime.fromisoformat(v.decode()) for k, v in client.hgetall(keys.checkpoints(mode)).items()}


# ---------------------------------------------------------------- the worker's sink


# A batch in one atomic step: ARGV = maxlen, number of entries, then per entry its field count and
# fields, then (worker, checkpoint) pairs; KEYS = each entry's stream, then the checkpoints hash. One
# command instead of MULTI + XADD... + HSET + EXEC: a quarter less client CPU per live bar (redis-py packs
# and parses one command, not four). Like EXEC, a command that fails at run time is not rolled back.
SEND_SCRIPT = """
local n, j = tonumber(ARGV[2]), 3
for i = 1, n do
  local m = tonumber(ARGV[j])
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, j + 1, j + 2 * m))
  j = j + 1 + 2 * m
end
if j <= #ARGV then
  redis.call('HSET', KEYS[n + 1], unpack(ARGV, j, #ARGV))
end
return n
"""
SEND_SHA = hashlib.sha1(SEND_SCRIPT.encode()).hexdigest()  # EVALSHA's name for it (what SCRIPT LOAD returns)


@dataclass
class _Batch:
    entries: list[tuple[str, dict]]            # (stream key, fields)
    checkpoint: tuple[str, datetime] | None    # (worker id, last bar time) this batch advances to


@dataclass
class SinkStats:
    sent_batches: int = 0
    sent_entries: int = 0
    outages: int = 0
    backpressure_events: int = 0
    max_buffered: int = 0                     # the most entries ever waiting
    last_outage_s: float | None = None        # first failure -> first success, of the last outage
    recovered_at: float | None = None         # time.time() of the last recovery
    exec_us: deque[int] = field(default_factory=lambda: deque(maxlen=1000))  # the last sends' round trips


class RedisSink:
    """A live worker's sink (modes.worker.Sink): decisions -> the internal streams of its client
    (`StreamKeys.internal`), each entry with the strategy's `route`; the recorder takes them on.

    Each batch is one atomic script call (`SEND_SCRIPT`, as MULTI/EXEC would be): the XADDs of its
    entries and the HSET of the worker's checkpoint, so the checkpoint (`checkpoints`) advances only when Redis has applied the entries, and both land
    or neither does. `record()` sends at once when nothing waits; when Redis does not answer, batches
    wait in a buffer of at most `max_buffered` entries while a sender thread retries with backoff
    (`backoff_s` doubling to `backoff_max_s`). A full buffer blocks `record()` — the worker stops
    consuming (backpressure), logged once per outage. After a failed send the sender reads the
    checkpoint back: a batch whose checkpoint Redis already holds landed, and is not sent again.
    An error other than a lost connection (a NOPERM, a wrong key type) is raised by the next call as
    StorageError. (Redis does not roll back a transaction in which one command failed at run time,
    e.g. a stream key someone made a string: that batch's checkpoint may then be in Redis without all
    of its entries. Such a key is an operator's mistake; the error names it.)
    """

    def __init__(self, client: redis_lib.Redis, keys: StreamKeys, mode: str, *, maxlen: int = 100_000,
                 max_buffered: int = 10_000, backoff_s: float = 0.05, backoff_max_s: float = 0.5) -> None:
        self.client, self.keys, self.mode, self.maxlen = client, keys, mode, maxlen
        self.max_buffered, self.backoff_s, self.backoff_max_s = max_buffered, backoff_s, backoff_max_s
        self.stats = SinkStats()
        self._redis = redis_module()
        self._pending: deque[_Batch] = deque()
        self._buffered = 0
        self._cond = threading.Condition()
        self._checkpoints: dict[str, datetime] = {}
        self._error: BaseException | None = None
        self._down_since: float | None = None   # monotonic time of the first failure of this outage
        self._full_logged_at: float | None = None  # when "buffer full" was last logged
        self._closing = False
        self._conn, self._conn_lock = own_connection(client), threading.Lock()  # the sends' (`_evalsha`)
        self._sender = threading.Thread(target=self._send_loop, name="redis-sink", daemon=True)
        self._sender.start()

    @classmethod
    def from_config(cls, cfg: RunConfig, **kwargs: Any) -> RedisSink:
        """The sink of a run's mode on the environment's Redis (checked now: ConfigError if misconfigured,
        TransientError if it does not answer — a worker's manager reached it, so it is away)."""
        m = cfg.environment.messaging
        return cls(connect(cfg, down=TransientError), StreamKeys(m.stream_prefix), cfg.mode.name.value,
                   maxlen=m.maxlen, **kwargs)

    # -- the Sink protocol

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        """Send (or buffer) one batch; blocks while the buffer is full."""
        if not decisions.bars:
            return
        signals, rejections = decision_entries(decisions)
        client, route = spec.client.id, spec.routing.value
        entries = [(self.keys.internal(decisions.mode, "signals", client), {**e, "route": route}) for e in signals]
        entries += [(self.keys.internal(decisions.mode, "rejections", client), {**e, "route": route})
                    for e in rejections]
        last = datetime.fromtimestamp(int(decisions.bar_time_us[-1]) / 1e6, timezone.utc)
        self._submit(_Batch(entries, (spec.id, last)))

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        """Bar rejections go to `<p>:<mode>:internal:bar_rejections` for the recorder (no checkpoint: a replay
        re-sends them and the store's upsert keeps one)."""
        if rejections.height:
            key = self.keys.bar_rejections(self.mode)
            frame = rejections.with_columns(pl.lit(run_id, pl.String).alias("run_id"))
            self._submit(_Batch([(key, {"v": SCHEMA_VERSION, "data": line}) for line in json_lines(frame)], None))

    @property
    def checkpoints(self) -> dict[str, datetime]:
        with self._cond:
            return dict(self._checkpoints)

    def resume_point(self, worker_id: str) -> datetime | None:
        """The worker's checkpoint as Redis holds it (where a restarted worker resumes)."""
        raw = self.client.hget(self.keys.checkpoints(self.mode), worker_id)
        return datetime.fromisoformat(raw.decode()) if raw else None

    @property
    def buffered(self) -> int:
        """Entries waiting for Redis."""
        with self._cond:
            return self._buffered

    def flush(self, timeout: float = 30.0) -> dict[str, datetime]:
        """Wait until every batch is in Redis; the checkpoints. TransientError if still buffered at `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"Redis did not take {len(self._pending)} batches within {timeout:.0f} s")
                self._cond.wait(min(left, 0.5))
            self._raise_error()
            return dict(self._checkpoints)

    def close(self, timeout: float = 30.0) -> None:
        """Flush (up to `timeout`), stop the sender, close the connection."""
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._sender.join(timeout=5)
            self._conn.disconnect()
            self.client.close()

    # -- sending

    def _raise_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, SignalgenError):
                raise self._error
            raise StorageError(f"Redis refused the sink's writes: {self._error}") from self._error

    def _submit(self, batch: _Batch) -> None:
        n = len(batch.entries)
        with self._cond:
            self._raise_error()
            if not self._pending and self._down_since is None:
                try:  # the fast path: nothing waits, send now on the caller's thread
                    self._send([batch])
                    self._acked([batch])
                    return
                except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
                    self._went_down(exc)
                except self._redis.RedisError as exc:
                    self._error = exc
                    self._raise_error()
            while self._pending and self._buffered + n > self.max_buffered and self._error is None:
                if self._full_logged_at is None or time.monotonic() - self._full_logged_at > 60:
                    self._full_logged_at = time.monotonic()  # once per outage, at most once a minute otherwise
                    self.stats.backpressure_events += 1
                    log.warning("redis sink buffer full (%d entries waiting): the worker stops consuming until "
                                "Redis takes them", self._buffered)
                self._cond.wait(0.5)
            self._raise_error()
            self._pending.append(batch)
            self._buffered += n
            self.stats.max_buffered = max(self.stats.max_buffered, self._buffered)
            self._cond.notify_all()

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since, self._full_logged_at = time.monotonic(), None
            self.stats.outages += 1
            log.warning("redis unreachable (%s): buffering up to %d entries, retrying", exc, self.max_buffered)

    def _send(self, batches: list[_Batch]) -> None:
        """One atomic script (`SEND_SCRIPT`): every entry of `batches`, then each worker's newest checkpoint."""
        keys: list[str] = []
        args: list = [self.maxlen, 0]
        checkpoints: dict[str, str] = {}
        for b in batches:
            for key, fields in b.entries:
                keys.append(key)
                args.append(len(fields))
                for item in fields.items():
                    args += item
            if b.checkpoint is not None:
                checkpoints[b.checkpoint[0]] = iso(b.checkpoint[1])
        args[1] = len(keys)
        keys.append(self.keys.checkpoints(self.mode))
        for item in checkpoints.items():
            args += item
        started = time.perf_counter_ns()
        self._evalsha(keys, args)
        self.stats.exec_us.append((time.perf_counter_ns() - started) // 1000)

    def _evalsha(self, keys: list[str], args: list) -> None:
        """SEND_SCRIPT by its sha on the sink's own connection, sent `straight`. A restarted Redis has lost
        the script (NOSCRIPT): it is loaded, and called once more."""
        with self._conn_lock:
            try:
                straight(self._conn, "EVALSHA", SEND_SHA, len(keys), *keys, *args)
            except self._redis.exceptions.NoScriptError:
                self.client.script_load(SEND_SCRIPT)
                straight(self._conn, "EVALSHA", SEND_SHA, len(keys), *keys, *args)

    def _acked(self, batches: list[_Batch]) -> None:
        """Called with the lock held: `batches` are in Redis. (The sender's callers then notify the
        threads waiting in `flush` or on a full buffer; the fast path has none to wake — nothing was
        pending — and waking the idle sender thread on every bar cost a thread switch per bar.)"""
        for b in batches:
            self.stats.sent_batches += 1
            self.stats.sent_entries += len(b.entries)
            if b.checkpoint is not None:
                self._checkpoints[b.checkpoint[0]] = b.checkpoint[1]
        if self._down_since is not None:
            self.stats.last_outage_s = time.monotonic() - self._down_since
            self.stats.recovered_at = time.time()
            log.warning("redis sink recovered after %.1f s; %d entries still buffered", self.stats.last_outage_s,
                        self._buffered)
            self._down_since = None

    def _drop_applied(self) -> None:
        """After a failed send: drop the batches Redis already applied (only the reply was lost).

        Transactions apply whole and in order, so the pending batches up to the last one whose
        checkpoint Redis holds were applied; batches without a checkpoint (bar rejections) in that
        prefix go with it, and any after it are sent again (the store's upsert keeps one of each).
        """
        with self._cond:
            workers = sorted({b.checkpoint[0] for b in self._pending if b.checkpoint is not None})
        if not workers:
            return
        held = self.client.hmget(self.keys.checkpoints(self.mode), workers)
        stored = {w: datetime.fromisoformat(v.decode()) for w, v in zip(workers, held) if v}
        with self._cond:
            applied = 0
            for i, b in enumerate(self._pending):
                if b.checkpoint is not None and b.checkpoint[0] in stored and stored[b.checkpoint[0]] >= b.checkpoint[1]:
                    applied = i + 1
            done = [self._pending.popleft() for _ in range(applied)]
            for b in done:
                self._buffered -= len(b.entries)
            if done:
                self._acked(done)
                self._cond.notify_all()

    def _send_loop(self) -> None:
        delay = self.backoff_s
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending or self._error is not None:
                    return
                batches = list(self._pending)[:256]
            try:
                if self._down_since is not None:
                    self._drop_applied()
                    with self._cond:
                        batches = list(self._pending)[:256]
                    if not batches:
                        continue
                self._send(batches)
            except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
                with self._cond:
                    self._went_down(exc)
                    if self._closing:  # close() gave up waiting: what is left is reported, not retried
                        return
                time.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            except self._redis.RedisError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            delay = self.backoff_s
            with self._cond:
                for b in batches:
                    self._pending.popleft()
                    self._buffered -= len(b.entries)
                self._acked(batches)
                self._cond.notify_all()


# ---------------------------------------------------------------- the SignalWriter's output


class RedisOutput(Output):
    """One client's signals of one mode to `<p>:<mode>:signals:<client>` (the `internal` destination
    of a batch run when `messaging.type: redis`). `flush()` sends the buffered signals in one
    MULTI/EXEC; if it raises, nothing may be assumed delivered (the writer keeps its checkpoint)."""

    def __init__(self, cfg: RunConfig, client_id: str) -> None:
        self.cfg, self.client_id, self.mode = cfg, client_id, cfg.mode.name.value
        m = cfg.environment.messaging
        self.key = StreamKeys(m.stream_prefix).signals(self.mode, client_id)
        self.maxlen = m.maxlen
        self._client: redis_lib.Redis | None = None
        self._pending: list[pl.DataFrame] = []

    @classmethod
    def from_config(cls, cfg: RunConfig, client_id: str) -> Self:
        return cls(cfg, client_id)

    def open(self) -> None:
        if self._client is None:
            self._client = connect(self.cfg)

    def write(self, batch: pl.DataFrame) -> None:
        batch = client_batch(batch, self.client_id, self.mode)
        if batch.height:
            self._pending.append(stream_rows(batch))

    def flush(self) -> None:
        if self._client is None:
            raise RuntimeError(f"{self.key}: call open() first")
        pending, self._pending = self._pending, []
        if not pending:
            return
        redis = redis_module()
        signals = pl.concat(pending).unique("signal_id", keep="last", maintain_order=True)
        pipe = self._client.pipeline(transaction=True)
        for fields in signal_entries(signals):
            pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(f"Redis stream {self.key}: {exc}") from exc
        except redis.RedisError as exc:
            raise StorageError(f"Redis stream {self.key}: {exc}") from exc

    def close(self) -> None:
        if self._client is not None:
            try:
                self.flush()
            finally:
                self._client.close()
                self._client = None
