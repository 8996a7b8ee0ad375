"""The subscriber on the real emulator: explicit acks, dedupe by id and revision, dead letters with
our reason, a watchdog that restarts a silenced pull; and the admin's subscriptions."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest

from signalgen.brokers.pubsub import (Message, Publisher, Subscriber, TopicNames, deadletter, ensure_subscription,
                                      record_message, subscription_path)
from signalgen.brokers.codec import signal_entries
from signalgen.signals.types import stream_rows
from tests.integration.pubsub.helpers import Admin, Collector, signal_messages, signals
from tests.integration.pubsub.servers import PROJECT
from tests.polling import wait_for

pytestmark = pytest.mark.integration


class Handled:
    """A handler that records what it was given and acks it (or raises, while `fail` is set)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, received) -> None:
        with self._lock:
            self.calls.append(received)
        if self.fail:
            raise RuntimeError("cannot store this")
        received.ack()

    def keys(self) -> list:
        with self._lock:
            return [r.key for r in self.calls]


def client_messages(revision: int, n: int = 2) -> list[Message]:
    """Signals as the decision host sends them to a client: STREAM_SCHEMA, with a revision."""
    rows = stream_rows(signals("odum", "momentum_v1", "BTCUSD", n)).with_columns(pl.lit(revision, pl.Int32)
                                                                                   .alias("revision"))
    return [record_message("signals", e) for e in signal_entries(rows)]


def test_a_copy_is_acked_unhandled_and_a_new_revision_is_handled(emulator_host, prefix):
    names, admin = TopicNames(prefix), Admin()
    topic = names.signals("live", "odum")
    sub = admin.subscribe(topic, "odum", names)
    handled = Handled()
    subscriber = Subscriber(PROJECT, sub, handled).start()
    publisher = Publisher(PROJECT, names, "live", "odum")
    first, second = client_messages(0)
    for m in (first, second):
        publisher.publish(topic, m)
    publisher.confirm()
    wait_for(lambda: len(handled.calls) == 2, 30, "2 handled")
    publisher.publish(topic, first)  # a copy (a retried publish, a re-sent batch): same id, same revision
    publisher.publish(topic, client_messages(1)[0])  # the same signal revised
    publisher.confirm()
    wait_for(lambda: len(handled.calls) == 3 and subscriber.stats.duplicates == 1, 30, "the revision and the copy")
    sid = first.attributes["signal_id"]
    assert handled.keys() == [(sid, "0"), (second.attributes["signal_id"], "0"), (sid, "1")]
    assert handled.calls[0].record["signal_id"] == sid and handled.calls[0].data == first.data
    assert handled.calls[2].attributes["revision"] == "1"
    subscriber.stop()
    publisher.close()
    admin.close()


def test_a_worker_key_waits_for_the_ack_a_nacked_message_comes_back_an_acked_one_does_not(emulator_host, prefix):
    names, admin = TopicNames(prefix), Admin()
    topic = names.signals("live", "odum")
    sub = names.subscription(topic, "odum")
    ensure_subscription(admin.publisher, admin.subscriber, PROJECT, topic, sub, ack_deadline_s=10)
    held: list = []
    subscriber = Subscriber(PROJECT, sub, held.append).start()  # acks nothing by itself
    publisher = Publisher(PROJECT, names, "live", "odum")
    first, second = client_messages(0)
    for m in (first, second):
        publisher.publish(topic, m)
    publisher.confirm()
    wait_for(lambda: len(held) == 1, 30, "the first message")
    time.sleep(2)
    assert len(held) == 1, "the next message of an ordering key came before the previous one was settled"
    held[0].nack()
    # the nacked message comes back; the emulator may deliver the next one of the key first
    # (real Pub/Sub redelivers in order after a nack)
    wait_for(lambda: len(held) >= 2, 30, "another delivery")
    if held[1].key != held[0].key:
        held[1].ack()
    wait_for(lambda: len(held) >= 3, 30, "the nacked message again and the second")
    again = next(r for r in held[1:] if r.key == held[0].key)
    assert again.delivery_attempt == 2
    assert {r.attributes["signal_id"] for r in held[1:]} == {first.attributes["signal_id"], second.attributes["signal_id"]}
    for r in held[1:]:
        if r is not held[1] or held[1].key == held[0].key:
            r.ack()
    time.sleep(12)  # past the ack deadline: nothing acked comes back
    assert len(held) == 3 and subscriber.stats.duplicates == 0
    subscriber.stop()
    publisher.close()
    admin.close()


