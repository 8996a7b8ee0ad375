"""The recorder: persists the signals, rejections and bar rejections of one mode from Redis Streams
into the signal store (DuckDB: the only writer of its file). Contract: docs/streams.md.

One consumer group (`recorder`) over every client's `<p>:<mode>:signals:<client>` and
`...:rejections:<client>` stream and `<p>:<mode>:bar_rejections`. Entries are acked only after the
store committed them; the store upserts (one current decision per bar), so an entry delivered
twice — a recorder that crashed between commit and ack, a worker retry — leaves the same rows.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from signalgen.data.schema import BAR_REJECTION_SCHEMA
from signalgen.outputs.redis import RECORDER_GROUP, SCHEMA_VERSION, StreamKeys, connect, decode_rows, redis_module
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA

if TYPE_CHECKING:
    import redis as redis_lib

    from signalgen.config.models import RunConfig
    from signalgen.storage.base import SignalStore

log = logging.getLogger(__name__)

BAR_REJECTION_WIRE = pl.Schema({**BAR_REJECTION_SCHEMA, "run_id": pl.String})


@dataclass
class RecorderStats:
    entries: int = 0
    signals: int = 0
    rejections: int = 0
    bar_rejections: int = 0
    claimed: int = 0
    bad: int = 0                       # entries that are not records (acked and skipped, logged)
    by_stream: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Recorder:
    """Reads one mode's record streams with consumer group `group` as `consumer` and writes the store.

    `recover()` re-processes this consumer's own pending entries (read before a crash, never acked)
    and claims other consumers' entries idle for `claim_idle_ms` (XAUTOCLAIM); `step()` reads new
    entries once; `run(stop)` does both until `stop` is set.
    """

    def __init__(self, client: redis_lib.Redis, store: SignalStore, keys: StreamKeys, mode: str, clients: list[str],
                 *, consumer: str | None = None, group: str = RECORDER_GROUP, count: int = 1000,
                 block_ms: int = 1000, claim_idle_ms: int = 30_000, gather_s: float = 0.25) -> None:
        self.client, self.store, self.keys, self.mode = client, store, keys, mode
        self.gather_s = gather_s
        self.group, self.consumer = group, consumer or socket.gethostname()
        self.count, self.block_ms, self.claim_idle_ms = count, block_ms, claim_idle_ms
        self.streams = {**self._client_streams(clients), keys.bar_rejections(mode): "bar_rejections"}
        self.stats = RecorderStats()
        self._redis = redis_module()

    def add_clients(self, clients: list[str]) -> list[str]:
        """Also read these clients' streams (a reload added them); their groups are created now. The
        streams it adds."""
        new = {k: v for k, v in self._client_streams(clients).items() if k not in self.streams}
        for key in new:
            self._create_group(key)
        self.streams = {**self.streams, **new}  # one assignment: the reading thread sees the old or the new map
        return sorted(new)

    def _client_streams(self, clients: list[str]) -> dict[str, str]:
        """Stream key -> kind, for these clients' signal and rejection streams of the mode."""
        return {**{self.keys.signals(self.mode, c): "signals" for c in clients},
                **{self.keys.rejections(self.mode, c): "rejections" for c in clients}}

    @classmethod
    def from_config(cls, cfg: RunConfig, store: SignalStore, **kwargs) -> Recorder:
        """The recorder of `cfg`'s mode over every configured client's streams."""
        m = cfg.environment.messaging
        return cls(connect(cfg, socket_timeout=10), store, StreamKeys(m.stream_prefix), cfg.mode.name.value,
                   [c.id for c in cfg.clients], **kwargs)

    def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream if missing), reading from the start."""
        for key in self.streams:
            self._create_group(key)

    def _create_group(self, key: str) -> None:
        try:
            self.client.xgroup_create(key, self.group, id="0", mkstream=True)
        except self._redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def recover(self) -> int:
        """Own pending entries (ID 0), then entries of consumers idle >= claim_idle_ms. Entries handled."""
        done = 0
        while True:  # own pending: XREADGROUP with ID 0 returns them, without blocking
            reply = self.client.xreadgroup(self.group, self.consumer, {k: "0" for k in self.streams}, count=self.count)
            n = self._process(reply)
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
                    done += self._process([(key.encode(), entries)])
                start = nxt.decode() if isinstance(nxt, bytes) else nxt
                if start == "0-0":
                    break
        return done

    def step(self) -> int:
        """Read new entries once (blocking up to block_ms), store them, ack them. Entries handled."""
        reply = self.client.xreadgroup(self.group, self.consumer, {k: ">" for k in self.streams},
                                       count=self.count, block=self.block_ms)
        return self._process(reply)

    def run(self, stop: threading.Event) -> RecorderStats:
        """Until `stop`: recover, then read; claims idle entries again every claim_idle_ms. A lost
        connection is retried with backoff (up to 1 s), logged once per outage."""
        redis = self._redis
        delay, down, last_claim = 0.05, False, 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - last_claim >= self.claim_idle_ms / 1000:
                    self.ensure_groups()
                    self.recover()
                    last_claim = time.monotonic()
                if 0 < self.step() < self.count:
                    stop.wait(self.gather_s)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not down:
                    down = True
                    log.warning("recorder: Redis unreachable (%s); retrying", exc)
                stop.wait(delay)
                delay = min(delay * 2, 1.0)
                last_claim = 0.0  # after an outage, re-check groups and pending first
                continue
            if down:
                log.warning("recorder: Redis is back")
                down, delay = False, 0.05
        return self.stats

    # -- one batch

    def _process(self, reply) -> int:
        """Decode, store (one transaction for the decisions), then ack. Entries handled."""
        lines: dict[str, list[bytes]] = defaultdict(list)
        acks: dict[str, list] = defaultdict(list)
        n = 0
        for key, entries in reply or ():
            key = key.decode() if isinstance(key, bytes) else key
            kind = self.streams.get(key)
            for eid, fields in entries:
                n += 1
                acks[key].append(eid)
                if not fields:  # trimmed away while pending: nothing to store
                    continue
                if kind is None or fields.get(b"v") != SCHEMA_VERSION.encode() or b"data" not in fields:
                    self.stats.bad += 1
                    log.warning("recorder: skipping %s %s: not a v%s record", key, eid, SCHEMA_VERSION)
                    continue
                lines[kind].append(fields[b"data"])
                self.stats.by_stream[key] += 1
        if not n:
            return 0
        signals = self._decode(lines["signals"], SIGNAL_SCHEMA).unique("signal_id", keep="last", maintain_order=True)
        rejections = self._decode(lines["rejections"], REJECTION_SCHEMA).unique(
            "rejection_id", keep="last", maintain_order=True)
        bars = self._decode(lines["bar_rejections"], BAR_REJECTION_WIRE)
        if signals.height or rejections.height:
            self.store.write_decisions(signals, rejections)
        if bars.height:
            self.store.write_bar_rejections(bars.unique(maintain_order=True), None, self.mode)
        pipe = self.client.pipeline(transaction=False)
        for key, ids in acks.items():
            pipe.xack(key, self.group, *ids)
        pipe.execute()
        self.stats.entries += n
        self.stats.signals += signals.height
        self.stats.rejections += rejections.height
        self.stats.bar_rejections += bars.height
        return n

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
