"""Google Pub/Sub (cloud-dev): names, admin, the message codec, a worker's publisher, a subscriber
with a watchdog, and the IAM bindings of a client. Everything that talks to google-cloud-pubsub is
here; the transports plug it in as the cloud-dev sink, decision host, live bar feed and consumer.

The layout mirrors the Redis streams (docs/streams.md) with `.` for `:`. `<p>` is
`messaging.topic_prefix`, `<mode>` one of mock/live/simulation/historical:

| topic | published by | subscription (read by) |
| --- | --- | --- |
| `<p>.<mode>.internal.<kind>.<client>` (kind: signals, rejections, bar_rejections) | workers | `<topic>.recorder` (the decision host) |
| `<p>.<mode>.signals.<client>`, `<p>.<mode>.rejections.<client>` | the decision host | `<topic>.<client>` (the client) |
| `<p>.bars.<symbol>.<timeframe>` | the bar feed (`publish_bars`) | `<topic>.<worker id>` (each live worker: `ensure_bar_subscription`) |
| `<subscription>.deadletter` (topic and its one subscription) | Pub/Sub, `Received.dead_letter` | operators |

Isolation is by topic and subscription name only: the emulator ignores subscription filters and
IAM, so nothing here relies on either (docs/architecture.md).

A message's data is exactly a Redis entry's `data` (the JSON object of one record, `json_lines`);
its attributes carry the ids (`signal_id` or `rejection_id`, `client_id`, `strategy_id`, `symbol`,
`timeframe`, `mode`, `v`, and `revision` / `route` where known); its ordering key is the worker id.

gRPC and fork: clients are created after the fork, never at import and never in the forkserver
(process/preload.py may import this module; it must not build a client). A `Publisher` refuses to
be used in another process than the one that created it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from signalgen.config.models import SAFE_ID, Mode, timeframe_delta
from signalgen.errors import StorageError, TransientError
from signalgen.metrics import DEAD_LETTERS, PUBLISH_FAILURES
from signalgen.brokers.codec import (SCHEMA_VERSION, PublishStats, decision_entries, encode_bar, json_lines,
                                     paced)
from signalgen.brokers.redis import RECORDER_GROUP

if TYPE_CHECKING:
    import polars as pl

    from signalgen.config.models import PubSubMessagingConfig, RunConfig
    from signalgen.config.workers import WorkerSpec
    from signalgen.signals.records import Decisions

log = logging.getLogger(__name__)

_SAFE = re.compile(SAFE_ID)
_SYMBOL = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,31}$")  # config.models.Symbol
# Pub/Sub's rule for topic and subscription ids
_RESOURCE = re.compile(r"^(?!goog)[A-Za-z][A-Za-z0-9._~+%-]{2,254}$")
KINDS = ("signals", "rejections", "bar_rejections")
ID_ATTRIBUTE = {"signals": "signal_id", "rejections": "rejection_id"}
DEADLETTER = "deadletter"
ATTEMPT_TIMEOUT_S = 30.0  # one publish RPC; a failed one pauses its key and is retried by `Publisher`


def pubsub_module():
    """`google.cloud.pubsub_v1`, or ImportError telling how to install it."""
    try:
        from google.cloud import pubsub_v1
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise ImportError("Pub/Sub messaging needs google-cloud-pubsub: pip install 'signalgen[gcp]'") from exc
    return pubsub_v1


# ---------------------------------------------------------------- names


def _part(what: str, value: str, pattern: re.Pattern = _SAFE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{what} {value!r} is not allowed in a Pub/Sub name (pattern {pattern.pattern})")
    return value


def _name(*parts: str) -> str:
    name = ".".join(parts)
    if not _RESOURCE.match(name):
        raise ValueError(f"{name!r} is not a valid Pub/Sub topic or subscription id (3-255 characters, "
                         "a letter first, then letters, digits and -._~+%; not starting with goog)")
    return name


@dataclass(frozen=True)
class TopicNames:
    """Topic and subscription ids under one `messaging.topic_prefix` (the table in the module's
    docstring). Every part is checked before a name is built: client, mode, kind and consumer by
    the safe-id rule (config.models.SAFE_ID), symbols and timeframes by their own rules."""

    prefix: str = "signalgen"

    def __post_init__(self) -> None:
        _part("topic_prefix", self.prefix)

    def signals(self, mode: str, client: str) -> str:
        return _name(self.prefix, _mode(mode), "signals", _part("client", client))

    def rejections(self, mode: str, client: str) -> str:
        return _name(self.prefix, _mode(mode), "rejections", _part("client", client))

    def internal(self, mode: str, kind: str, client: str) -> str:
        """The workers' decisions of `kind` (KINDS) for `client`, read only by the decision host."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        return _name(self.prefix, _mode(mode), "internal", kind, _part("client", client))

    def bars(self, symbol: str, timeframe: str) -> str:
        timeframe_delta(timeframe)  # ValueError unless <n><s|m|h|d>
        return _name(self.prefix, "bars", _part("symbol", symbol, _SYMBOL), timeframe)

    def subscription(self, topic: str, consumer: str) -> str:
        """The subscription of `consumer` on `topic` (one per consumer: each gets every message)."""
        return _name(self._own(topic), _part("consumer", consumer))

    def deadletter(self, subscription: str) -> str:
        """`deadletter(subscription)`, for a subscription under this prefix."""
        return deadletter(self._own(subscription))

    def client_topics(self, mode: str, client: str) -> list[str]:
        """The topics a client reads (the decision host publishes them)."""
        return [self.signals(mode, client), self.rejections(mode, client)]

    def internal_topics(self, mode: str, client: str) -> list[str]:
        """The topics a worker of `client` publishes to."""
        return [self.internal(mode, kind, client) for kind in KINDS]

    def client_subscriptions(self, client: str, modes: tuple[str, ...] | None = None) -> list[str]:
        """Everything a client may read: its subscription on its own signals and rejections of every
        mode (or of `modes`), and their dead-letter subscriptions."""
        subs = [self.subscription(t, client) for m in modes or [m.value for m in Mode]
                for t in self.client_topics(m, client)]
        return [name for s in subs for name in (s, self.deadletter(s))]

    def _own(self, name: str) -> str:
        if not name.startswith(self.prefix + "."):
            raise ValueError(f"{name!r} is not under the topic prefix {self.prefix!r}")
        return name


def _mode(mode: str) -> str:
    if mode not in {m.value for m in Mode}:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(m.value for m in Mode)}")
    return mode


def deadletter(subscription: str) -> str:
    """The dead-letter topic of `subscription`, and the id of that topic's one subscription (a
    dead-letter topic without a subscription loses what it receives)."""
    return _name(subscription, DEADLETTER)


def topic_path(project: str, topic: str) -> str:
    return f"projects/{project}/topics/{topic}"


def subscription_path(project: str, subscription: str) -> str:
    return f"projects/{project}/subscriptions/{subscription}"


# ---------------------------------------------------------------- admin


def ensure_topic(publisher, project: str, topic: str) -> None:
    """Create `topic` unless it exists."""
    from google.api_core.exceptions import AlreadyExists

    try:
        publisher.create_topic(name=topic_path(project, topic))
    except AlreadyExists:
        pass