def test_a_message_whose_handling_fails_five_times_lands_on_the_dead_letter_topic_with_our_reason(emulator_host,
                                                                                                   prefix):
    names, admin = TopicNames(prefix), Admin()
    topic = names.internal("live", "signals", "odum")
    sub = names.subscription(topic, "recorder")
    ensure_subscription(admin.publisher, admin.subscriber, PROJECT, topic, sub, ack_deadline_s=10,
                        max_delivery_attempts=5)
    dead = Collector(admin.subscriber, deadletter(sub))
    failing = Handled(fail=True)
    subscriber = Subscriber(PROJECT, sub, failing, max_delivery_attempts=5).start()
    publisher = Publisher(PROJECT, names, "live", "odum")
    [message] = signal_messages("odum", "momentum_v1", "BTCUSD", 1)
    publisher.publish(topic, message)
    poison = Message(b'{"signal_id": "x"}', {**message.attributes, "v": "2", "signal_id": "x"}, message.ordering_key)
    publisher.publish(topic, poison)
    publisher.confirm()
    wait_for(lambda: len(dead) == 2, 60, "2 dead letters")
    time.sleep(1)
    subscriber.stop()
    dead.stop()
    assert [r.delivery_attempt for r in failing.calls] == [1, 2, 3, 4, 5]  # the poison never reached it
    letters = {r[1]["signal_id"]: r for r in dead.received}
    data, attributes, _, _ = letters[message.attributes["signal_id"]]
    assert data == message.data
    assert attributes["reason"] == "handler_failed" and "cannot store this" in attributes["detail"]
    assert attributes["delivery_attempt"] == "5" and attributes["subscription"] == sub
    assert {k: attributes[k] for k in message.attributes} == message.attributes
    assert letters["x"][1]["reason"] == "wrong_schema" and letters["x"][1]["detail"] == "v='2'"
    assert subscriber.stats.dead_lettered == 2
    admin.close()
    publisher.close()


def test_the_watchdog_restarts_a_silenced_pull(emulator, proxy, prefix, monkeypatch):
    names = TopicNames(prefix)
    topic = names.signals("live", "odum")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)  # setup and publishing are not silenced
    admin = Admin()
    sub = names.subscription(topic, "odum")
    ensure_subscription(admin.publisher, admin.subscriber, PROJECT, topic, sub, ack_deadline_s=10)
    publisher = Publisher(PROJECT, names, "live", "odum")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.host)
    handled = Handled()
    subscriber = Subscriber(PROJECT, sub, handled, watchdog_s=3).start()
    first, second = client_messages(0)
    publisher.publish(topic, first)
    publisher.confirm()
    wait_for(lambda: len(handled.calls) == 1, 30, "the first message")
    connections = len(proxy._conns)
    proxy.freeze()  # the pull's connection stays open and says nothing, as a dead link does
    silenced = time.monotonic()
    publisher.publish(topic, second)  # pushed into the silent stream
    publisher.confirm()
    wait_for(lambda: subscriber.stats.restarts >= 1, 30, "a restart")
    restarted = time.monotonic() - silenced
    assert len(handled.calls) == 1 and "nothing received" in subscriber.stats.last_restart_reason
    wait_for(lambda: len(proxy._conns) > connections, 10, "the restarted pull on a connection of its own")
    # Not asserted: that the emulator then delivers on the new pull. Observed here: it never redelivers
    # the message it pushed into the silent stream (75 s, past every deadline), and later messages
    # reach the new pull in some runs only, even once the dead connection is closed.
    print(f"\nWATCHDOG: silenced pull restarted after {restarted:.1f} s (watchdog 3 s) on a new connection")
    subscriber.stop()
    publisher.close()
    admin.close()


def test_the_watchdog_restarts_a_pull_that_ended(emulator_host, prefix):
    names, admin = TopicNames(prefix), Admin()
    topic = names.signals("live", "odum")
    sub = admin.subscribe(topic, "odum", names)
    handled = Handled()
    subscriber = Subscriber(PROJECT, sub, handled, watchdog_s=3, expect=lambda: False).start()
    admin.subscriber.delete_subscription(subscription=subscription_path(PROJECT, sub))
    wait_for(lambda: subscriber.stats.restarts >= 1, 60, "a restart")
    assert "ended" in subscriber.stats.last_restart_reason
    admin.subscribe(topic, "odum", names)
    publisher = Publisher(PROJECT, names, "live", "odum")
    publisher.publish(topic, client_messages(0, 1)[0])
    publisher.confirm()
    wait_for(lambda: len(handled.calls) == 1, 60, "a message on the recreated subscription")
    subscriber.stop()
    publisher.close()
    admin.close()


def test_ensure_is_idempotent_and_sets_ordering_dead_letters_and_deadline(emulator_host, prefix):
    names, admin = TopicNames(prefix), Admin()
    topic = names.internal("live", "signals", "odum")
    sub = names.subscription(topic, "recorder")
    for _ in range(2):
        ensure_subscription(admin.publisher, admin.subscriber, PROJECT, topic, sub, ack_deadline_s=30,
                            max_delivery_attempts=7)
    got = admin.subscriber.get_subscription(subscription=subscription_path(PROJECT, sub))
    assert got.enable_message_ordering and got.ack_deadline_seconds == 30
    assert got.dead_letter_policy.max_delivery_attempts == 7
    assert got.dead_letter_policy.dead_letter_topic == f"projects/{PROJECT}/topics/{deadletter(sub)}"
    dead = admin.subscriber.get_subscription(subscription=subscription_path(PROJECT, deadletter(sub)))
    assert dead.topic == got.dead_letter_policy.dead_letter_topic
    with pytest.raises(ValueError, match="minimum of 5"):
        ensure_subscription(admin.publisher, admin.subscriber, PROJECT, topic, sub, max_delivery_attempts=4)
    admin.close()
