"""Helpers of the Pub/Sub tests: records, admin clients, a plain collector of what a subscription holds."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import polars as pl

from signalgen.brokers.pubsub import (Message, TopicNames, ensure_subscription, pubsub_module, record_message,
                                      subscription_path)
from signalgen.brokers.codec import record_entries
from signalgen.signals.types import SIGNAL_SCHEMA
from tests.integration.pubsub.servers import PROJECT

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def signals(client: str, strategy: str, symbol: str, n: int, mode: str = "live", start: int = 0,
            timeframe: str = "5m") -> pl.DataFrame:
    """`n` signals (SIGNAL_SCHEMA) of one worker on consecutive 5-minute bars from bar `start`."""
    times = [T0 + timedelta(minutes=5 * (start + i)) for i in range(n)]
    return pl.DataFrame({
        "signal_id": [f"{client}-{strategy}-{symbol}-{mode}-{start + i}" for i in range(n)],
        "client_id": client, "strategy_id": strategy, "symbol": symbol, "timeframe": timeframe,
        "bar_time": times, "generated_at": times, "direction": [1] * n, "confidence": [0.7] * n,
        "magnitude": [0.001] * n, "strength": [0.4] * n, "weight": [0.1] * n, "period": [12] * n,
        "models": [[{"model_id": "m", "version": "v1", "output": 0.7}]] * n, "mode": mode, "run_id": "r",
        "latency_us": [10] * n,
    }, schema=SIGNAL_SCHEMA)


def signal_messages(client: str, strategy: str, symbol: str, n: int, **kw) -> list[Message]:
    return [record_message("signals", e, "internal")
            for e in record_entries(signals(client, strategy, symbol, n, **kw), "signal_id")]


class Admin:
    """Plain library clients for setting up and reading (created after PUBSUB_EMULATOR_HOST is set)."""

    def __init__(self) -> None:
        pubsub_v1 = pubsub_module()
        self.publisher, self.subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()

    def subscribe(self, topic: str, consumer: str = "test", names: TopicNames | None = None) -> str:
        sub = (names or TopicNames(topic.split(".", 1)[0])).subscription(topic, consumer)
        ensure_subscription(self.publisher, self.subscriber, PROJECT, topic, sub)
        return sub

    def close(self) -> None:
        self.subscriber.close()
        self.publisher.transport.close()


class Collector:
    """Streaming pull on `subscription` with the library alone, acking everything at once: what a
    subscription receives, in arrival order (data, attributes, ordering key, receive time)."""

    def __init__(self, subscriber, subscription: str) -> None:
        self.received: list[tuple[bytes, dict, str, float]] = []
        self._lock = threading.Lock()
        self.future = subscriber.subscribe(subscription_path(PROJECT, subscription), self._on)

    def _on(self, message) -> None:
        with self._lock:
            self.received.append((message.data, dict(message.attributes), message.ordering_key, time.monotonic()))
        message.ack()

    def __len__(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        self.future.cancel()
        try:
            self.future.result(timeout=10)
        except Exception:
            pass