def ensure_subscription(publisher, subscriber, project: str, topic: str, subscription: str, *,
                        ack_deadline_s: int = 60, max_delivery_attempts: int = 5, ordered: bool = True) -> None:
    """Create `topic`, `subscription` on it (message ordering on unless `ordered` is False,
    `ack_deadline_s`, dead-letter policy) and its dead-letter topic with that topic's subscription,
    each unless it exists.

    An existing subscription is left as it is (Pub/Sub cannot turn ordering on afterwards).
    """
    from google.api_core.exceptions import AlreadyExists

    if max_delivery_attempts < 5:
        raise ValueError(f"max_delivery_attempts {max_delivery_attempts} is below Pub/Sub's minimum of 5")
    dead = deadletter(subscription)
    ensure_topic(publisher, project, topic)
    ensure_topic(publisher, project, dead)
    requests = [
        {"name": subscription_path(project, dead), "topic": topic_path(project, dead),
         "ack_deadline_seconds": ack_deadline_s},
        {"name": subscription_path(project, subscription), "topic": topic_path(project, topic),
         "ack_deadline_seconds": ack_deadline_s, "enable_message_ordering": ordered,
         "dead_letter_policy": {"dead_letter_topic": topic_path(project, dead),
                                "max_delivery_attempts": max_delivery_attempts}},
    ]
    for request in requests:
        try:
            subscriber.create_subscription(request=request)
        except AlreadyExists:
            pass


def ensure_client(m: PubSubMessagingConfig, client: str, modes: tuple[str, ...] | None = None) -> list[str]:
    """Every topic and subscription of `client` in `modes` (default: all): the internal topics with
    the decision host's subscriptions, the client's topics with the client's. Idempotent. Returns
    the subscriptions. The decision host's are not ordered: it stores by key, whatever the order, and
    an ordered subscription would hand it one message per worker per commit."""
    pubsub_v1 = pubsub_module()
    names = TopicNames(m.topic_prefix)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    done = []
    try:
        for mode in modes or [x.value for x in Mode]:
            pairs = [(t, RECORDER_GROUP) for t in names.internal_topics(mode, client)]
            pairs += [(t, client) for t in names.client_topics(mode, client)]
            for topic, consumer in pairs:
                sub = names.subscription(topic, consumer)
                ensure_subscription(publisher, subscriber, m.project, topic, sub, ack_deadline_s=m.ack_deadline_s,
                                    max_delivery_attempts=m.max_delivery_attempts, ordered=consumer != RECORDER_GROUP)
                done.append(sub)
    finally:
        subscriber.close()
        publisher.transport.close()
    return done


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """One Pub/Sub message as we publish it."""

    data: bytes
    attributes: dict[str, str]
    ordering_key: str

    @property
    def client_id(self) -> str:
        return self.attributes["client_id"]

    @property
    def mode(self) -> str:
        return self.attributes["mode"]


def record_message(kind: str, entry: dict, route: str | None = None) -> Message:
    """A Redis signal or rejection entry (`record_entries`, `signal_entries`, `decision_entries`: `v`,
    `id`, `data`) as a message. The attributes and the ordering key (the worker id,
    `client.strategy.symbol.timeframe` as `WorkerSpec.id`) are read from the record itself."""
    data = entry["data"] if isinstance(entry["data"], bytes) else entry["data"].encode()
    record = json.loads(data)
    id_attribute = ID_ATTRIBUTE[kind]
    if record[id_attribute] != entry["id"]:
        raise ValueError(f"entry id {entry['id']!r} is not the record's {id_attribute} {record[id_attribute]!r}")
    attributes = {"v": SCHEMA_VERSION, id_attribute: entry["id"]}
    attributes |= {k: str(record[k]) for k in ("client_id", "strategy_id", "symbol", "timeframe", "mode")}
    if "revision" in record:
        attributes["revision"] = str(record["revision"])
    if route is not None:
        attributes["route"] = route
    key = ".".join(attributes[k] for k in ("client_id", "strategy_id", "symbol", "timeframe"))
    return Message(data, attributes, key)


def decision_messages(spec: WorkerSpec, decisions: Decisions) -> list[tuple[str, Message]]:
    """(kind, message) of each decision of one batch, for the internal topics, with the strategy's route."""
    signals, rejections = decision_entries(decisions)
    route = spec.routing.value
    return ([("signals", record_message("signals", e, route)) for e in signals]
            + [("rejections", record_message("rejections", e, route)) for e in rejections])


def bar_rejection_messages(spec: WorkerSpec, mode: str, rejections: pl.DataFrame, run_id: str) -> list[Message]:
    """Bar rejections (BAR_REJECTION_SCHEMA + `run_id`, as the Redis entry's `data`) of a worker."""
    import polars as pl

    frame = rejections.with_columns(pl.lit(run_id, pl.String).alias("run_id"))
    attributes = {"v": SCHEMA_VERSION, "client_id": spec.client.id, "strategy_id": spec.strategy.id,
                  "symbol": spec.symbol, "timeframe": spec.timeframe, "mode": mode}
    return [Message(line, dict(attributes), spec.id) for line in json_lines(frame)]


# ---------------------------------------------------------------- publishing


def assert_not_preloading() -> None:
    """Raise if called while the forkserver imports its preload (process/preload.py): a gRPC client
    made there would be shared by every forked worker."""
    preload = sys.modules.get("signalgen.process.preload")
    if preload is not None and not hasattr(preload, "LOADED"):
        raise RuntimeError("a Pub/Sub client must not be created in the forkserver (during "
                           "signalgen.process.preload): create it in the worker, after the fork")


@dataclass(eq=False)
class _Pending:
    message: Message
    seq: int
    size: int


@dataclass(eq=False)
class _Key:
    """The unconfirmed messages of one (topic, ordering key), oldest first."""

    queue: deque[_Pending] = field(default_factory=deque)
    inflight: int = 0        # handed to the library, not yet done
    paused: bool = False     # a publish failed; the library refuses this key until `resume_publish`


@dataclass
class PublisherStats:
    published: int = 0
    confirmed: int = 0
    failed: int = 0                     # publish attempts that failed (each message counted each time)
    republished: int = 0
    max_paused_keys: int = 0
    outages: int = 0
    last_outage_s: float | None = None  # first failure -> first confirmation after it
    backpressure_events: int = 0
    max_outstanding: int = 0


