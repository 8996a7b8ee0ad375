"""The Pub/Sub transport (`messaging.type: pubsub`, cloud-dev): workers publish to internal topics, the
manager hosts a recorder that stores them (BigQuery, or any store) and publishes them on to the
clients' topics as routing says; live workers read their bars from a subscription of their own.
Names and the wire: `signalgen/brokers/pubsub.py`; the design: docs/cloud.md.

Durable worker state. Pub/Sub keeps no checkpoint and cannot replay what was acked, so a worker keeps
its own in the control store (`ControlStore.save_worker_state`, per mode and worker):
- its checkpoint, the last bar whose decisions Pub/Sub confirmed (the sink saves it);
- for live workers, the bars before it that its features need (`history_bars`), saved by the feed
  with the checkpoint, in one statement, before the feed acks those bars.
A restarted live worker warms up on that snapshot plus whatever Pub/Sub redelivers up to its
checkpoint (bars it had not acked yet), then decides the bars after it: exactly the decisions of a
worker that never stopped (tests/integration/pubsub/test_transport.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from functools import partial
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

import polars as pl

from signalgen.config.workers import history_bars, worker_specs
from signalgen.errors import ConfigError, SignalgenError
from signalgen.storage.control import ControlStore
from signalgen.storage.writer import SignalWriter

if TYPE_CHECKING:
    from signalgen.brokers.pubsub import Publisher, Received
    from signalgen.config.models import RunConfig
    from signalgen.config.workers import WorkerSpec
    from signalgen.signals.records import Decisions
    from signalgen.storage.base import SignalStore

log = logging.getLogger(__name__)

SAVE_EVERY_S = 0.5   # a sink saves its confirmed checkpoint at most this often (and at every flush)
GATHER_S = 1.0       # the recorder stores what arrived within this long in one write ...
GATHER_FACTOR, GATHER_MAX_S = 2.0, 10.0  # ... or twice its last write's duration, up to 10 s (BigQuery's
                                         # load jobs: docs/cloud.md, "Quotas")
PULL_WAIT_S = 0.5    # a live worker's pull returns after this long without bars (to ack and check stop)


class PubSubSink:
    """A worker's sink: its decisions to its client's internal topics (`Publisher`: ordered by worker,
    bounded, confirmed before the checkpoint moves); the checkpoint to the control store."""

    def __init__(self, cfg: RunConfig, spec: WorkerSpec, control: ControlStore) -> None:
        from signalgen.brokers.pubsub import Publisher, TopicNames

        self.spec, self.mode, self.control = spec, cfg.mode.name.value, control
        names = TopicNames(cfg.environment.messaging.topic_prefix)
        self.bar_rejection_topic = names.internal(self.mode, "bar_rejections", spec.client.id)
        self.publisher: Publisher = Publisher.from_config(cfg, spec.client.id)
        self._saved: datetime | None = None
        self._saved_at = 0.0

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        # unordered: the recorder stores by key whatever the order, and acks only after its store
        # write — with ordering keys it would get one message per worker per write
        self.publisher.publish_decisions(spec, decisions, ordered=False)
        self._save(force=False)

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        from signalgen.brokers.pubsub import Message, bar_rejection_messages

        for message in bar_rejection_messages(self.spec, self.mode, rejections, run_id):
            self.publisher.publish(self.bar_rejection_topic, Message(message.data, message.attributes, ""))

    @property
    def checkpoints(self) -> dict[str, datetime]:
        return self.publisher.checkpoints

    def confirmed(self) -> datetime | None:
        """The last bar whose decisions Pub/Sub confirmed (all before it too)."""
        return self.publisher.checkpoints.get(self.spec.id)

    @property
    def paused_keys(self) -> int:
        return self.publisher.paused_keys

    def resume_point(self, worker_id: str) -> datetime | None:
        state = self.control.worker_state(self.mode, worker_id)
        return None if state is None else state[0]

    def flush(self, timeout: float | None = None) -> dict[str, datetime]:
        checkpoints = self.publisher.confirm(math.inf if timeout is None else timeout)
        self._save(force=True)
        return checkpoints

    def close(self, timeout: float | None = None) -> None:
        try:
            self.flush(timeout)
        finally:
            self.abort()

    def abort(self) -> None:
        self.publisher.abort()

    def _save(self, *, force: bool) -> None:
        point = self.confirmed()
        if point is not None and point != self._saved and (force or time.monotonic() - self._saved_at >= SAVE_EVERY_S):
            self.control.save_worker_state(self.mode, self.spec.id, point)
            self._saved, self._saved_at = point, time.monotonic()


class LiveBars:
    """A live worker's bars from its own subscription on `<p>.bars.<symbol>.<timeframe>`: the warm-up
    first (the saved snapshot, then redelivered bars up to the checkpoint), then every newer bar, in
    order. A bar is acked only once the sink's confirmed checkpoint covers it and the checkpoint with
    the warm-up bars before it is saved; a poison message goes to the dead-letter topic with its
    reason, as on Redis."""

    def __init__(self, cfg: RunConfig, spec: WorkerSpec, sink: PubSubSink, *, after: datetime | None,
                 stop: threading.Event) -> None:
        from signalgen.brokers.pubsub import BarPull

        self.spec, self.sink, self.after, self.stop = spec, sink, after, stop
        self.mode = cfg.mode.name.value
        self.pull = BarPull.for_worker(cfg, spec.id, spec.symbol, spec.timeframe)  # the subscription, made if missing
        self.need = history_bars(spec)
        self._recent: deque[tuple[datetime, bytes]] = deque(maxlen=self.need)  # bars yielded, as JSON
        self._unacked: list[tuple[datetime, str]] = []                          # (bar time, ack id)
        self._acked_to: datetime | None = None

    def __iter__(self) -> Iterator[dict]:
        from signalgen.brokers.pubsub import bar_message, decode_bar

        last: datetime | None = None
        state = self.sink.control.worker_state(self.mode, self.spec.id)
        for line in (state[1] if state is not None else []):
            bar = decode_bar(line, self.spec.symbol, self.spec.timeframe)
            if last is None or bar["bar_time"] > last:
                last = bar["bar_time"]
                self._recent.append((last, line))
                yield bar
        try:
            while not self.stop.is_set():
                self._ack_confirmed()
                for bar, ack_id, problem in self.pull.pull(256, PULL_WAIT_S):
                    if problem is not None:
                        self.pull.dead_letter(ack_id, problem)
                        continue
                    self._unacked.append((bar["bar_time"], ack_id))
                    if last is not None and bar["bar_time"] <= last:
                        continue  # a redelivery of a bar already taken: acked with it
                    last = bar["bar_time"]
                    self._recent.append((last, bar_message(bar).data))
                    yield bar
        finally:
            self.pull.close()

    def _ack_confirmed(self) -> None:
        """Save (checkpoint, warm-up) and ack the bars the sink's confirmed checkpoint covers."""
        point = self.sink.confirmed()
        if point is None or not self._unacked or (self._acked_to is not None and point <= self._acked_to):
            return
        covered = [ack for t, ack in self._unacked if t <= point]
        if not covered:
            return
        warmup = [line for t, line in self._recent if t <= point]
        self.sink.control.save_worker_state(self.mode, self.spec.id, point, warmup)
        self.pull.ack(covered)
        self._unacked = [(t, ack) for t, ack in self._unacked if t > point]
        self._acked_to = point


