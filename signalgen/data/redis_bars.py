"""Market data on Redis Streams: `publish_bars` (the `feed` command, or any publisher) and
`live_feed` (a live worker's bars). Key names and the entry schema: docs/streams.md.

A bar's entry ID is its end time in milliseconds (`<ms>-0`): Redis refuses an ID not above the
stream's last, so re-publishing is a no-op and a worker resumes exactly after its checkpoint.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import polars as pl

from signalgen.data.schema import BAR_SCHEMA
from signalgen.errors import TransientError
from signalgen.brokers.codec import BAR_VALUES, SCHEMA_VERSION, PublishStats, encode_bar, iso, latest_end, paced
from signalgen.brokers.redis import StreamKeys, connect, own_connection, redis_module, straight

if TYPE_CHECKING:
    import redis as redis_lib

    from signalgen.config.models import RunConfig
    from signalgen.config.workers import WorkerSpec

log = logging.getLogger(__name__)

_FIELDS = ("v", "symbol", "timeframe", "bar_time", *BAR_VALUES)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
DEADLETTER_MAX_BYTES = 64 * 1024  # a dead letter keeps at most this much of the poison entry's fields
DEADLETTER_SEEN_S = 30 * 86_400   # how long a dead-lettered id is remembered (one copy per entry meanwhile)


def entry_id(bar_time: datetime) -> str:
    """The stream ID of a bar: its end time in epoch milliseconds, sequence 0."""
    return f"{(bar_time - _EPOCH) // _MS}-0"


def id_time(eid: bytes | str) -> datetime:
    """The time of a stream ID's milliseconds."""
    eid = eid.decode() if isinstance(eid, bytes) else eid
    return _EPOCH + int(eid.split("-")[0]) * _MS