class Publisher:
    """Publishes one client's messages of one mode, with ordering keys, and confirms them.

    - Memory is bounded: at most `max_messages` / `max_bytes` unconfirmed messages; `publish` blocks
      while full (backpressure; the library's own flow control is set to BLOCK at the same limits).
    - `confirm()` returns only when every message published before it is confirmed by Pub/Sub: a
      worker's checkpoint advances only after it (`checkpoints`).
    - Retries are ours, not the library's (with ordering on it would retry for ever, silently): a
      failed publish pauses its ordering key; once the key's last attempt is done its unconfirmed
      messages are published again, in order, after `resume_publish`, with backoff. `paused_keys`
      counts the keys waiting (status, metrics). An outage therefore loses nothing and reorders
      nothing; it may duplicate (the receivers dedupe by id). A permanent refusal (topic missing,
      permission denied, message too large) raises StorageError from the next call.
    - Isolation: refuses a message whose `client_id` or `mode` is not its own, or a topic that is not
      one of its client's.
    """

    def __init__(self, project: str, names: TopicNames, mode: str, client_id: str, *, max_messages: int = 1000,
                 max_bytes: int = 10 * 2**20, backoff_s: float = 0.05, backoff_max_s: float = 1.0,
                 attempt_timeout_s: float = ATTEMPT_TIMEOUT_S) -> None:
        assert_not_preloading()
        pubsub_v1 = pubsub_module()
        from google.cloud.pubsub_v1 import types

        self.project, self.names, self.mode, self.client_id = project, names, _mode(mode), _part("client", client_id)
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.backoff_s, self.backoff_max_s, self.attempt_timeout_s = backoff_s, backoff_max_s, attempt_timeout_s
        self.topics = frozenset(names.internal_topics(mode, client_id) + names.client_topics(mode, client_id))
        self.stats = PublisherStats()
        self._pid = os.getpid()
        flow = types.PublishFlowControl(message_limit=max_messages, byte_limit=max_bytes,
                                        limit_exceeded_behavior=types.LimitExceededBehavior.BLOCK)
        self._client = pubsub_v1.PublisherClient(
            publisher_options=types.PublisherOptions(enable_message_ordering=True, flow_control=flow))
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()  # one sender at a time: a key's messages reach the library in order
        self._keys: dict[tuple[str, str], _Key] = {}
        self._count = self._bytes = self._seq = self._paused = 0
        self._marks: deque[tuple[int, str, datetime]] = deque()  # (seq, worker id, last bar) not yet confirmed
        self._checkpoints: dict[str, datetime] = {}
        self._error: StorageError | None = None
        self._down_since: float | None = None
        self._closing = False
        self._resumer = threading.Thread(target=self._resume_loop, name="pubsub-resume", daemon=True)
        self._resumer.start()

    @classmethod
    def from_config(cls, cfg: RunConfig, client_id: str, **kwargs: Any) -> Publisher:
        m = cfg.environment.messaging
        return cls(m.project, TopicNames(m.topic_prefix), cfg.mode.name.value, client_id,
                   max_messages=m.max_outstanding_messages, max_bytes=m.max_outstanding_bytes, **kwargs)

    # -- what a worker's sink calls

    def publish_decisions(self, spec: WorkerSpec, decisions: Decisions, *, ordered: bool = True) -> None:
        """Publish one batch to the internal topics; the worker's checkpoint (its last bar) becomes
        durable when `confirm()` has seen every message of it confirmed. `ordered` False publishes
        without an ordering key: a subscriber then gets a worker's messages without waiting for each
        ack (with a key, the emulator and the client library hand the next message of a key only after
        the previous one is acked, even on an unordered subscription)."""
        if not decisions.bars:
            return
        for kind, message in decision_messages(spec, decisions):
            if not ordered:
                message = Message(message.data, message.attributes, "")
            self.publish(self.names.internal(self.mode, kind, self.client_id), message)
        last = datetime.fromtimestamp(int(decisions.bar_time_us[-1]) / 1e6, timezone.utc)
        with self._cond:
            self._marks.append((self._seq, spec.id, last))

    def publish(self, topic: str, message: Message) -> None:
        """Hand `message` to Pub/Sub (blocks while `max_messages` / `max_bytes` are outstanding)."""
        if os.getpid() != self._pid:
            raise RuntimeError(f"this Publisher was created in process {self._pid}, not {os.getpid()}: "
                               "create publishers after the fork")
        if message.client_id != self.client_id or message.mode != self.mode or topic not in self.topics:
            raise PermissionError(f"publisher of {self.client_id} ({self.mode}) refuses a message of "
                                  f"{message.attributes.get('client_id')!r} ({message.attributes.get('mode')!r}) "
                                  f"for topic {topic!r}")
        size = len(message.data) + sum(len(k) + len(v) for k, v in message.attributes.items())
        with self._cond:
            self._raise_error()
            while self._count and (self._count >= self.max_messages or self._bytes + size > self.max_bytes):
                if self.stats.backpressure_events == 0 or self._down_since is not None:
                    log.warning("pubsub publisher full (%d messages unconfirmed): the worker waits", self._count)
                self.stats.backpressure_events += 1
                self._cond.wait(1.0)
                self._raise_error()
            self._count += 1  # room reserved before the send lock: the resumer may need that lock to free it
            self._bytes += size
            self.stats.max_outstanding = max(self.stats.max_outstanding, self._count)
        with self._send_lock:
            with self._cond:
                self._seq += 1
                key = self._keys.setdefault((topic, message.ordering_key), _Key())
                pending = _Pending(message, self._seq, size)
                key.queue.append(pending)
                self.stats.published += 1
                send = not key.paused
                if send:
                    key.inflight += 1
            if send:
                self._send(topic, key, pending)

    def confirm(self, timeout: float = 30.0) -> dict[str, datetime]:
        """Wait until every message published before this call is confirmed; the checkpoints (worker
        id -> last bar whose decisions Pub/Sub holds). TransientError if Pub/Sub has not confirmed
        them within `timeout` (they stay queued and are retried)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._seq
            while self._oldest() <= target:
                self._raise_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"Pub/Sub has not confirmed {self._count} messages within {timeout:.0f} s "
                                         f"({self._paused} ordering keys paused)")
                self._cond.wait(min(left, 0.5))
            return self._promote()

    @property
    def checkpoints(self) -> dict[str, datetime]:
        with self._cond:
            return self._promote()

    @property
    def paused_keys(self) -> int:
        """Ordering keys whose publishing failed and waits to be resumed."""
        with self._cond:
            return self._paused

    @property
    def outstanding(self) -> int:
        """Messages not yet confirmed."""
        with self._cond:
            return self._count

    def close(self, timeout: float = 30.0) -> None:
        """Confirm (up to `timeout`), then stop the client."""
        try:
            self.confirm(timeout)
        finally:
            self._stop()

    def abort(self) -> None:
        """Stop at once; unconfirmed messages are dropped (the checkpoint never passed them)."""
        self._stop()

    # -- internals

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._resumer.join(timeout=5)
        self._client.transport.close()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _oldest(self) -> float:
        """The seq of the oldest unconfirmed message (inf if none). Called with the lock held."""
        return min((k.queue[0].seq for k in self._keys.values() if k.queue), default=float("inf"))

    def _promote(self) -> dict[str, datetime]:
        oldest = self._oldest()
        while self._marks and self._marks[0][0] < oldest:
            _, worker, last = self._marks.popleft()
            self._checkpoints[worker] = last
        return dict(self._checkpoints)

    def _send(self, topic: str, key: _Key, pending: _Pending) -> None:
        """Hand one message to the library (the send lock held). Its callback settles it."""
        m = pending.message
        try:
            future = self._client.publish(topic_path(self.project, topic), m.data, ordering_key=m.ordering_key,
                                          retry=None, timeout=self.attempt_timeout_s, **m.attributes)
        except AssertionError as exc:
            # google-cloud-pubsub's race: a batch of this key has just failed (status ERROR) and its
            # sequencer is not paused yet; a publish in between trips the library's assert ("Publish after
            # stop() or publish error."). Not a refusal: a failed attempt, retried as any other.
            with self._cond:
                key.inflight -= 1
                self._failed(topic, key, exc)
                self._cond.notify_all()
            return
        except Exception as exc:  # refused before sending: too large, stopped client
            with self._cond:
                key.inflight -= 1
                self._error = StorageError(f"Pub/Sub refused a message for {topic}: {exc}")
                self._cond.notify_all()
            return
        future.add_done_callback(lambda f: self._done(topic, key, pending, f))

    def _done(self, topic: str, key: _Key, pending: _Pending, future) -> None:
        exc = future.exception()
        with self._cond:
            key.inflight -= 1
            if exc is None:
                if key.queue and key.queue[0] is pending:
                    key.queue.popleft()
                else:
                    key.queue.remove(pending)
                self._count -= 1
                self._bytes -= pending.size
                self.stats.confirmed += 1
                if self._down_since is not None:
                    self.stats.last_outage_s = time.monotonic() - self._down_since
                    log.warning("pubsub publishing recovered after %.1f s", self.stats.last_outage_s)
                    self._down_since = None
            else:
                self._failed(topic, key, exc)
                if _permanent(exc) and self._error is None:
                    self._error = StorageError(f"Pub/Sub refused publishing to {topic}: {exc}")
            self._cond.notify_all()

    def _failed(self, topic: str, key: _Key, exc: BaseException) -> None:
        """An attempt of `key` failed: pause the key until the resumer publishes its queue again. Called
        with the lock held."""
        self.stats.failed += 1
        PUBLISH_FAILURES.inc()
        if not key.paused:
            key.paused = True
            self._paused += 1
            self.stats.max_paused_keys = max(self.stats.max_paused_keys, self._paused)
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.stats.outages += 1
            log.warning("pubsub publish to %s failed (%s): retrying in order", topic, exc)

    def _resume_loop(self) -> None:
        """Publish the messages of paused keys again, in order, once each key's attempts are done."""
        rounds, confirmed = 0, -1
        while True:
            with self._cond:
                while not self._closing and (self._error is not None or not any(
                        k.paused and not k.inflight for k in self._keys.values())):
                    self._cond.wait(1.0)
                if self._closing:
                    return
                # back off while nothing gets through: the failure that paused the keys may not be over
                rounds = rounds + 1 if self.stats.confirmed == confirmed else 0
                confirmed = self.stats.confirmed
            time.sleep(min(self.backoff_s * 2**rounds, self.backoff_max_s))
            with self._send_lock:
                with self._cond:
                    ready = [(t, k) for t, k in self._keys.items() if k.paused and not k.inflight]
                for (topic, ordering_key), key in ready:
                    with self._cond:
                        batch = list(key.queue)
                        key.paused = False
                        self._paused -= 1
                        key.inflight += len(batch)
                        self.stats.republished += len(batch)
                    try:
                        self._client.resume_publish(topic_path(self.project, topic), ordering_key)
                    except RuntimeError:  # the library's sequencer was not paused (or was cleaned up)
                        pass
                    for pending in batch:
                        self._send(topic, key, pending)
            with self._cond:
                self._keys = {tk: k for tk, k in self._keys.items() if k.queue or k.inflight or k.paused}


