"""The Redis transport (`messaging.type: redis`): workers write Redis streams, the manager hosts the
recorder, live workers read the market-data streams. `RedisTransport` at the end is what the
registry hands out; below, the manager's decision host.

Workers send their decisions to internal streams (`outputs.redis.RedisSink`), and the recorder
(`storage.recorder.Recorder`: consumer group `recorder` over every configured client's internal
streams of the run's mode, and its bar rejections) writes them on to the clients' streams, to the
QuantConnect files and to the store, whose one writer it is. The manager runs it on a thread beside
the store it already holds (and serves reads from), in place of the `WriterServer`, with the same
small interface: `start()`, `close()`, `address`, `stats["bars"]`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from signalgen.errors import ConfigError, SignalgenError

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    from signalgen.config.models import RunConfig
    from signalgen.config.workers import WorkerSpec
    from signalgen.outputs.redis import RedisSink
    from signalgen.storage.base import SignalStore

log = logging.getLogger(__name__)

RESTART_MAX_S = 30.0
DRAIN_BLOCK_MS = 1  # at close: read what is left without waiting for more
# The write-on thread is on every decision's path, and shares the GIL with the manager's other threads
# (supervision, resource sampling, the store's commits); Python lets a thread hold it 5 ms before
# handing it over. At 0.5 ms bench/live_latency.py's p99 at 100 bars/s fell 11.7 -> 5.4 ms (docs/streams.md).
SWITCH_INTERVAL_S = 0.0005


class RecorderHost:
    """Runs the recorder of `cfg`'s mode on a thread until `close()`, restarting its loop (with
    backoff) after an unexpected error, so one bad batch never stops recording for the run.

    Built before the workers start and closed after they stopped: `close()` drains the streams
    (everything the workers flushed before exiting is in the store when it returns). Connecting is
    checked at construction: an unusable Redis is a ConfigError naming the field (exit 2).
    """

    address = ""  # workers reach Redis, not the manager

    def __init__(self, cfg: RunConfig, store: SignalStore, *, run_id: str) -> None:
        from signalgen.storage.recorder import Recorder

        self.run_id = run_id
        self.recorder = Recorder.from_config(cfg, store)
        self._untrack = lambda: None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)
        self._switch_interval = sys.getswitchinterval()  # the process's, restored at close

    @property
    def stats(self) -> dict[str, int]:
        """What this run's recorder stored, counted as the writer server counts (`bars`: signals +
        rejections + bad bars), and its stream entries."""
        s = self.recorder.stats
        return {"bars": s.signals + s.rejections + s.bar_rejections, "signals": s.signals,
                "rejections": s.rejections, "bar_rejections": s.bar_rejections, "entries": s.entries,
                "claimed": s.claimed, "bad": s.bad}

    def reloaded(self, cfg: RunConfig, specs: list[WorkerSpec]) -> None:
        """Record the streams of clients a reload added too (entries carry their route: nothing else)."""
        clients = sorted({s.client.id for s in specs} - set(self.recorder.clients))
        if clients:
            added = self.recorder.add_clients(clients)
            log.info("recorder: %d more streams (%s)", len(added), ", ".join(clients), extra={"run_id": self.run_id})

    def problems(self) -> list[str]:
        """Why this recorder is not ready (empty: it is)."""
        if not self._thread.is_alive():
            return ["recorder thread not running"]
        return ["Redis unreachable (retrying)"] if self.recorder.redis_down else []

    def start(self) -> RecorderHost:
        from signalgen.metrics import count_recorder

        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self.recorder.ensure_groups()
        self._untrack = count_recorder(self.recorder)
        self._thread.start()
        log.info("recorder started on %d streams", len(self.recorder.streams), extra={"run_id": self.run_id})
        return self

    def _loop(self) -> None:
        delay = 0.5  # at the manager's priority: this thread writes every decision on to its client
        while not self._stop.is_set():
            try:
                self.recorder.run(self._stop)
            except Exception as exc:  # noqa: BLE001 - keep recording; the entries stay pending until stored
                log.exception("recorder failed: %s; restarting in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, RESTART_MAX_S)

    def close(self) -> None:
        """Stop the thread, then store whatever the streams still hold for this recorder."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._untrack()
        rec = self.recorder
        rec.block_ms = DRAIN_BLOCK_MS
        try:
            rec.recover()
            while rec.step():
                pass
        except Exception as exc:  # noqa: BLE001 - what is left stays pending: the next recorder stores it
            log.error("recorder could not drain the streams at close: %s", exc)
        finally:
            rec.close()
            sys.setswitchinterval(self._switch_interval)
        s = rec.stats
        log.info("recorder stopped: %d entries, %d signals, %d rejections, %d bar rejections, %d written on to "
                 "clients' streams", s.entries, s.signals, s.rejections, s.bar_rejections, s.forwarded,
                 extra={"run_id": self.run_id})


# ---------------------------------------------------------------- clients: access and consuming