class PoisonBar(ValueError):
    """An entry that is not a bar of its stream; `reason` is a short code (docs/streams.md)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail[:200]
        super().__init__(f"{reason}: {self.detail}")


def decode_bar(eid: bytes | str, fields: dict, symbol: str, timeframe: str) -> dict:
    """Entry fields -> a BAR_SCHEMA row (dict). Raises PoisonBar for anything that is not one."""
    try:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        eid = eid.decode() if isinstance(eid, bytes) else eid
    except UnicodeDecodeError as exc:
        raise PoisonBar("undecodable", f"not UTF-8: {exc}") from None
    if f.get("v") != SCHEMA_VERSION:
        raise PoisonBar("wrong_schema", f"schema version {f.get('v')!r}, expected {SCHEMA_VERSION!r}")
    missing = [k for k in _FIELDS if k not in f]
    if missing:
        raise PoisonBar("wrong_schema", f"missing fields {missing}")
    if f["symbol"] != symbol:
        raise PoisonBar("unknown_symbol", f"symbol {f['symbol']!r} on the stream of {symbol}")
    if f["timeframe"] != timeframe:
        raise PoisonBar("wrong_timeframe", f"timeframe {f['timeframe']!r} on the stream of {timeframe}")
    try:
        t = datetime.fromisoformat(f["bar_time"])
        t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
        values = {c: float(f[c]) for c in BAR_VALUES}
    except ValueError as exc:
        raise PoisonBar("undecodable", str(exc)) from None
    if entry_id(t) != eid:
        raise PoisonBar("id_mismatch", f"entry {eid} holds bar_time {f['bar_time']}")
    return {"symbol": symbol, "timeframe": timeframe, "bar_time": t, **values}


# ---------------------------------------------------------------- publishing


def _is_duplicate(exc: BaseException) -> bool:
    return "equal or smaller" in str(exc)


def publish_bars(client: redis_lib.Redis, frames: Iterable[pl.DataFrame], *, keys: StreamKeys,
                 maxlen: int = 100_000, speed: float = 0.0, stop: threading.Event | None = None,
                 max_ahead: timedelta | None = None, on_publish=None) -> PublishStats:
    """Publish bars (BAR_SCHEMA frames, any symbols) to their streams, in bar-time order per frame.

    `speed` 0 publishes as fast as possible; s > 0 paces bar times at s x real time (one pipeline per
    bar time). A bar already in its stream is counted, not an error. With `max_ahead`, a bar ending
    after `latest_end` when its turn comes is refused and counted, not written. While Redis is
    unreachable the same bars are retried with backoff (up to 0.5 s), logged once per outage.
    `on_publish(bar_time, n)` is called after each bar time's `n` bars are handled.
    """
    redis = redis_module()
    stats = PublishStats()
    for bar_time, rows, at, n in paced(frames, BAR_SCHEMA.names(), speed=speed, max_ahead=max_ahead, stats=stats):
        if stop is not None and stop.is_set():
            return stats
        wait = at - time.monotonic()
        if rows and wait > 0 and (stop.wait(wait) if stop is not None else time.sleep(wait)):
            return stats
        delay, down, results = 0.05, False, []
        while rows:
            pipe = client.pipeline(transaction=False)
            for bar in rows:
                pipe.xadd(keys.bars(bar["symbol"], bar["timeframe"]), encode_bar(bar), id=entry_id(bar["bar_time"]),
                          maxlen=maxlen, approximate=True)
            try:
                results = pipe.execute(raise_on_error=False)
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not down:
                    down = True
                    log.warning("feed: Redis unreachable (%s); retrying", exc)
                if stop is not None and stop.wait(delay):
                    return stats
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, 0.5)
        for r in results:
            if isinstance(r, Exception):
                if not _is_duplicate(r):
                    raise r
                stats.already_there += 1
            else:
                stats.published += 1
        if down:
            log.warning("feed: Redis is back")
        if on_publish is not None:
            on_publish(bar_time, n)
    return stats


def future_streams(client: redis_lib.Redis, keys: StreamKeys, series: list[tuple[str, str]],
                   max_ahead: timedelta) -> dict[tuple[str, str], datetime]:
    """The series whose stream already went past `latest_end` (its last ID, kept even when that entry
    was deleted, is a time from the future), with that time: Redis refuses every bar before it."""
    redis = redis_module()
    found = {}
    for symbol, tf in series:
        try:
            last = client.xinfo_stream(keys.bars(symbol, tf))["last-generated-id"]
        except redis.ResponseError:  # no such stream yet
            continue
        if id_time(last) > latest_end(tf, max_ahead):
            found[(symbol, tf)] = id_time(last)
    return found


# ---------------------------------------------------------------- the live feed


# One copy per poison entry however many workers read it: the entry's id joins the seen set of its
# stream (kept DEADLETTER_SEEN_S after the last addition), and only the worker that added it writes the
# dead letter. KEYS = seen set, dead-letter stream; ARGV = id, ttl, maxlen, fields...
DEADLETTER_SCRIPT = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return 1
"""


def dead_letter(client: redis_lib.Redis, keys: StreamKeys, symbol: str, timeframe: str, eid: bytes | str,
                fields: dict, poison: PoisonBar, worker: str, maxlen: int = 100_000,
                max_bytes: int = DEADLETTER_MAX_BYTES) -> bool:
    """Copy a poison entry of `bars(symbol, timeframe)` to `<p>:deadletter:bars` with its reason, unless
    another reader did (True if this call wrote it). Its original fields (as JSON) are clipped to
    `max_bytes`; `size` then says how large they were."""
    original = {(k.decode(errors="backslashreplace") if isinstance(k, bytes) else str(k)):
                (v.decode(errors="backslashreplace") if isinstance(v, bytes) else str(v)) for k, v in fields.items()}
    text = json.dumps(original)
    letter = {"v": SCHEMA_VERSION, "stream": keys.bars(symbol, timeframe),
              "id": eid.decode() if isinstance(eid, bytes) else eid,
              "reason": poison.reason, "detail": poison.detail, "worker": worker, "fields": text}
    if len(text.encode()) > max_bytes:
        letter["fields"] = text.encode()[:max_bytes].decode(errors="ignore")
        letter["size"] = str(len(text.encode()))
    args = [letter["id"], DEADLETTER_SEEN_S, maxlen, *(x for item in letter.items() for x in item)]
    return bool(client.eval(DEADLETTER_SCRIPT, 2, keys.deadletter_seen(symbol, timeframe), keys.deadletter, *args))