def _permanent(exc: BaseException) -> bool:
    """A refusal that retrying will not cure (a missing topic, a permission, a bad argument)."""
    from google.api_core import exceptions as gexc
    from google.cloud.pubsub_v1.publisher.exceptions import FlowControlLimitError

    return isinstance(exc, gexc.NotFound | gexc.PermissionDenied | gexc.InvalidArgument | gexc.FailedPrecondition
                      | FlowControlLimitError)


# ---------------------------------------------------------------- subscribing


class Received:
    """A message handed to a `Subscriber`'s handler. Exactly one of `ack`, `nack`, `dead_letter`
    settles it; `ack` only once it is handled (e.g. after the batch holding it is committed)."""

    def __init__(self, subscriber: Subscriber, message, record: dict, key: tuple[str, str] | None) -> None:
        self._subscriber, self._message, self.record, self.key = subscriber, message, record, key
        self.data: bytes = message.data
        self.attributes: dict[str, str] = dict(message.attributes)
        self.ordering_key: str = message.ordering_key
        self.message_id: str = message.message_id
        self.delivery_attempt: int | None = message.delivery_attempt

    def ack(self) -> None:
        self._subscriber._settled(self, done=True)
        self._message.ack()

    def nack(self) -> None:
        self._subscriber._settled(self, done=False)
        self._message.nack()

    def dead_letter(self, reason: str, detail: str = "") -> None:
        """Publish a copy to the subscription's dead-letter topic with `reason` (and `detail`), then ack;
        if that publish fails, nack (Pub/Sub's dead-letter policy forwards it after the last attempt)."""
        self._subscriber._dead_letter(self, reason, detail)


@dataclass
class SubscriberStats:
    delivered: int = 0        # handed to the handler
    duplicates: int = 0       # acked without the handler: this id and revision were already handled
    dead_lettered: int = 0
    restarts: int = 0         # streaming pulls restarted by the watchdog
    last_restart_reason: str = ""