class PubSubTransport:
    """Workers publish to Pub/Sub (`PubSubSink`); the manager hosts the `PubSubRecorder`; live workers
    pull bars (`LiveBars`). One instance serves one worker process (its feed finds its sink)."""

    name, live, host_program = "pubsub", True, "recorder"

    def __init__(self) -> None:
        self._sink: PubSubSink | None = None

    def open_sink(self, cfg: RunConfig, spec: WorkerSpec, *, run_id: str, writer_address: str, authkey: bytes,
                  control_path: str) -> tuple[PubSubSink, str, datetime | None]:
        self._sink = PubSubSink(cfg, spec, ControlStore(control_path))
        return self._sink, run_id, self._sink.resume_point(spec.id)

    def decision_host(self, cfg: RunConfig, store: SignalStore, *, run_id: str, address: str, authkey: bytes,
                      control_path: str) -> PubSubRecorder:
        return PubSubRecorder(cfg, store, run_id=run_id)

    def live_feed(self, cfg: RunConfig, spec: WorkerSpec, *, after: datetime | None,
                  stop: threading.Event) -> Iterator[dict]:
        if self._sink is None:
            raise RuntimeError("open_sink first: a live worker acks its bars by its sink's checkpoint")
        return iter(LiveBars(cfg, spec, self._sink, after=after, stop=stop))

    def blocked_series(self, cfg: RunConfig, series, max_ahead) -> dict:
        return {}  # a topic takes bars in any order: no bar can block the ones before it

    def publish_bars(self, cfg: RunConfig, frames, *, speed: float, stop: threading.Event, max_ahead,
                     on_publish=None):
        from signalgen.brokers.pubsub import publish_bars

        return publish_bars(cfg, frames, speed=speed, stop=stop, max_ahead=max_ahead, on_publish=on_publish)

    def consume(self, cfg: RunConfig, client_id: str, mode: str, *, from_start: bool, group: str | None,
                consumer: str | None, stop: threading.Event, on_batch, limit: int | None = None,
                idle_exit_s: float | None = None) -> int:
        """Through the client's own subscription `<p>.<mode>.signals.<client>.<group or client>`."""
        from signalgen.brokers.pubsub import consume_signals

        return consume_signals(cfg, client_id, mode, consumer=group, from_start=from_start, stop=stop,
                               on_batch=on_batch, limit=limit, idle_exit_s=idle_exit_s)

    def grant(self, cfg: RunConfig, client_id: str) -> tuple[str, None]:
        """Create the client's topics and subscriptions (every mode), then the IAM bindings it needs —
        subscriber on its own subscriptions, dataViewer on its own dataset — as JSON for gcloud. The
        emulator has no IAM: there, isolation holds by name (docs/cloud.md)."""
        import json

        from signalgen.brokers.pubsub import ensure_client, iam_bindings

        try:
            cfg.client(client_id)
        except KeyError:
            raise ConfigError(f"no client {client_id!r}; known: {', '.join(c.id for c in cfg.clients)}",
                              field="--client") from None
        ensure_client(cfg.environment.messaging, client_id)
        return json.dumps(iam_bindings(cfg, client_id), indent=2), None