def live_feed(cfg: RunConfig, spec: WorkerSpec, *, after: datetime | None, stop: threading.Event | None = None,
              client: redis_lib.Redis | None = None, count: int = 256, block_ms: int = 1000) -> Iterator[dict]:
    """A live worker's bars (BAR_SCHEMA dicts, one at a time) from `<p>:bars:<symbol>:<timeframe>`.

    First the warm-up: the last `history_bars(spec)` bars at or before `after` (the checkpoint; the
    worker's `emit_from`), then every bar after it, waiting for new ones with XREAD BLOCK until
    `stop` is set. `after` None starts at the stream's first entry. Reads up to `count` entries at a
    time. A poison entry — or a bar ending after `latest_end` (`messaging.max_ahead_s`), which would
    move the checkpoint into the future — goes to the dead-letter stream (once, whoever reads it
    first) and is skipped. While Redis is unreachable the read is retried with backoff (up to 0.5 s),
    logged once per outage.
    """
    from signalgen.config.workers import history_bars

    redis = redis_module()
    m = cfg.environment.messaging
    keys = StreamKeys(m.stream_prefix)
    r = client if client is not None else connect(cfg, socket_timeout=block_ms / 1000 + 5, down=TransientError)
    key = keys.bars(spec.symbol, spec.timeframe)

    max_ahead = timedelta(seconds=m.max_ahead_s)

    def decoded(entries) -> Iterator[dict]:
        for eid, fields in entries:
            try:
                bar = decode_bar(eid, fields, spec.symbol, spec.timeframe)
                if bar["bar_time"] > latest_end(spec.timeframe, max_ahead):
                    raise PoisonBar("future", f"bar_time {iso(bar['bar_time'])} is more than {spec.timeframe} + "
                                              f"{m.max_ahead_s:g} s after the wall clock")
                yield bar
            except PoisonBar as poison:
                log.warning("poison bar %s %s: %s", key, eid, poison)
                try:
                    dead_letter(r, keys, spec.symbol, spec.timeframe, eid, fields, poison, spec.id, m.maxlen)
                except redis.RedisError as exc:  # the bar is skipped either way
                    log.warning("could not dead-letter %s %s: %s", key, eid, exc)

    last = "0-0"
    if after is not None:
        last = entry_id(after)
        need = history_bars(spec)
        history: list[dict] = []
        for eid, fields in r.xrevrange(key, max=last, count=2 * need + 8):
            try:
                history.append(decode_bar(eid, fields, spec.symbol, spec.timeframe))
            except PoisonBar:  # reported when it was first read
                continue
            if len(history) == need:
                break
        yield from reversed(history)
    delay, down_since = 0.05, None
    conn = own_connection(r)  # the XREADs', sent `straight`
    try:
        while stop is None or not stop.is_set():
            try:
                reply = straight(conn, "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", key, last)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("live feed %s: Redis unreachable (%s); retrying", key, exc)
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            if down_since is not None:
                log.warning("live feed %s: Redis back after %.1f s", key, time.monotonic() - down_since)
                delay, down_since = 0.05, None
            entries = _stream_entries(reply)
            if entries:
                last = entries[-1][0].decode()
                yield from decoded(entries)
    finally:
        conn.disconnect()


def _stream_entries(reply) -> list[tuple[bytes, dict]]:
    """(id, fields) of a raw one-stream XREAD reply: RESP3 {key: [[id, [f, v, ...]], ...]}, RESP2
    [[key, [[id, [f, v, ...]], ...]]], or None when BLOCK timed out."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
    return [(eid, dict(zip(flat[::2], flat[1::2])) if flat else {}) for entries in streams for eid, flat in entries]