class Subscriber:
    """Streaming pull on one subscription, handing each message to `handler(Received)`.

    - Acks are the caller's (`Received.ack`), after it handled the message.
    - Dedupe by our ids: a message whose (`signal_id` or `rejection_id`, `revision`) was acked
      before is acked without calling the handler (the last `dedupe_size` ids are kept); one whose
      copy is still being handled is nacked (redelivered, then deduped).
    - Poison: a body that is not JSON (`undecodable`) or a `v` other than ours (`wrong_schema`) is
      dead-lettered with that reason at once; a handler that raises gets the message again
      (nack) until its `max_delivery_attempts`-th delivery, when it is dead-lettered with reason
      `handler_failed`.
    - Watchdog: a streaming pull can go silent. If its future ends, or nothing arrived for
      `watchdog_s` while `expect()` says messages are due, the pull is restarted on a new client
      (a new connection: the old one may be the silent part); while restarts bring nothing, the
      allowance doubles, up to 8 x `watchdog_s`.
    - The subscriptions are ordered: the library hands the handler the next message of an
      ordering key (a worker) only once the previous one is acked or nacked. A caller that acks
      after a commit therefore receives one message per worker per commit.
    """

    def __init__(self, project: str, subscription: str, handler: Callable[[Received], None], *,
                 max_delivery_attempts: int = 5, watchdog_s: float = 120.0, expect: Callable[[], bool] = lambda: True,
                 max_messages: int = 1000, max_bytes: int = 10 * 2**20, dedupe_size: int = 100_000) -> None:
        self.project, self.subscription, self.handler = project, subscription, handler
        self.deadletter_topic = deadletter(subscription)
        self.max_delivery_attempts, self.watchdog_s, self.expect = max_delivery_attempts, watchdog_s, expect
        self.max_messages, self.max_bytes, self.dedupe_size = max_messages, max_bytes, dedupe_size
        self.stats = SubscriberStats()
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._handling: set[tuple[str, str]] = set()
        self._client = self._future = self._dead_publisher = None
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, subscription: str, handler: Callable[[Received], None],
                    **kwargs: Any) -> Subscriber:
        m = cfg.environment.messaging
        return cls(m.project, subscription, handler, max_delivery_attempts=m.max_delivery_attempts,
                   watchdog_s=m.watchdog_s, max_messages=m.max_outstanding_messages,
                   max_bytes=m.max_outstanding_bytes, **kwargs)

    def start(self) -> Subscriber:
        assert_not_preloading()
        self._pull()
        self._watchdog = threading.Thread(target=self._watch, name="pubsub-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        _close_pull(self._future, self._client)
        if self._dead_publisher is not None:
            self._dead_publisher.transport.close()

    def _pull(self) -> None:
        pubsub_v1 = pubsub_module()
        self._client = pubsub_v1.SubscriberClient(transport=_own_transport())
        flow = pubsub_v1.types.FlowControl(max_messages=self.max_messages, max_bytes=self.max_bytes)
        self._last = time.monotonic()
        self._future = self._client.subscribe(subscription_path(self.project, self.subscription), self._on_message,
                                              flow_control=flow)

    def _watch(self) -> None:
        allowance, last = self.watchdog_s, self._last
        while not self._stopped.wait(min(1.0, self.watchdog_s / 4)):
            if self._last != last:  # something arrived since the last restart
                allowance, last = self.watchdog_s, self._last
            if self._future.done():
                reason = f"streaming pull ended ({self._future.exception()!r})"
            elif time.monotonic() - self._last > allowance and self.expect():
                reason = f"nothing received for {allowance:g} s"
                allowance = min(allowance * 2, 8 * self.watchdog_s)  # a restart that did not help: wait longer
            else:
                continue
            log.warning("pubsub %s: %s; restarting the pull", self.subscription, reason)
            old = (self._future, self._client)
            threading.Thread(target=_close_pull, args=old, daemon=True).start()  # may hang on a dead link
            self._pull()
            last = self._last
            self.stats.restarts += 1
            self.stats.last_restart_reason = reason

    def _on_message(self, message) -> None:
        self._last = time.monotonic()
        attributes = message.attributes
        id_value = attributes.get("signal_id") or attributes.get("rejection_id")
        key = (id_value, attributes.get("revision", "0")) if id_value else None
        try:
            record = json.loads(message.data)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return Received(self, message, {}, None).dead_letter("undecodable", str(exc))
        received = Received(self, message, record, key)
        if attributes.get("v") != SCHEMA_VERSION:
            return received.dead_letter("wrong_schema", f"v={attributes.get('v')!r}")
        if key is not None:
            with self._lock:
                if key in self._done:
                    self.stats.duplicates += 1
                    message.ack()
                    return
                if key in self._handling:
                    message.nack()
                    return
                self._handling.add(key)
        self.stats.delivered += 1
        try:
            self.handler(received)
        except Exception as exc:
            if (message.delivery_attempt or 0) >= self.max_delivery_attempts:
                received.dead_letter("handler_failed", repr(exc)[:1000])
            else:
                received.nack()

    def _settled(self, received: Received, done: bool) -> None:
        if received.key is None:
            return
        with self._lock:
            self._handling.discard(received.key)
            if done:
                self._done[received.key] = None
                if len(self._done) > self.dedupe_size:
                    self._done.popitem(last=False)

    def _dead_letter(self, received: Received, reason: str, detail: str) -> None:
        pubsub_v1 = pubsub_module()
        with self._lock:
            if self._dead_publisher is None:
                self._dead_publisher = pubsub_v1.PublisherClient()
        attributes = {**received.attributes, "reason": reason, "detail": detail[:1000],
                      "subscription": self.subscription, "message_id": received.message_id,
                      "delivery_attempt": str(received.delivery_attempt or 0)}
        try:
            self._dead_publisher.publish(topic_path(self.project, self.deadletter_topic), received.data,
                                         **attributes).result(timeout=30)
        except Exception as exc:
            log.warning("pubsub %s: cannot dead-letter message %s (%s): nacked", self.subscription,
                        received.message_id, exc)
            received.nack()
            return
        self.stats.dead_lettered += 1
        DEAD_LETTERS.labels(reason[:64]).inc()
        received.ack()


def _own_transport():
    """A subscriber transport on a connection of its own. gRPC shares one TCP connection among the
    channels of a process that have the same target and arguments (its global subchannel pool), so
    a new client alone would restart a pull on the very connection that went silent."""
    import grpc
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1),
               ("grpc.max_receive_message_length", -1), ("grpc.keepalive_time_ms", 30000)]
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if host:
        channel = grpc.insecure_channel(host, options=options)
    else:  # Application Default Credentials, as the library's own channel
        channel = SubscriberGrpcTransport.create_channel("pubsub.googleapis.com:443", options=options)
    return SubscriberGrpcTransport(channel=channel)


def _close_pull(future, client) -> None:
    if future is not None:
        future.cancel()
        try:
            future.result(timeout=10)
        except Exception:
            pass
    if client is not None:
        client.close()


# ---------------------------------------------------------------- bars

# BAR_SCHEMA's columns (signalgen/data/schema.py; brokers sit below data and may not import it: a
# test checks the two agree)
BAR_COLUMNS = ("symbol", "timeframe", "bar_time", "open", "high", "low", "close", "volume")
_BAR_VALUES = BAR_COLUMNS[3:]
_BAR_FIELDS = ("v", *BAR_COLUMNS)
BAR_ATTRIBUTES = ("v", "symbol", "timeframe", "bar_time")
PUBLISH_WINDOW = 1000  # bars handed to the library before `publish_bars` waits for their confirmation


