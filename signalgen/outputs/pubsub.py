"""`PubSubOutput`: a batch run's signals of one client and mode to its Pub/Sub topic (cloud-dev).

Names, message body, attributes and ordering: signalgen/brokers/pubsub.py and docs/cloud.md.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Self

import polars as pl

from signalgen.brokers.codec import signal_entries
from signalgen.brokers.pubsub import (ATTEMPT_TIMEOUT_S, Publisher, TopicNames, _admin, ensure_subscription,
                                      pubsub_module, record_message)
from signalgen.errors import TransientError
from signalgen.outputs import client_batch
from signalgen.outputs.base import Output
from signalgen.signals.types import stream_rows

if TYPE_CHECKING:
    from signalgen.config.models import RunConfig


class PubSubOutput(Output):
    """One client's signals of one mode to `<p>.<mode>.signals.<client>` (the `internal` destination of a
    batch run when `messaging.type: pubsub`).

    Each signal is one message: the data is the Redis entry's `data` with the signal's `revision` and
    `retracted` (STREAM_SCHEMA; `signal_entries`), the attributes those of `record_message` (ids,
    `revision`), the ordering key the worker id. `flush()` publishes what was written since the last
    flush and returns only once Pub/Sub confirmed every message; TransientError when it has not within
    `confirm_timeout_s` (Pub/Sub unreachable: the messages stay queued and are retried, in order, and
    the next flush confirms them), StorageError for a permanent refusal. If it raises, nothing may be
    assumed delivered (the writer keeps its checkpoint); a copy delivered twice is deduped by the
    consumer by (signal_id, revision).

    `open()` creates the topic and the client's own subscription on it (`<topic>.<client>`, as
    `clients grant` does) when missing: a topic without a subscription drops what is published to it.
    Isolation: rows of another client or mode are refused (ValueError), and the publisher refuses any
    topic but this client's.
    """

    def __init__(self, cfg: RunConfig, client_id: str, *, confirm_timeout_s: float = ATTEMPT_TIMEOUT_S) -> None:
        self.cfg, self.client_id, self.mode = cfg, client_id, cfg.mode.name.value
        m = cfg.environment.messaging
        self.names = TopicNames(m.topic_prefix)
        self.topic = self.names.signals(self.mode, client_id)
        self.subscription = self.names.subscription(self.topic, client_id)
        self.confirm_timeout_s = confirm_timeout_s
        self._publisher: Publisher | None = None
        self._pending: list[pl.DataFrame] = []

    @classmethod
    def from_config(cls, cfg: RunConfig, client_id: str) -> Self:
        return cls(cfg, client_id)

    def open(self) -> None:
        if self._publisher is not None:
            return
        m = self.cfg.environment.messaging
        pubsub_v1 = pubsub_module()
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        try:
            _admin(ensure_subscription, publisher, subscriber, m.project, self.topic, self.subscription,
                   ack_deadline_s=m.ack_deadline_s, max_delivery_attempts=m.max_delivery_attempts)
        finally:
            subscriber.close()
            publisher.transport.close()
        self._publisher = Publisher.from_config(self.cfg, self.client_id)

    def write(self, batch: pl.DataFrame) -> None:
        batch = client_batch(batch, self.client_id, self.mode)
        if batch.height:
            self._pending.append(stream_rows(batch))

    def flush(self) -> None:
        self._publish()
        self._confirm()

    @classmethod
    def flush_all(cls, outputs: list[PubSubOutput]) -> list[Exception]:
        """Publish every output's signals first, then confirm each: the clients' round trips overlap."""
        errors: list[Exception] = []
        published = []
        for out in outputs:
            try:
                out._publish()
                published.append(out)
            except Exception as exc:  # noqa: BLE001 - one failing output must not block the others
                errors.append(exc)
        for out in published:
            try:
                out._confirm()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        return errors

    def close(self) -> None:
        if self._publisher is None:
            return
        try:
            self.flush()
        finally:  # flush() confirmed what it could; what it could not is dropped (the checkpoint never passed it)
            publisher, self._publisher = self._publisher, None
            publisher.abort()

    # -- internals

    def _publish(self) -> None:
        if self._publisher is None:
            raise RuntimeError(f"{self.topic}: call open() first")
        pending, self._pending = self._pending, []
        if not pending:
            return
        signals = pl.concat(pending).unique("signal_id", keep="last", maintain_order=True)
        publisher, deadline = self._publisher, time.monotonic() + self.confirm_timeout_s
        count = size = 0  # published since the last confirm: at most the publisher's limits, so it never blocks
        for entry in signal_entries(signals):
            message = record_message("signals", entry)
            n = len(message.data) + sum(len(k) + len(v) for k, v in message.attributes.items())
            if count and (count >= publisher.max_messages or size + n > publisher.max_bytes):
                publisher.confirm(max(deadline - time.monotonic(), 0.001))  # TransientError once the time is up
                count = size = 0
            publisher.publish(self.topic, message)
            count, size = count + 1, size + n

    def _confirm(self) -> None:
        if self._publisher is None:
            raise RuntimeError(f"{self.topic}: call open() first")
        try:
            self._publisher.confirm(self.confirm_timeout_s)
        except TransientError as exc:
            raise TransientError(f"Pub/Sub topic {self.topic}: {exc}") from exc
