"""The recorder: the decision host of one mode when workers write Redis streams. Contract:
docs/streams.md.

Workers write their decisions to internal streams that no client's user can touch
(`<p>:<mode>:internal:signals:<client>`, `...:internal:rejections:<client>`,
`<p>:<mode>:internal:bar_rejections`). One consumer group (`recorder`) reads them. Each read is
written on at once to the clients' streams its entries are routed to (the recorder is the only
writer of `<p>:<mode>:signals:<client>` and `...:rejections:<client>`), then gathered for the store
(DuckDB: the only writer of its file) and the QuantConnect files; entries are acked only after the
store committed them. A replay (a recorder that crashed before its ack) stores the same rows again
(the store upserts) and writes no client entry twice: the forward script records the last internal
id it wrote on, per internal stream, in the same step as the client entries, and skips ids at or
below it.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from signalgen.config.models import Routing
from signalgen.data.schema import BAR_REJECTION_SCHEMA
from signalgen.outputs import DESTINATIONS, build_output
from signalgen.brokers.codec import SCHEMA_VERSION, decode_rows
from signalgen.brokers.redis import RECORDER_GROUP, StreamKeys, connect, ensure_streams, redis_module
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA

if TYPE_CHECKING:
    import redis as redis_lib

    from signalgen.config.models import RunConfig
    from signalgen.outputs.base import Output
    from signalgen.storage.base import SignalStore

log = logging.getLogger(__name__)

BAR_REJECTION_WIRE = pl.Schema({**BAR_REJECTION_SCHEMA, "run_id": pl.String})
KINDS = ("signals", "rejections")
COMMIT_QUEUE = 64  # gathers waiting for the store (~16 s at gather_s 0.25) before reading waits for it

# Writes client entries on, once each: ARGV = maxlen, then per internal stream its key, its number of
# entries and per entry its id, field count and fields; KEYS = the `forwarded` hash, then each entry's
# client stream. An entry whose id is not above the last one forwarded from its stream was written
# on before (a replay after a crash): skipped. The hash moves in the same atomic step as the XADDs.
FORWARD_SCRIPT = """
local function above(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am > bm end
  return tonumber(as) > tonumber(bs)
end
local j, k, done = 2, 2, 0
while j <= #ARGV do
  local stream, n = ARGV[j], tonumber(ARGV[j + 1])
  local last = redis.call('HGET', KEYS[1], stream)
  local newest = last
  j = j + 2
  for _ = 1, n do
    local id, m = ARGV[j], tonumber(ARGV[j + 1])
    if not newest or above(id, newest) then
      redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, j + 2, j + 1 + 2 * m))
      newest, done = id, done + 1
    end
    k, j = k + 1, j + 2 + 2 * m
  end
  if newest ~= last then redis.call('HSET', KEYS[1], stream, newest) end
end
return done
"""


def client_fields(fields: dict) -> dict:
    """A client's stream entry for an internal one: `v`, `id` and `data` as the worker wrote them.

    Seam: a decision's `revision` (docs/streams.md) joins these fields here."""
    return {b"v": fields[b"v"], b"id": fields[b"id"], b"data": fields[b"data"]}


@dataclass
class RecorderStats:
    entries: int = 0
    signals: int = 0
    rejections: int = 0
    bar_rejections: int = 0
    forwarded: int = 0                 # client entries written
    replayed: int = 0                  # entries read again after a crash, already written on: skipped
    transactions: int = 0              # store commits
    claimed: int = 0
    bad: int = 0                       # entries that are not records (acked and skipped, logged)
    by_stream: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class _Held:
    """Entries read (and written on) whose store commit and ack are still to come."""

    ids: dict[str, list] = field(default_factory=lambda: defaultdict(list))           # internal key -> ids
    lines: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))  # kind -> records
    quantconnect: set[str] = field(default_factory=set)  # signal ids routed to QuantConnect files
    since: float = 0.0                                  # monotonic time of the first read

    def add(self, other: _Held) -> None:
        for key, ids in other.ids.items():
            self.ids[key] += ids
        for kind, lines in other.lines.items():
            self.lines[kind] += lines
        self.quantconnect |= other.quantconnect