# what a client's Redis user may run: reads and consumer-group bookkeeping on its own keys, nothing else
# (SELECT only when the environment's database is not 0: in another database XGROUP CREATE ... MKSTREAM
# could create its streams' names)
CLIENT_COMMANDS = ("ping", "client|setname", "xread", "xrange", "xrevrange", "xlen", "xinfo", "xreadgroup",
                   "xack", "xgroup|create", "xgroup|createconsumer", "xgroup|setid", "xgroup|delconsumer",
                   "xgroup|destroy", "xautoclaim", "xclaim", "xpending")



def client_password(cfg: RunConfig, client_id: str) -> str:
    """`client_id`'s Redis password, from the environment variable its YAML names
    (`redis_password_env`); ConfigError naming the client file and field when there is none."""
    try:
        client = cfg.client(client_id)
    except KeyError:
        raise ConfigError(f"no client {client_id!r}; known: {', '.join(c.id for c in cfg.clients)}",
                          field="--client") from None
    file = cfg.files.get(f"client:{client_id}")
    if not client.redis_password_env:
        raise ConfigError("needs redis_password_env (the environment variable holding this client's Redis "
                          "password)", file=file, field="redis_password_env")
    password = os.environ.get(client.redis_password_env)
    if not password:
        raise ConfigError(f"environment variable {client.redis_password_env} is not set", file=file,
                          field="redis_password_env")
    return password


def client_connection(cfg: RunConfig, client_id: str):
    """A Redis client logged in as `client_id`'s ACL user (password from its `redis_password_env`).

    A refused login is a ConfigError naming the client's file and both causes Redis cannot tell apart
    (it answers WRONGPASS to either): a password other than the one granted, or no such user."""
    from signalgen.brokers.redis import StreamKeys, connect

    password = client_password(cfg, client_id)
    user = StreamKeys(cfg.environment.messaging.stream_prefix).acl_user(client_id)
    try:
        return connect(cfg, username=user, password=password, password_field="redis_password_env", socket_timeout=10)
    except ConfigError as exc:
        if exc.field != "redis_password_env":
            raise
        var = cfg.client(client_id).redis_password_env
        raise ConfigError(f"Redis refused user {user}: either ${var} differs from the password `clients grant` "
                          f"set, or the user does not exist — Redis keeps users in memory, so a Redis restarted "
                          f"without an aclfile has lost every grant. Run `clients grant --client {client_id}` "
                          f"(docs/streams.md, Access control)", file=cfg.files.get(f"client:{client_id}"),
                          field="redis_password_env") from None



def consume_signals(client, key: str, group: str, consumer: str, *, from_start: bool, stop: threading.Event,
                    on_batch, limit: int | None = None, idle_exit_s: float | None = None,
                    claim_idle_ms: int = 60_000) -> int:
    """Read `key` with consumer group `group` until `stop` (or `limit` signals, or `idle_exit_s` without
    any): own pending entries first, then other consumers' idle ones (XAUTOCLAIM), then new ones.
    `on_batch(lines)` gets each batch's new signals (JSON lines), deduped by signal id; entries are acked
    after it returns. Returns the signals handled."""
    import time

    import redis

    try:
        client.xgroup_create(key, group, id="0" if from_start else "$")
    except redis.ResponseError as exc:
        if "requires the key to exist" in str(exc):
            raise SignalgenError(f"stream {key} does not exist yet: `clients grant` and the recorder create it") \
                from None
        if "BUSYGROUP" not in str(exc):
            raise
        if from_start:
            client.xgroup_setid(key, group, "0")
    seen: OrderedDict[str, None] = OrderedDict()
    done, last_entry = 0, time.monotonic()

    def handle(entries) -> int:
        lines = []
        for _, fields in entries:
            sid = (fields.get(b"id") or b"").decode()
            if fields and sid not in seen:
                seen[sid] = None
                lines.append(fields[b"data"])
                if len(seen) > 100_000:  # bounded: ids older than that are not re-delivered in practice
                    seen.popitem(last=False)
        if lines:
            on_batch(lines)
        if entries:
            client.xack(key, group, *[eid for eid, _ in entries])
        return len(lines)

    def count(most: int) -> int:  # never read more than the limit leaves: no signal past it is acked
        return most if limit is None else max(1, min(most, limit - done))

    own = client.xreadgroup(group, consumer, {key: "0"}, count=count(1000))
    for _, entries in own or ():
        done += handle(entries)
    if limit is None or done < limit:
        _, claimed, *_ = client.xautoclaim(key, group, consumer, claim_idle_ms, start_id="0-0", count=count(1000))
        done += handle(claimed)
    while not stop.is_set() and (limit is None or done < limit):
        reply = client.xreadgroup(group, consumer, {key: ">"}, count=count(100), block=500)
        for _, entries in reply or ():
            done += handle(entries)
            last_entry = time.monotonic()
        if idle_exit_s is not None and time.monotonic() - last_entry > idle_exit_s:
            break
    return done



