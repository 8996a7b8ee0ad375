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
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

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

    def add_clients(self, clients: list[str]) -> None:
        """Record these clients' streams too (a reload added them)."""
        added = self.recorder.add_clients(clients)
        log.info("recorder: %d more streams (%s)", len(added), ", ".join(clients), extra={"run_id": self.run_id})

    def start(self) -> RecorderHost:
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self.recorder.ensure_groups()
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