class PoisonMessage(ValueError):
    """A message that is not what its topic carries; `reason` is a short code as the Redis dead
    letters use (`undecodable`, `wrong_schema`, `unknown_symbol`, `wrong_timeframe`)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail[:200]
        super().__init__(f"{reason}: {self.detail}")


def bar_message(bar: dict) -> Message:
    """One bar (a BAR_SCHEMA row) as a message of `<p>.bars.<symbol>.<timeframe>`: its data is the Redis
    entry's fields as one JSON object, its attributes `v`, `symbol`, `timeframe`, `bar_time`, its
    ordering key `<symbol>.<timeframe>` (one series: delivered in bar order)."""
    fields = encode_bar(bar)
    data = json.dumps(fields, separators=(",", ":")).encode()
    return Message(data, {k: fields[k] for k in BAR_ATTRIBUTES}, f"{fields['symbol']}.{fields['timeframe']}")


def decode_bar(data: bytes, symbol: str | None = None, timeframe: str | None = None) -> dict:
    """A bar message's data -> a BAR_SCHEMA row (dict). PoisonMessage (a ValueError) naming the problem
    for anything else; with `symbol` / `timeframe`, also for a bar of another series than the topic's.
    Prices may be JSON strings (as we publish them) or numbers (another publisher's)."""
    try:
        f = json.loads(data)
    except UnicodeDecodeError as exc:
        raise PoisonMessage("undecodable", f"not UTF-8: {exc}") from None
    except ValueError as exc:
        raise PoisonMessage("undecodable", f"not JSON: {exc}") from None
    if not isinstance(f, dict):
        raise PoisonMessage("undecodable", f"not a JSON object but {type(f).__name__}")
    if f.get("v") != SCHEMA_VERSION:
        raise PoisonMessage("wrong_schema", f"schema version {f.get('v')!r}, expected {SCHEMA_VERSION!r}")
    missing = [k for k in _BAR_FIELDS if k not in f]
    if missing:
        raise PoisonMessage("wrong_schema", f"missing fields {missing}")
    if symbol is not None and f["symbol"] != symbol:
        raise PoisonMessage("unknown_symbol", f"symbol {f['symbol']!r} on the topic of {symbol}")
    if timeframe is not None and f["timeframe"] != timeframe:
        raise PoisonMessage("wrong_timeframe", f"timeframe {f['timeframe']!r} on the topic of {timeframe}")
    if not isinstance(f["symbol"], str) or not isinstance(f["timeframe"], str):
        raise PoisonMessage("wrong_schema", "symbol and timeframe must be strings")
    try:
        if not isinstance(f["bar_time"], str):
            raise ValueError(f"bar_time {f['bar_time']!r} is not a string")
        t = datetime.fromisoformat(f["bar_time"])
        t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
        values = {}
        for c in _BAR_VALUES:
            if isinstance(f[c], bool) or not isinstance(f[c], str | int | float):
                raise ValueError(f"{c} {f[c]!r} is not a number")
            values[c] = float(f[c])
    except ValueError as exc:
        raise PoisonMessage("undecodable", str(exc)) from None
    return {"symbol": f["symbol"], "timeframe": f["timeframe"], "bar_time": t, **values}


def publish_bars(cfg: RunConfig, frames: Iterable[pl.DataFrame], *, speed: float = 0.0,
                 stop: threading.Event | None = None, max_ahead: timedelta | None = None,
                 on_publish: Callable[[datetime, int], None] | None = None,
                 window: int = PUBLISH_WINDOW) -> PublishStats:
    """Publish bars (BAR_SCHEMA frames, any symbols) to `<p>.bars.<symbol>.<timeframe>`, in bar-time
    order per frame, as data/redis_bars.publish_bars does to Redis.

    `speed` 0 publishes as fast as possible; s > 0 paces bar times at s x real time. With `max_ahead`,
    a bar ending after `latest_end` when its turn comes is refused and counted, not published. Topics
    are created when missing. Each series has its ordering key, so its bars are delivered in order.
    Returns only when every bar published is confirmed by Pub/Sub (`published` counts confirmed
    bars): up to `window` bars are in flight, and all are confirmed before a paced wait. A failed
    publish is retried, in order, with backoff (up to 0.5 s), logged once per outage; a permanent
    refusal raises StorageError. `on_publish(bar_time, n)` is called once a bar time's `n` bars are
    confirmed.

    Unlike a Redis stream a topic keeps nothing for a subscription created later, and knows no ids:
    a bar published again is delivered again (readers skip bars at or before their checkpoint).
    """

    assert_not_preloading()
    pubsub_v1 = pubsub_module()
    from google.cloud.pubsub_v1 import types

    m = cfg.environment.messaging
    names, stats = TopicNames(m.topic_prefix), PublishStats()
    client = pubsub_v1.PublisherClient(batch_settings=types.BatchSettings(max_latency=0.002),
                                       publisher_options=types.PublisherOptions(enable_message_ordering=True))
    topics: set[str] = set()
    inflight: list[tuple[datetime, list[tuple[str, Message, Any]]]] = []

    def send(topic: str, message: Message):
        try:
            return client.publish(topic_path(m.project, topic), message.data, ordering_key=message.ordering_key,
                                  retry=None, timeout=ATTEMPT_TIMEOUT_S, **message.attributes)
        except AssertionError as exc:  # the library's race after a failed batch (see Publisher._send): retried
            failed = Future()
            failed.set_exception(exc)
            return failed

    def settle() -> bool:
        """Wait for every bar in flight; publish the failed ones again until they are confirmed
        (False if `stop` came first)."""
        pending = [(topic, msg, fut) for _, items in inflight for topic, msg, fut in items]
        delay, down = 0.05, False
        while True:
            failed = []
            for topic, msg, fut in pending:
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 - sorted into permanent and retried below
                    if _permanent(exc):
                        raise StorageError(f"Pub/Sub refused a bar for {topic}: {exc}") from exc
                    failed.append((topic, msg, exc))
            if not failed:
                break
            if not down:
                down = True
                log.warning("feed: Pub/Sub publish failed (%s); retrying in order", failed[0][2])
            if stop is not None and stop.wait(delay):
                return False
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, 0.5)
            for topic, key in dict.fromkeys((t, msg.ordering_key) for t, msg, _ in failed):
                try:
                    client.resume_publish(topic_path(m.project, topic), key)  # a failure paused the key
                except RuntimeError:  # not paused (yet): the next attempt fails and comes back here
                    pass
            pending = [(t, msg, send(t, msg)) for t, msg, _ in failed]  # per key: the failed suffix, in order
        if down:
            log.warning("feed: Pub/Sub is back")
        for bar_time, items in inflight:
            stats.published += len(items)
            if on_publish is not None:
                on_publish(bar_time, len(items))
        inflight.clear()
        return True

    try:
        for bar_time, rows, at, _ in paced(frames, BAR_COLUMNS, speed=speed, max_ahead=max_ahead, stats=stats):
            if stop is not None and stop.is_set():
                settle()
                return stats
            if rows and at > time.monotonic():
                if not settle():
                    return stats
                wait = at - time.monotonic()
                if wait > 0 and (stop.wait(wait) if stop is not None else time.sleep(wait)):
                    return stats
            items = []
            for bar in rows:
                topic = names.bars(bar["symbol"], bar["timeframe"])
                if topic not in topics:
                    _admin(ensure_topic, client, m.project, topic)
                    topics.add(topic)
                message = bar_message(bar)
                items.append((topic, message, send(topic, message)))
            if items:
                inflight.append((bar_time, items))
            if sum(len(i) for _, i in inflight) >= window or (speed > 0 and inflight):
                if not settle():
                    return stats
        settle()
        return stats
    finally:
        client.transport.close()


def _admin(call: Callable, *args: Any, **kwargs: Any) -> Any:
    """An admin call (create a topic or subscription): TransientError while Pub/Sub is unreachable,
    StorageError for a refusal."""
    from google.api_core import exceptions as gexc

    try:
        return call(*args, **kwargs)
    except (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError, gexc.InternalServerError,
            gexc.TooManyRequests) as exc:
        raise TransientError(f"Pub/Sub unreachable: {exc}") from exc
    except gexc.GoogleAPICallError as exc:
        raise StorageError(f"Pub/Sub refused: {exc}") from exc


# ---------------------------------------------------------------- a live worker's bars


def bar_subscription(prefix: str, worker_id: str, symbol: str, timeframe: str) -> str:
    """The subscription of worker `worker_id` on its bar topic: `<p>.bars.<symbol>.<timeframe>.<worker id>`
    (its dots kept). When that is not a valid id — too long for its dead-letter topic
    (`<subscription>.deadletter`) to fit Pub/Sub's 255 characters, or holding a character Pub/Sub
    refuses — it is `<p>.bars.<symbol>.<timeframe>.w<first 16 hex digits of sha256(worker id)>`:
    stable for a worker, distinct for distinct workers in practice (64 bits)."""
    topic = TopicNames(prefix).bars(symbol, timeframe)
    name = f"{topic}.{worker_id}"
    if isinstance(worker_id, str) and worker_id and _RESOURCE.match(name) and _RESOURCE.match(f"{name}.{DEADLETTER}"):
        return name
    return _name(topic, "w" + hashlib.sha256(str(worker_id).encode()).hexdigest()[:16])


def ensure_bar_subscription(cfg: RunConfig, worker_id: str, symbol: str, timeframe: str) -> str:
    """Create (unless it exists) the bar topic of (`symbol`, `timeframe`) and worker `worker_id`'s own
    subscription on it (`bar_subscription`): message ordering on, `messaging.ack_deadline_s`, and a
    dead-letter topic with its subscription after `messaging.max_delivery_attempts`. Returns its id.

    A topic keeps nothing for a subscription made later: create it before bars are published for
    the worker (at `start`), and warm up from the bar archive, not from the topic."""
    m = cfg.environment.messaging
    pubsub_v1 = pubsub_module()
    assert_not_preloading()
    topic, sub = TopicNames(m.topic_prefix).bars(symbol, timeframe), bar_subscription(m.topic_prefix, worker_id,
                                                                                       symbol, timeframe)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    try:
        _admin(ensure_subscription, publisher, subscriber, m.project, topic, sub, ack_deadline_s=m.ack_deadline_s,
               max_delivery_attempts=m.max_delivery_attempts)
    finally:
        subscriber.close()
        publisher.transport.close()
    return sub


class Pulled(NamedTuple):
    """One message of a synchronous pull: the decoded bar (None if poison), its ack id, and the
    problem (a PoisonMessage with `reason` and `detail`; None for a good bar)."""

    bar: dict | None
    ack_id: str
    problem: PoisonMessage | None