def grant_client(cfg: RunConfig, client_id: str) -> tuple[str, str | None]:
    """Create or reset `client_id`'s Redis ACL user: its password (from the client's
    `redis_password_env`), its own streams only (created now, empty, where missing), read and
    consumer-group commands only; then `ACL SAVE`, so the user outlives a Redis restart.

    Returns its URL (password masked) and a warning when Redis could not save its users (no aclfile)."""
    import redis

    from signalgen.brokers.redis import StreamKeys, acl_key_pattern, connect, ensure_streams, masked_url

    password = client_password(cfg, client_id)
    m = cfg.environment.messaging
    keys = StreamKeys(m.stream_prefix)
    user, streams = keys.acl_user(client_id), keys.client_streams(client_id)
    admin = connect(cfg)
    commands = CLIENT_COMMANDS + (("select",) if admin.connection_pool.connection_kwargs.get("db") else ())
    warning = None
    try:
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", "resetchannels",
                              *(f"~{acl_key_pattern(k)}" for k in streams), "-@all", *(f"+{c}" for c in commands))
        ensure_streams(admin, streams)
        try:
            admin.execute_command("ACL", "SAVE")
        except redis.ResponseError as exc:
            why = "it has no aclfile" if "ACL file" in str(exc) else str(exc)[:200]
            warning = (f"Redis did not save its users ({why}): {user} is lost when Redis restarts. Start Redis "
                       f"with an aclfile (docs/streams.md, Access control), or grant again after every restart")
    except redis.RedisError as exc:
        raise SignalgenError(f"Redis refused to create user {user}: {str(exc)[:200]}") from None
    finally:
        admin.close()
    return masked_url(m.url, username=user, password=True), warning


class RedisTransport:
    """Workers write internal streams (`outputs.redis.RedisSink`, checkpoints in a Redis hash that
    advances only with the batch's entries); the manager hosts the recorder; live bars come from the
    market-data streams (`data.redis_bars.live_feed`). An unusable Redis (URL, password, server) is a
    ConfigError naming the field: exit 2, never a retry loop."""

    name, live, host_program = "redis", True, "recorder"

    def open_sink(self, cfg: RunConfig, spec: WorkerSpec, *, run_id: str, writer_address: str, authkey: bytes,
                  control_path: str) -> tuple[RedisSink, str, datetime | None]:
        from signalgen.outputs.redis import RedisSink

        sink = RedisSink.from_config(cfg)
        return sink, run_id, sink.resume_point(spec.id)

    def decision_host(self, cfg: RunConfig, store: SignalStore, *, run_id: str, address: str, authkey: bytes,
                      control_path: str) -> RecorderHost:
        return RecorderHost(cfg, store, run_id=run_id)

    def live_feed(self, cfg: RunConfig, spec: WorkerSpec, *, after: datetime | None, stop: threading.Event):
        from signalgen.data.redis_bars import live_feed

        return live_feed(cfg, spec, after=after, stop=stop)

    # -- what the stream commands do (feed, consume, clients grant)

    def blocked_series(self, cfg: RunConfig, series: list[tuple[str, str]],
                       max_ahead: timedelta) -> dict[tuple[str, str], str]:
        """Series whose bar stream already ends in the future (Redis refuses every older id): each with
        what to do about it."""
        from signalgen.brokers.redis import StreamKeys, connect
        from signalgen.data.redis_bars import future_streams

        keys = StreamKeys(cfg.environment.messaging.stream_prefix)
        client = connect(cfg)
        try:
            blocked = future_streams(client, keys, series, max_ahead)
        finally:
            client.close()
        return {(symbol, tf): (f"stream {keys.bars(symbol, tf)} already ends at {last:%Y-%m-%d %H:%M:%S} UTC, in "
                               f"the future, and Redis refuses every bar before that. Remove the bad entries "
                               f"(XDEL), then XSETID {keys.bars(symbol, tf)} <the last good id>")
                for (symbol, tf), last in blocked.items()}

    def publish_bars(self, cfg: RunConfig, frames, *, speed: float, stop: threading.Event, max_ahead: timedelta,
                     on_publish=None):
        from signalgen.brokers.redis import StreamKeys, connect
        from signalgen.data.redis_bars import publish_bars

        m = cfg.environment.messaging
        client = connect(cfg)
        try:
            return publish_bars(client, frames, keys=StreamKeys(m.stream_prefix), maxlen=m.maxlen, speed=speed,
                                stop=stop, max_ahead=max_ahead, on_publish=on_publish)
        finally:
            client.close()

    def consume(self, cfg: RunConfig, client_id: str, mode: str, *, from_start: bool, group: str | None,
                consumer: str | None, stop: threading.Event, on_batch, limit: int | None = None,
                idle_exit_s: float | None = None) -> int:
        """A client's signals of `mode`, read with its own Redis user and consumer group (`group`,
        default the client id), acked after `on_batch(lines)`."""
        import socket

        from signalgen.brokers.redis import StreamKeys

        key = StreamKeys(cfg.environment.messaging.stream_prefix).signals(mode, client_id)
        return consume_signals(client_connection(cfg, client_id), key, group or client_id,
                               consumer or socket.gethostname(), from_start=from_start, stop=stop,
                               on_batch=on_batch, limit=limit, idle_exit_s=idle_exit_s)

    def grant(self, cfg: RunConfig, client_id: str) -> tuple[str, str | None]:
        return grant_client(cfg, client_id)
