"""consume_signals on the real emulator: dedupe by (signal_id, revision), the highest revision in
effect, retractions handed on, acks after on_batch, limit, idle exit, a missing subscription, poison."""

from __future__ import annotations

import json
import threading
import time

import polars as pl
import pytest

from signalgen.brokers.codec import signal_entries
from signalgen.brokers.pubsub import Publisher, TopicNames, consume_signals, deadletter, record_message
from signalgen.signals.types import stream_rows
from tests.integration.pubsub.helpers import Admin, Collector, signals
from tests.integration.pubsub.servers import PROJECT
from tests.polling import wait_for

pytestmark = pytest.mark.integration


def entries(frame: pl.DataFrame, revision: int = 0, retracted: bool = False) -> list[dict]:
    rows = stream_rows(frame).with_columns(pl.lit(revision, pl.Int32).alias("revision"),
                                           pl.lit(retracted).alias("retracted"))
    return signal_entries(rows)


def publish(cfg, client: str, batch: list[dict]) -> None:
    names = TopicNames(cfg.environment.messaging.topic_prefix)
    publisher = Publisher(PROJECT, names, "live", client)
    for entry in batch:
        publisher.publish(names.signals("live", client), record_message("signals", entry))
    publisher.close()


def consume(cfg, client: str = "odum", **kw) -> tuple[int, list[dict]]:
    got: list[dict] = []
    kw.setdefault("idle_exit_s", 3)
    n = consume_signals(cfg, client, "live", stop=threading.Event(),
                        on_batch=lambda lines: got.extend(json.loads(line) for line in lines), **kw)
    return n, got


@pytest.fixture
def subscribed(emulator_host, cloud_cfg):
    """odum's subscription on its live signals, as `clients grant` makes it (before anything is published)."""
    names, admin = TopicNames(cloud_cfg.environment.messaging.topic_prefix), Admin()
    sub = admin.subscribe(names.signals("live", "odum"), "odum", names)
    yield sub
    admin.close()


def test_copies_are_skipped_the_newest_revision_wins_and_retractions_are_handed_on(subscribed, cloud_cfg):
    bars = signals("odum", "momentum_v1", "BTCUSD", 3)  # one worker: one ordering key, delivered in this order
    s0, s1, s2 = (bars.slice(i, 1) for i in range(3))
    publish(cloud_cfg, "odum", entries(bars) + entries(s0)            # s0 again: a copy
            + entries(s1, 1) + entries(s2, 1, retracted=True)         # s1 revised, s2 withdrawn
            + entries(s1) + entries(s1, 1))                           # late: an older revision, a copy
    n, got = consume(cloud_cfg)
    assert n == len(got)
    seen = [(g["signal_id"], g["revision"]) for g in got]
    assert len(seen) == len(set(seen))  # no copy handed on twice
    effect: dict[str, dict] = {}
    for g in got:  # what a consumer holds after each batch: revisions only ever go up
        assert g["revision"] > effect.get(g["signal_id"], {"revision": -1})["revision"], seen
        effect[g["signal_id"]] = g
    ids = bars["signal_id"].to_list()
    assert {sid: (g["revision"], g["retracted"]) for sid, g in effect.items()} == \
        {ids[0]: (0, False), ids[1]: (1, False), ids[2]: (1, True)}
    assert consume(cloud_cfg, idle_exit_s=2) == (0, [])  # everything was acked


def test_limit_acks_nothing_past_it_and_the_next_consumer_goes_on(subscribed, cloud_cfg):
    frame = signals("odum", "momentum_v1", "BTCUSD", 10)
    publish(cloud_cfg, "odum", entries(frame))
    n, got = consume(cloud_cfg, limit=4)
    assert n == 4 and [g["signal_id"] for g in got] == frame["signal_id"].to_list()[:4]
    n, got = consume(cloud_cfg)
    assert n == 6 and [g["signal_id"] for g in got] == frame["signal_id"].to_list()[4:]


def test_a_failing_on_batch_leaves_its_signals_for_the_next_read(subscribed, cloud_cfg):
    frame = signals("odum", "momentum_v1", "BTCUSD", 3)
    publish(cloud_cfg, "odum", entries(frame))

    def fail(lines):
        raise RuntimeError("the OMS is down")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="OMS is down"):
        consume_signals(cloud_cfg, "odum", "live", stop=threading.Event(), on_batch=fail, idle_exit_s=5)
    n, got = consume(cloud_cfg)  # nacked: at once, not after the 60 s ack deadline
    assert n == 3 and [g["signal_id"] for g in got] == frame["signal_id"].to_list()
    assert time.monotonic() - started < 30


def test_idle_exit_and_a_missing_subscription_is_created(emulator_host, cloud_cfg):
    started = time.monotonic()
    assert consume(cloud_cfg, consumer="ops", idle_exit_s=1) == (0, [])  # `<topic>.ops` did not exist
    assert time.monotonic() - started < 15
    names = TopicNames(cloud_cfg.environment.messaging.topic_prefix)
    admin = Admin()
    sub = names.subscription(names.signals("live", "odum"), "ops")
    subs = {s.name.rsplit("/", 1)[1]: s for s in admin.subscriber.list_subscriptions(request={"project": f"projects/{PROJECT}"})}
    assert sub in subs and deadletter(sub) in subs
    assert subs[sub].enable_message_ordering and subs[sub].dead_letter_policy.max_delivery_attempts >= 5
    publish(cloud_cfg, "odum", entries(signals("odum", "momentum_v1", "BTCUSD", 2)))  # from now on it holds them
    assert consume(cloud_cfg, consumer="ops", limit=2)[0] == 2
    admin.close()


def test_stop_ends_consuming(subscribed, cloud_cfg):
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.monotonic()
    assert consume_signals(cloud_cfg, "odum", "live", stop=stop, on_batch=lambda lines: None) == 0
    assert time.monotonic() - started < 10


def test_poison_is_dead_lettered_with_its_reason_not_handed_on(subscribed, cloud_cfg):
    names, admin = TopicNames(cloud_cfg.environment.messaging.topic_prefix), Admin()
    letters = Collector(admin.subscriber, deadletter(subscribed))
    topic = admin.publisher.topic_path(PROJECT, names.signals("live", "odum"))
    [good] = entries(signals("odum", "momentum_v1", "BTCUSD", 1))
    admin.publisher.publish(topic, b"{not json", v="1").result()
    admin.publisher.publish(topic, good["data"].encode() if isinstance(good["data"], str) else good["data"],
                            v="2").result()
    publish(cloud_cfg, "odum", [good])
    n, got = consume(cloud_cfg)
    assert n == 1 and got[0]["signal_id"] == good["id"]
    wait_for(lambda: len(letters) >= 2, 30, "2 dead letters")
    letters.stop()
    assert sorted(a["reason"] for _, a, _, _ in letters.received) == ["undecodable", "wrong_schema"]
    admin.close()