class Pull:
    """Synchronous pull (`SubscriberClient.pull` / `acknowledge`) on one subscription, holding the ack
    id of every message it returned until the caller settles it: `ack` once it is handled (a live
    worker: once its decision is confirmed), `nack` to have it again, `dead_letter` for poison.

    Ordering (measured on the emulator; Pub/Sub documents the same): on a subscription with message
    ordering, one pull returns, per ordering key, a run of consecutive messages in order, and no
    later message of that key comes before every message returned is acked (or its ack deadline
    passes, or it is nacked: then that message and the later ones come again, in order). So a reader
    that holds ack ids until its work is confirmed receives each series in order, a run at a time.
    Closing a client does not release its messages on Pub/Sub's side: `close()` nacks what it holds,
    so they are redelivered at once rather than after the ack deadline.
    """

    def __init__(self, project: str, subscription: str) -> None:
        assert_not_preloading()
        pubsub_v1 = pubsub_module()
        self.project, self.subscription = project, subscription
        self.path = subscription_path(project, subscription)
        self.deadletter_topic = deadletter(subscription)
        self._client = pubsub_v1.SubscriberClient()
        self._dead_publisher = None
        self._held: dict[str, Any] = {}  # ack id -> the library's ReceivedMessage

    def pull_raw(self, max_messages: int = 100, timeout_s: float = 5.0) -> list:
        """Up to `max_messages` ReceivedMessages, waiting up to about `timeout_s` for the first ([] if none
        came). TransientError while Pub/Sub is unreachable; NotFound if the subscription does not exist."""
        from google.api_core import exceptions as gexc

        try:
            response = self._client.pull(request={"subscription": self.path, "max_messages": max_messages},
                                         retry=None, timeout=timeout_s)
        except gexc.DeadlineExceeded:
            return []
        except gexc.NotFound:
            raise
        except (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.TooManyRequests, gexc.Aborted,
                gexc.Unknown) as exc:
            raise TransientError(f"Pub/Sub pull on {self.subscription}: {exc}") from exc
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"Pub/Sub refused a pull on {self.subscription}: {exc}") from exc
        for received in response.received_messages:
            self._held[received.ack_id] = received
        return list(response.received_messages)

    @property
    def held(self) -> int:
        """Messages returned and not settled yet."""
        return len(self._held)

    def ack(self, ack_ids: Iterable[str]) -> None:
        """Acknowledge: Pub/Sub will not deliver these messages again (within its at-least-once)."""
        self._settle(list(ack_ids), ack=True)

    def nack(self, ack_ids: Iterable[str] | None = None) -> None:
        """Give messages back (default: every one held): redelivered at once, in order per key."""
        self._settle(list(self._held) if ack_ids is None else list(ack_ids), ack=False)

    def extend(self, ack_ids: Iterable[str], seconds: int) -> None:
        """Keep messages `seconds` longer before Pub/Sub redelivers them (a slow handling)."""
        ids = list(ack_ids)
        for i in range(0, len(ids), 1000):
            self._call(self._client.modify_ack_deadline, {"subscription": self.path, "ack_ids": ids[i:i + 1000],
                                                          "ack_deadline_seconds": seconds})

    def dead_letter(self, ack_id: str, reason: str | PoisonMessage, detail: str = "") -> None:
        """Publish a copy of a held message to `<subscription>.deadletter` with `reason` and `detail` in its
        attributes (and the subscription, message id and delivery attempt), then ack it. `reason` may be
        the `PoisonMessage` a pull returned (its reason and detail are used). If that publish fails the
        message is nacked (Pub/Sub's own dead-letter policy forwards it after the last attempt) and
        TransientError raised."""
        if isinstance(reason, PoisonMessage):
            reason, detail = reason.reason, detail or reason.detail
        received = self._held[ack_id]
        message = received.message
        if self._dead_publisher is None:
            self._dead_publisher = pubsub_module().PublisherClient()
        attributes = {**dict(message.attributes), "reason": reason, "detail": detail[:1000],
                      "subscription": self.subscription, "message_id": message.message_id,
                      "delivery_attempt": str(received.delivery_attempt or 0)}
        try:
            self._dead_publisher.publish(topic_path(self.project, self.deadletter_topic), message.data,
                                         **attributes).result(timeout=ATTEMPT_TIMEOUT_S)
        except Exception as exc:
            self.nack([ack_id])
            raise TransientError(f"cannot dead-letter message {message.message_id} of {self.subscription}: "
                                 f"{exc}") from exc
        DEAD_LETTERS.labels(reason[:64]).inc()
        self.ack([ack_id])

    def close(self) -> None:
        """Nack what is held (redelivered at once to the next reader), then close the connections."""
        try:
            if self._held:
                self.nack()
        except (TransientError, StorageError) as exc:  # unreachable: they come back after the ack deadline
            log.warning("pubsub %s: could not give back %d messages (%s)", self.subscription, len(self._held), exc)
        finally:
            self._client.close()
            if self._dead_publisher is not None:
                self._dead_publisher.transport.close()

    def _settle(self, ids: list[str], ack: bool) -> None:
        for i in range(0, len(ids), 1000):  # Pub/Sub takes at most a few thousand ids a request
            chunk = ids[i:i + 1000]
            if ack:
                self._call(self._client.acknowledge, {"subscription": self.path, "ack_ids": chunk})
            else:
                self._call(self._client.modify_ack_deadline, {"subscription": self.path, "ack_ids": chunk,
                                                              "ack_deadline_seconds": 0})
            for a in chunk:
                self._held.pop(a, None)

    def _call(self, method: Callable, request: dict) -> None:
        from google.api_core import exceptions as gexc

        try:
            method(request=request, timeout=ATTEMPT_TIMEOUT_S)
        except (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError, gexc.InternalServerError,
                gexc.TooManyRequests, gexc.Aborted, gexc.Unknown) as exc:
            raise TransientError(f"Pub/Sub {method.__name__} on {self.subscription}: {exc}") from exc
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"Pub/Sub refused {method.__name__} on {self.subscription}: {exc}") from exc


class BarPull(Pull):
    """A live worker's bars by synchronous pull on its subscription (`ensure_bar_subscription`).

    `pull(max_messages, timeout_s)` returns `Pulled(bar, ack_id, problem)` in delivery order (per
    series in bar order, see `Pull`); the caller acks a bar only once its decision is confirmed, and
    dead-letters a poison one (`dead_letter(ack_id, problem)`). With `symbol`
    and `timeframe`, a bar of another series is poison too. A bar already handled (at or before the
    worker's checkpoint: delivery is at least once, and a feed re-run publishes copies) is the
    caller's to skip and ack.
    """

    def __init__(self, project: str, subscription: str, symbol: str | None = None,
                 timeframe: str | None = None) -> None:
        super().__init__(project, subscription)
        self.symbol, self.timeframe = symbol, timeframe

    @classmethod
    def for_worker(cls, cfg: RunConfig, worker_id: str, symbol: str, timeframe: str) -> BarPull:
        """The worker's subscription, created if missing, read with its series checked."""
        sub = ensure_bar_subscription(cfg, worker_id, symbol, timeframe)
        return cls(cfg.environment.messaging.project, sub, symbol, timeframe)

    def pull(self, max_messages: int = 100, timeout_s: float = 5.0) -> list[Pulled]:
        out = []
        for received in self.pull_raw(max_messages, timeout_s):
            try:
                out.append(Pulled(decode_bar(received.message.data, self.symbol, self.timeframe), received.ack_id,
                                  None))
            except PoisonMessage as problem:
                out.append(Pulled(None, received.ack_id, problem))
        return out