class Recorder:
    """Reads one mode's internal streams with consumer group `group` as `consumer`; writes each entry on
    to its client's streams at once (`Routing`: internal or both), and every `gather_s` stores what it
    read (one transaction), merges the signals routed to QuantConnect into their CSV files, then acks.
    Under `run()` the store's part runs on a thread of its own (at background priority), so a store
    transaction never holds up the next write-on; reading waits for it only when COMMIT_QUEUE gathers
    are behind.

    `recover()` re-processes this consumer's own pending entries (read before a crash, never acked)
    and claims other consumers' entries idle for `claim_idle_ms` (XAUTOCLAIM); `step()` reads new
    entries once; `run(stop)` does both until `stop` is set. One recorder per mode and store: the
    forward's replay guard assumes each internal stream's entries are written on in order.
    """

    def __init__(self, client: redis_lib.Redis, store: SignalStore, keys: StreamKeys, mode: str, clients: list[str],
                 *, consumer: str | None = None, group: str = RECORDER_GROUP, count: int = 1000,
                 block_ms: int = 1000, claim_idle_ms: int = 30_000, gather_s: float = 0.25, maxlen: int = 100_000,
                 quantconnect: Callable[[str], Output] | None = None) -> None:
        self.client, self.store, self.keys, self.mode = client, store, keys, mode
        self.gather_s, self.maxlen, self.quantconnect = gather_s, maxlen, quantconnect
        self.group, self.consumer = group, consumer or socket.gethostname()
        self.count, self.block_ms, self.claim_idle_ms = count, block_ms, claim_idle_ms
        # internal stream -> (kind, client)
        self.streams = {**self._client_streams(clients), keys.bar_rejections(mode): ("bar_rejections", "")}
        self.stats = RecorderStats()
        self._redis = redis_module()
        self._forward_script = client.register_script(FORWARD_SCRIPT)
        self._held = _Held()
        self._outputs: dict[str, Output] = {}
        self._committing: queue.Queue | None = None  # the store thread's gathers, while `run()` runs
        self._handed: deque[float] = deque()  # monotonic start of each gather handed over, not yet committed
        # called with (signals, rejections, monotonic time of the gather's first read) once stored: a
        # decision host's metrics (signalgen.metrics.observe_stored)
        self.on_stored: Callable[[pl.DataFrame, pl.DataFrame, float], None] | None = None
        self._error: BaseException | None = None     # the store thread's failure, raised by the next step
        self.redis_down = False  # `run()` cannot reach Redis (retrying)

    @classmethod
    def from_config(cls, cfg: RunConfig, store: SignalStore, **kwargs) -> Recorder:
        """The recorder of `cfg`'s mode over every configured client's streams."""
        m = cfg.environment.messaging
        return cls(connect(cfg, socket_timeout=10), store, StreamKeys(m.stream_prefix), cfg.mode.name.value,
                   [c.id for c in cfg.clients], maxlen=m.maxlen,
                   quantconnect=lambda client: build_output(cfg, client, "quantconnect"), **kwargs)

    @property
    def clients(self) -> list[str]:
        return sorted({c for kind, c in self.streams.values() if kind in KINDS})

    def _client_streams(self, clients: list[str]) -> dict[str, tuple[str, str]]:
        return {self.keys.internal(self.mode, kind, c): (kind, c) for c in clients for kind in KINDS}

    def add_clients(self, clients: list[str]) -> list[str]:
        """Also read these clients' streams (a reload added them); their groups and streams are created
        now. The internal streams it adds."""
        new = {k: v for k, v in self._client_streams(clients).items() if k not in self.streams}
        for key in new:
            self._create_group(key)
        ensure_streams(self.client, [k for c in clients for k in self.keys.client_streams(c, (self.mode,))])
        self.streams = {**self.streams, **new}  # one assignment: the reading thread sees the old or the new map
        return sorted(new)

    def ensure_groups(self) -> None:
        """Create the group on every internal stream (and the stream if missing), reading from the start,
        and each client's streams of the mode, empty, if missing (so no client's user creates a key)."""
        for key in self.streams:
            self._create_group(key)
        ensure_streams(self.client, [k for c in self.clients for k in self.keys.client_streams(c, (self.mode,))])

    def _create_group(self, key: str) -> None:
        try:
            self.client.xgroup_create(key, self.group, id="0", mkstream=True)
        except self._redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def recover(self) -> int:
        """Commit what is held, then own pending entries (ID 0), then entries of consumers idle >=
        claim_idle_ms. Entries handled."""
        self.commit()
        done = 0
        while True:  # own pending: XREADGROUP with ID 0 returns them, without blocking
            reply = self.client.xreadgroup(self.group, self.consumer, {k: "0" for k in self.streams}, count=self.count)
            n = self._take(reply)
            self.commit()
            done += n
            if not n:
                break
        for key in self.streams:
            start = "0-0"
            while True:
                nxt, entries, *_ = self.client.xautoclaim(key, self.group, self.consumer, self.claim_idle_ms,
                                                         start_id=start, count=self.count)
                if entries:
                    self.stats.claimed += len(entries)
                    done += self._take([(key.encode(), entries)])
                    self.commit()
                start = nxt.decode() if isinstance(nxt, bytes) else nxt
                if start == "0-0":
                    break
        return done

    def step(self) -> int:
        """Read new entries once and write them on to the clients' streams; commit what is held (store,
        files, ack) once `gather_s` passed since the first entry held, or a read came back empty or
        full. A read blocks up to block_ms, or until the held entries' gather ends. Entries read."""
        self._raise_error()
        block = self.block_ms
        if self._held.ids:
            block = max(1, min(block, int((self._held.since + self.gather_s - time.monotonic()) * 1000)))
        reply = self.client.xreadgroup(self.group, self.consumer, {k: ">" for k in self.streams},
                                       count=self.count, block=block)
        n = self._take(reply)
        if self._held.ids and (not n or n >= self.count or time.monotonic() - self._held.since >= self.gather_s):
            self._hand_over()
        return n

    def run(self, stop: threading.Event) -> RecorderStats:
        """Until `stop`: recover, then read; claims idle entries again every claim_idle_ms. A lost
        connection is retried with backoff (up to 1 s), logged once per outage. The store's part runs
        on a thread of its own meanwhile; its failure is raised here."""
        redis = self._redis
        delay, down, last_claim = 0.05, False, 0.0
        self._committing, self._error = queue.Queue(maxsize=COMMIT_QUEUE), None
        committer = threading.Thread(target=self._commit_loop, args=(self._committing,), name="recorder-store",
                                     daemon=True)
        committer.start()
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() - last_claim >= self.claim_idle_ms / 1000:
                        self.ensure_groups()
                        self.recover()
                        last_claim = time.monotonic()
                    self.step()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    if not down:
                        down = self.redis_down = True
                        log.warning("recorder: Redis unreachable (%s); retrying", exc)
                    stop.wait(delay)
                    delay = min(delay * 2, 1.0)
                    last_claim = 0.0  # after an outage, re-check groups and pending first
                    continue
                if down:
                    log.warning("recorder: Redis is back")
                    down, delay, self.redis_down = False, 0.05, False
        finally:
            committing, self._committing = self._committing, None
            committing.put(None)
            committer.join()
        self.commit()
        return self.stats

    def close(self) -> None:
        """Close the QuantConnect outputs and the connection."""
        try:
            for out in self._outputs.values():
                out.close()
        finally:
            self.client.close()

    # -- one read

    def _take(self, reply) -> int:
        """Hold a read's entries for the store and write those routed to a client's streams on now.
        Entries read."""
        held, forward = self._held, defaultdict(list)
        n = 0
        for key, entries in reply or ():
            key = key.decode() if isinstance(key, bytes) else key
            kind, client = self.streams.get(key, ("", ""))
            for eid, fields in entries:
                n += 1
                held.ids[key].append(eid)
                if not fields:  # trimmed away while pending: nothing to store
                    continue
                destinations = self._destinations(key, eid, kind, client, fields)
                if destinations is None:
                    continue
                held.lines[kind].append(fields[b"data"])
                self.stats.by_stream[key] += 1
                if "internal" in destinations:
                    target = self.keys.signals(self.mode, client) if kind == "signals" else \
                        self.keys.rejections(self.mode, client)
                    forward[key].append((eid, target, client_fields(fields)))
                if "quantconnect" in destinations and kind == "signals":
                    held.quantconnect.add(fields[b"id"].decode())
        if held.ids and not held.since:
            held.since = time.monotonic()
        if forward:
            self._forward(forward)
        self.stats.entries += n
        return n

    def _destinations(self, key: str, eid, kind: str, client: str, fields: dict) -> tuple[str, ...] | None:
        """Where an entry goes besides the store (None: not a record of this stream, skipped and logged).
        A decision must be of the stream's client and mode, with a known route."""
        problem = None
        if not kind:
            problem = "not a stream this recorder reads"
        elif fields.get(b"v") != SCHEMA_VERSION.encode() or b"data" not in fields:
            problem = f"not a v{SCHEMA_VERSION} record"
        elif kind == "bar_rejections":
            return ()
        else:
            try:
                routing = Routing(fields.get(b"route", b"").decode())
                record = json.loads(fields[b"data"])
                if record.get("client_id") != client or record.get("mode") != self.mode or b"id" not in fields:
                    problem = (f"a record of {str(record.get('client_id'))[:64]!r}, "
                               f"mode {str(record.get('mode'))[:16]!r}")
                else:
                    return DESTINATIONS[routing]
            except (ValueError, UnicodeDecodeError, AttributeError) as exc:
                problem = f"undecodable ({str(exc)[:100]})"
        self.stats.bad += 1
        log.warning("recorder: skipping %s %s: %s", key, eid, problem)
        return None

    def _forward(self, forward: dict[str, list]) -> None:
        """One atomic script: the client entries of `forward` (internal key -> [(id, client key,
        fields)]) not written on before."""
        keys, args, total = [self.keys.forwarded(self.mode)], [self.maxlen], 0
        for stream, items in forward.items():
            args += [stream, len(items)]
            total += len(items)
            for eid, target, fields in items:
                keys.append(target)
                args += [eid, len(fields)]
                for item in fields.items():
                    args += item
        done = int(self._forward_script(keys=keys, args=args))
        self.stats.forwarded += done
        self.stats.replayed += total - done

    # -- the gathered commit

    def commit(self) -> None:
        """Commit what is held, and wait until everything handed to the store thread is committed.
        If it raises, the entries stay pending in Redis: `recover()` takes them again."""
        if self._held.ids:
            self._hand_over()
        if self._committing is not None:
            self._committing.join()
        self._raise_error()

    def oldest_unstored(self) -> float | None:
        """Monotonic time of the first read of the oldest entry not stored yet (None: all stored)."""
        handed = self._handed
        try:
            return handed[0]
        except IndexError:
            return self._held.since if self._held.ids else None

    def _hand_over(self) -> None:
        held, self._held = self._held, _Held()
        self._handed.append(held.since)
        if self._committing is None:
            try:
                self._commit(held)
            finally:
                self._handed.popleft()
        else:
            self._committing.put(held)  # blocks while COMMIT_QUEUE gathers wait: the store is far behind

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _commit_loop(self, committing: queue.Queue) -> None:
        """The store thread: commits the gathers handed over (those waiting together, in one go) until
        None. After a failure it drops the rest (they stay pending in Redis) until `run()` is restarted."""
        from signalgen.threads import background_priority

        background_priority()
        while True:
            held, taken = committing.get(), 1
            end = held is None
            while not end and not committing.empty():
                more, taken = committing.get_nowait(), taken + 1
                if more is None:
                    end = True
                else:
                    held.add(more)
            try:
                if held is not None and self._error is None:
                    self._commit(held)
            except Exception as exc:  # noqa: BLE001 - raised on the reading thread by its next step
                self._error = exc
            finally:
                for _ in range(taken - end):
                    if self._handed:
                        self._handed.popleft()
                for _ in range(taken):
                    committing.task_done()
            if end:
                return

    def _commit(self, held: _Held) -> None:
        """Store `held` (one transaction for the decisions), merge the signals routed to QuantConnect
        into their files, then ack."""
        if not held.ids:
            return
        signals = self._decode(held.lines["signals"], SIGNAL_SCHEMA).unique("signal_id", keep="last",
                                                                             maintain_order=True)
        rejections = self._decode(held.lines["rejections"], REJECTION_SCHEMA).unique(
            "rejection_id", keep="last", maintain_order=True)
        bars = self._decode(held.lines["bar_rejections"], BAR_REJECTION_WIRE)
        if signals.height or rejections.height:
            self.store.write_decisions(signals, rejections)
            self.stats.transactions += 1
            if self.on_stored is not None:
                try:
                    self.on_stored(signals, rejections, held.since)
                except Exception as exc:  # noqa: BLE001 - a metric must never fail a stored write
                    log.warning("recorder: counting stored decisions failed: %r", exc)
        if bars.height:
            self.store.write_bar_rejections(bars.unique(maintain_order=True), None, self.mode)
        if held.quantconnect and self.quantconnect is not None:
            self._to_quantconnect(signals.filter(pl.col("signal_id").cast(pl.String).is_in(held.quantconnect)))
        pipe = self.client.pipeline(transaction=False)
        for key, ids in held.ids.items():
            pipe.xack(key, self.group, *ids)
        pipe.execute()
        self.stats.signals += signals.height
        self.stats.rejections += rejections.height
        self.stats.bar_rejections += bars.height

    def _to_quantconnect(self, signals: pl.DataFrame) -> None:
        """Merge signals into their clients' QuantConnect files (by signal id: a replay rewrites them)."""
        for (client,), part in signals.partition_by("client_id", as_dict=True, maintain_order=True).items():
            out = self._outputs.get(client)
            if out is None:
                out = self.quantconnect(client)
                out.open()
                self._outputs[client] = out
            out.write(part)
            out.flush()

    def _decode(self, lines: list[bytes], schema: pl.Schema) -> pl.DataFrame:
        """Rows of `lines`; a line that does not decode is logged and skipped, not fatal."""
        try:
            return decode_rows(lines, schema)
        except Exception:  # noqa: BLE001 - find the bad lines one by one
            good = []
            for line in lines:
                try:
                    decode_rows([line], schema)
                    good.append(line)
                except Exception as exc:  # noqa: BLE001
                    self.stats.bad += 1
                    log.warning("recorder: skipping an undecodable record: %s", str(exc)[:200])
            return decode_rows(good, schema)