class PubSubRecorder:
    """The decision host on Pub/Sub: one subscription per internal topic of every client of the mode
    (`<topic>.recorder`, unordered), gathered for GATHER_S and stored in one write through a
    `SignalWriter` — which routes each client's signals, with the revisions and retractions the store
    returned, to its outputs (the client's topic, the QuantConnect files) — then the rejections to the
    clients' rejection topics, then acked. A failed write nacks the gather: Pub/Sub redelivers it and
    the store's upsert makes the replay harmless; subscribers drop copies already acked (by id)."""

    address = ""  # workers reach Pub/Sub, not the manager

    def __init__(self, cfg: RunConfig, store: SignalStore, *, run_id: str) -> None:
        self.cfg, self.store, self.run_id, self.mode = cfg, store, run_id, cfg.mode.name.value
        self.writer = self._counting(SignalWriter.from_config(cfg, store))
        self.specs = {(s.client.id, s.strategy.id): s for s in worker_specs(cfg)}
        self.counts = {"signals": 0, "rejections": 0, "bar_rejections": 0, "messages": 0, "writes": 0}
        self._held: list[Received] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribers: dict[str, object] = {}
        self._publishers: dict[str, Publisher] = {}
        self._thread = threading.Thread(target=self._loop, name="pubsub-recorder", daemon=True)
        self._last_write_s = 0.0
        self._held_since: float | None = None     # monotonic: the first message held for the next write
        self._writing_since: float | None = None  # ... and of the write under way
        self._failing = False  # the last write failed (its gather redelivered)
        self._untrack = lambda: None

    @property
    def stats(self) -> dict[str, int]:
        c = self.counts
        return {"bars": c["signals"] + c["rejections"] + c["bar_rejections"], **c}

    def start(self) -> None:
        from signalgen.metrics import track_lag

        self._subscribe(sorted({c.id for c in self.cfg.clients}))
        self._untrack = track_lag(lambda: self._writing_since or self._held_since)
        self._thread.start()

    def problems(self) -> list[str]:
        """Why this recorder is not ready (empty: it is)."""
        if not self._thread.is_alive():
            return ["recorder thread not running"]
        return ["storing decisions fails (redelivered meanwhile)"] if self._failing else []

    def _counting(self, writer: SignalWriter) -> SignalWriter:
        """`writer`, counting what it stores into the metrics (signalgen.metrics)."""
        from signalgen.metrics import observe_stored

        def stored(signals, rejections) -> None:
            since = self._writing_since
            observe_stored(self.mode, signals, rejections,
                           received=None if since is None else time.time() - (time.monotonic() - since))
        writer.on_stored = stored
        return writer

    def reloaded(self, cfg: RunConfig, specs: list[WorkerSpec]) -> None:
        """Take the decisions of every worker of the new config: new strategies are routed as their
        config says, new clients' topics are read too."""
        with self._lock:
            self.specs = {**self.specs, **{(s.client.id, s.strategy.id): s for s in specs}}
            self.cfg = cfg
        for spec in specs:
            self.writer.open_outputs(cfg, spec)
        self._subscribe(sorted({s.client.id for s in specs}))

    def _subscribe(self, clients: list[str]) -> None:
        from signalgen.brokers.pubsub import RECORDER_GROUP, Subscriber, TopicNames, ensure_client

        m = self.cfg.environment.messaging
        names = TopicNames(m.topic_prefix)
        for client in clients:
            ensure_client(m, client, (self.mode,))
            for topic in names.internal_topics(self.mode, client):
                if topic not in self._subscribers:
                    self._subscribers[topic] = Subscriber.from_config(
                        self.cfg, names.subscription(topic, RECORDER_GROUP), partial(self._take, client)).start()

    def _take(self, client: str, received: Received) -> None:
        """Hold a message of `client`'s internal topic for the next write — unless it is not a record of
        that client and mode (what its attributes say, and what it says itself): that one alone goes to
        the dead-letter topic, as the Redis recorder skips it."""
        record, attributes = received.record, received.attributes
        owner = {record.get("client_id", attributes.get("client_id")), attributes.get("client_id")}  # bar
        # rejections carry their worker in the attributes only
        if owner != {client} or record.get("mode", self.mode) != self.mode or attributes.get("mode") != self.mode \
                or record.get("strategy_id", attributes.get("strategy_id")) != attributes.get("strategy_id"):
            received.dead_letter("foreign_record", f"on {client}'s {self.mode} topic: client "
                                 f"{str(record.get('client_id'))[:64]!r}, mode {str(record.get('mode'))[:16]!r}")
            return
        with self._lock:
            if not self._held:
                self._held_since = time.monotonic()
            self._held.append(received)

    def gather_s(self) -> float:
        """How long the recorder gathers before a write: a slow store gets fewer, larger writes."""
        return min(max(GATHER_S, GATHER_FACTOR * self._last_write_s), GATHER_MAX_S)

    def _loop(self) -> None:
        while not self._stop.wait(self.gather_s()):
            self.commit()

    def commit(self) -> None:
        """Store what is held (one write), deliver it, ack it; on failure nack it (redelivered)."""
        with self._lock:
            held, self._held = self._held, []
            self._writing_since, self._held_since = self._held_since, None
            unknown = [m for m in held if _strategy(m) not in self.specs]
        if unknown:  # not (yet) in this recorder's config: never stored, never acked — redelivered, and
            # dead-lettered after max_delivery_attempts unless a reload brings the strategy
            log.warning("pubsub recorder: %d decisions of strategies not in the config, e.g. %s: not acked",
                        len(unknown), ".".join(_strategy(unknown[0]))[:130])
            for message in unknown:
                message.nack()
            held = [m for m in held if _strategy(m) in self.specs]
        try:
            if held:
                self._store(held)
        finally:
            self._writing_since = None

    def _store(self, held: list[Received]) -> None:
        started = time.monotonic()
        try:
            undecodable = self._write(held)
            self._last_write_s = time.monotonic() - started
            self._failing = False
        except Exception as exc:  # noqa: BLE001 - redelivered by Pub/Sub; the loop goes on
            from signalgen.metrics import WRITE_FAILURES

            WRITE_FAILURES.inc()
            self._failing = True
            log.warning("pubsub recorder: storing %d messages failed (they will be redelivered): %s", len(held),
                        str(exc)[:300])
            for message in held:
                message.nack()
            self._renew_writer()  # a SignalWriter writes nothing after its first failure
            return
        for message in held:
            if message not in undecodable:  # those were dead-lettered (and acked) one by one
                message.ack()

    def _renew_writer(self) -> None:
        """A fresh writer (and outputs) for the next gather: a transient failure (a store away, a full
        disk) then costs the gathers until it is over, never the rest of the run."""
        failed, self.writer = self.writer, self._counting(SignalWriter.from_config(self.cfg, self.store))
        for spec in self.specs.values():
            self.writer.open_outputs(self.cfg, spec)
        try:
            failed.close()
        except Exception as exc:  # noqa: BLE001 - it already failed; its error was logged
            log.debug("closing the failed signal writer: %r", exc)

    def _write(self, held: list[Received]) -> list[Received]:
        """Store and deliver `held`; the messages that do not decode into their record (dead-lettered
        alone: they cost the others nothing)."""
        from signalgen.data.schema import BAR_REJECTION_SCHEMA
        from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA
        from signalgen.transports.local import Frames

        parts: dict[tuple[str, str, str], list[Received]] = {}
        for message in held:
            parts.setdefault((_kind(message), *_strategy(message)), []).append(message)
        items, bar_rejections, undecodable = [], [], []
        for (kind, client, strategy), messages in parts.items():
            spec = self.specs[(client, strategy)]
            schema = {"signals": SIGNAL_SCHEMA, "rejections": REJECTION_SCHEMA}.get(
                kind, pl.Schema({**BAR_REJECTION_SCHEMA, "run_id": pl.String}))
            frame = _decode(messages, schema, undecodable)
            if kind == "bar_rejections":
                bar_rejections.append(frame)
            elif kind == "signals":
                items.append((spec, Frames(frame, pl.DataFrame(schema=REJECTION_SCHEMA))))
            else:
                items.append((spec, Frames(pl.DataFrame(schema=SIGNAL_SCHEMA), frame)))
        self.writer.record_group(items)
        for frame in bar_rejections:
            self.writer.record_bar_rejections(frame, self.run_id)
        self.writer.flush()
        self._publish_rejections([(spec, f.rejections) for spec, f in items if f.rejections.height])
        counts = self.counts
        counts["signals"] += sum(f.signals.height for _, f in items)
        counts["rejections"] += sum(f.rejections.height for _, f in items)
        counts["bar_rejections"] += sum(f.height for f in bar_rejections)
        counts["messages"] += len(held) - len(undecodable)
        counts["writes"] += 1
        return undecodable

    def _publish_rejections(self, parts: list[tuple[WorkerSpec, pl.DataFrame]]) -> None:
        """A client's rejected candidates on `<p>.<mode>.rejections.<client>` (routed `internal`)."""
        from signalgen.brokers.codec import record_entries
        from signalgen.brokers.pubsub import Publisher, record_message
        from signalgen.outputs import DESTINATIONS

        for spec, rejections in parts:
            if "internal" not in DESTINATIONS[spec.routing]:
                continue
            publisher = self._publishers.get(spec.client.id)
            if publisher is None:
                publisher = self._publishers[spec.client.id] = Publisher.from_config(self.cfg, spec.client.id)
            topic = publisher.names.rejections(self.mode, spec.client.id)
            for entry in record_entries(rejections, "rejection_id"):
                publisher.publish(topic, record_message("rejections", entry))
        for publisher in self._publishers.values():
            publisher.confirm()

    def close(self) -> None:
        """After the workers stopped: store what is still arriving (until GATHER_S passes with nothing
        new), then stop the subscriptions and close the writer and publishers."""
        self._stop.set()
        self._untrack()
        if self._thread.is_alive():
            self._thread.join()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2 * GATHER_S:
            with self._lock:
                busy = bool(self._held)
            if busy:
                self.commit()
                quiet_since = time.monotonic()
            time.sleep(0.1)
        errors: list[BaseException] = []
        for subscriber in self._subscribers.values():
            subscriber.stop()
        self.commit()
        for closing in [*(p.close for p in self._publishers.values()), self.writer.close]:
            try:
                closing()
            except Exception as exc:  # noqa: BLE001 - every one is closed; the first error is raised
                errors.append(exc)
        if errors:
            raise errors[0] if isinstance(errors[0], SignalgenError) else SignalgenError(str(errors[0]))


def _decode(messages: list[Received], schema: pl.Schema, bad: list[Received]) -> pl.DataFrame:
    """The records of `messages` (one JSON object each) as a frame of `schema`; a message that does not
    decode is dead-lettered alone (found one by one only when the whole does not decode) and added to
    `bad`."""
    from signalgen.brokers.codec import decode_rows

    try:
        return decode_rows([m.data for m in messages], schema)
    except Exception:  # noqa: BLE001 - find the bad ones
        good = []
        for message in messages:
            try:
                decode_rows([message.data], schema)
                good.append(message)
            except Exception as exc:  # noqa: BLE001
                message.dead_letter("undecodable_record", str(exc)[:500])
                bad.append(message)
        return decode_rows([m.data for m in good], schema)


def _strategy(message: Received) -> tuple[str, str]:
    return message.attributes.get("client_id", ""), message.attributes.get("strategy_id", "")


def _kind(message: Received) -> str:
    if "signal_id" in message.attributes:
        return "signals"
    return "rejections" if "rejection_id" in message.attributes else "bar_rejections"