# ---------------------------------------------------------------- a client's consumer


def consume_signals(cfg: RunConfig, client: str, mode: str, *, consumer: str | None = None, from_start: bool = False,
                    stop: threading.Event, on_batch: Callable[[list[bytes]], None], limit: int | None = None,
                    idle_exit_s: float | None = None, pull_timeout_s: float = 2.0, batch: int = 100) -> int:
    """Read `client`'s signals of `mode` from its subscription `<p>.<mode>.signals.<client>.<consumer or
    client>` (created, with its dead-letter topic, if missing) until `stop`, `limit` signals, or
    `idle_exit_s` without a message. Returns the signals handed to `on_batch`.

    `on_batch(lines)` gets each pull's new entries as JSON lines (the message data, docs/streams.md),
    retractions included (`"retracted": true`: the signal is withdrawn); the messages are acked only
    after it returns (if it raises, they are nacked and the error propagates). Per `signal_id` only
    an entry whose `revision` is above the one in effect is handed on: a copy (at least once) or a
    late, older revision is acked and skipped; within one pull only the highest revision of a signal
    is handed on. A message that is not a signal entry is dead-lettered (`undecodable`,
    `wrong_schema`). No more messages are pulled than `limit` leaves, so nothing past it is acked.

    `from_start`: Pub/Sub keeps no history to replay. A subscription holds what was published since it
    was created and is not acked yet (`clients grant` creates the client's, so its backlog starts
    then; Pub/Sub keeps it 7 days). Whatever `from_start` says, that backlog comes first, as an
    existing Redis consumer group resumes; a subscription created by this call starts empty. Nothing
    acked can be read again (Redis' `--from-start` rewinds its group; here `seek` would be needed,
    which the emulator lacks).
    """
    m = cfg.environment.messaging
    names = TopicNames(m.topic_prefix)
    topic = names.signals(mode, client)
    sub = names.subscription(topic, consumer or client)
    if from_start:
        log.info("pubsub %s: reading its backlog (what it holds unacked since it was created)", sub)
    reader = Pull(m.project, sub)
    held: OrderedDict[str, int] = OrderedDict()  # signal_id -> revision in effect
    done, last = 0, time.monotonic()
    try:
        while not stop.is_set() and (limit is None or done < limit):
            want = batch if limit is None else max(1, min(batch, limit - done))
            try:
                got = reader.pull_raw(want, pull_timeout_s)
            except _not_found() as exc:
                log.info("pubsub %s does not exist (%s): creating it; it holds what is published from now on",
                         sub, exc.message)
                _ensure_consumer(m, topic, sub)
                continue
            if not got:
                if idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
                continue
            last = time.monotonic()
            lines: list[bytes | None] = []
            where: dict[str, int] = {}
            prior: dict[str, int | None] = {}  # what `held` said before this pull, restored if on_batch fails
            settled = []
            for received in got:
                message = received.message
                try:
                    record = json.loads(message.data)
                    if not isinstance(record, dict) or not isinstance(record.get("signal_id"), str):
                        raise ValueError("not a signal entry (a JSON object with a signal_id)")
                    revision = int(record.get("revision", 0))
                except (ValueError, TypeError) as exc:
                    reader.dead_letter(received.ack_id, "undecodable", str(exc))
                    continue
                if message.attributes.get("v") != SCHEMA_VERSION:
                    reader.dead_letter(received.ack_id, "wrong_schema", f"v={message.attributes.get('v')!r}")
                    continue
                settled.append(received.ack_id)
                sid = record["signal_id"]
                if revision <= held.get(sid, -1):
                    continue
                prior.setdefault(sid, held.get(sid))
                held[sid] = revision
                held.move_to_end(sid)
                if len(held) > 100_000:  # bounded: a copy older than that is not redelivered in practice
                    held.popitem(last=False)
                if sid in where:
                    lines[where[sid]] = None  # an older revision of the same pull: only the newest goes on
                where[sid] = len(lines)
                lines.append(bytes(message.data))
            out = [line for line in lines if line is not None]
            if out:
                try:
                    on_batch(out)
                except BaseException:
                    for sid, revision in prior.items():  # not handled: the redelivered copies must not be skipped
                        if revision is None:
                            held.pop(sid, None)
                        else:
                            held[sid] = revision
                    reader.nack(settled)
                    raise
            reader.ack(settled)
            done += len(out)
    finally:
        reader.close()
    return done


def _not_found():
    from google.api_core.exceptions import NotFound

    return NotFound


def _ensure_consumer(m: PubSubMessagingConfig, topic: str, subscription: str) -> None:
    pubsub_v1 = pubsub_module()
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    try:
        _admin(ensure_subscription, publisher, subscriber, m.project, topic, subscription,
               ack_deadline_s=m.ack_deadline_s, max_delivery_attempts=m.max_delivery_attempts)
    finally:
        subscriber.close()
        publisher.transport.close()


# ---------------------------------------------------------------- IAM


def service_account(project: str, prefix: str, client: str) -> str:
    """The member a client authenticates as: `serviceAccount:<prefix>-<client>@<project>...` (an
    account id is 6-30 characters of a-z, 0-9 and -: ValueError for a client id that cannot make one,
    rather than a silent rename that could make two clients one)."""
    account = f"{prefix}-{client}"
    if not re.match(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$", account):
        raise ValueError(f"{account!r} is not a valid service account id: pass `member` to iam_bindings")
    return f"serviceAccount:{account}@{project}.iam.gserviceaccount.com"


def iam_bindings(cfg: RunConfig, client: str, member: str | None = None) -> dict:
    """The IAM grants of one client, as a document: roles/pubsub.subscriber on its own subscriptions
    (`TopicNames.client_subscriptions`) and roles/bigquery.dataViewer on its own dataset
    `<dataset_prefix>_<client>`, nothing else. Each resource carries its `policy` (the file
    `gcloud pubsub subscriptions set-iam-policy` / `bq set-iam-policy` take — it replaces the
    resource's policy) and the additive command that grants the same binding.
    """
    m, storage = cfg.environment.messaging, cfg.environment.storage
    if m.type != "pubsub" or storage.type != "bigquery":
        raise ValueError("iam_bindings needs messaging.type pubsub and storage.type bigquery (cloud-dev)")
    member = member or service_account(m.project, m.topic_prefix, _part("client", client))
    resources = []
    for sub in TopicNames(m.topic_prefix).client_subscriptions(client):
        role = "roles/pubsub.subscriber"
        resources.append({"type": "pubsub.subscription", "name": subscription_path(m.project, sub),
                          "policy": {"bindings": [{"role": role, "members": [member]}]},
                          "command": ["gcloud", "pubsub", "subscriptions", "add-iam-policy-binding", sub,
                                      f"--project={m.project}", f"--member={member}", f"--role={role}"]})
    dataset, role = f"{storage.dataset_prefix}_{client}", "roles/bigquery.dataViewer"
    resources.append({"type": "bigquery.dataset", "name": f"projects/{storage.project}/datasets/{dataset}",
                      "policy": {"bindings": [{"role": role, "members": [member]}]},
                      "command": ["bq", "add-iam-policy-binding", f"--member={member}", f"--role={role}",
                                  f"{storage.project}:{dataset}"]})
    return {"client": client, "member": member, "resources": resources}
