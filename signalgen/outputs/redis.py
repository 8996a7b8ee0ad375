"""Redis Streams, the signal side: `RedisSink` (a live worker's sink) and `RedisOutput` (a batch
output of the SignalWriter). Key names, connections and the entry codec are the broker's
(`signalgen.brokers.redis`, `signalgen.brokers.codec`). Layout and contract: docs/streams.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Self

import polars as pl

from signalgen.brokers.codec import SCHEMA_VERSION, decision_entries, iso, json_lines, signal_entries
from signalgen.brokers.redis import StreamKeys, connect, own_connection, redis_module, straight
from signalgen.errors import SignalgenError, StorageError, TransientError
from signalgen.outputs import client_batch
from signalgen.outputs.base import Output
from signalgen.signals.types import stream_rows

if TYPE_CHECKING:
    import redis as redis_lib

    from signalgen.config.models import RunConfig
    from signalgen.config.workers import WorkerSpec
    from signalgen.signals.records import Decisions

log = logging.getLogger(__name__)

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

    paused_keys = 0  # no ordering keys to pause here (StreamSink)

    def resume_point(self, worker_id: str) -> datetime | None:
        """The worker's checkpoint as Redis holds it (where a restarted worker resumes)."""
        raw = self.client.hget(self.keys.checkpoints(self.mode), worker_id)
        return datetime.fromisoformat(raw.decode()) if raw else None

    @property
    def buffered(self) -> int:
        """Entries waiting for Redis."""
        with self._cond:
            return self._buffered

    def flush(self, timeout: float | None = 30.0) -> dict[str, datetime]:
        """Wait until every batch is in Redis (`timeout` None: as long as it takes); the checkpoints.
        TransientError if still buffered at `timeout`."""
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        with self._cond:
            while self._pending and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"Redis did not take {len(self._pending)} batches within {timeout:.0f} s")
                self._cond.wait(min(left, 0.5))
            self._raise_error()
            return dict(self._checkpoints)

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to `timeout`), stop the sender, close the connection."""
        try:
            self.flush(timeout)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the sender and close the connection without waiting: batches not yet in Redis are the
        next start's (it resumes after the checkpoint Redis holds)."""
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
