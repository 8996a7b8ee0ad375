"""Figures, printed (run with -s): publish -> streaming-pull latency through our Publisher and
Subscriber beside the emulator's own floor (the library alone), and the private memory (USS) of a
process with a publisher and a subscriber."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from signalgen.brokers.pubsub import Publisher, Subscriber, TopicNames, pubsub_module, topic_path
from tests.integration.pubsub.helpers import Admin, signal_messages
from tests.integration.pubsub.servers import PROJECT
from tests.polling import wait_for

pytestmark = pytest.mark.integration
N = 1000


def percentiles(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    return f"p50 {ms[len(ms) // 2]:.1f} ms, p99 {ms[int(len(ms) * 0.99)]:.1f} ms, max {ms[-1]:.1f} ms"


def test_latency_beside_the_emulators_floor(emulator_host, prefix):
    names, admin = TopicNames(prefix), Admin()
    ours_topic, raw_topic = names.internal("live", "signals", "odum"), names.internal("live", "rejections", "odum")
    ours_sub, raw_sub = admin.subscribe(ours_topic, "recorder", names), admin.subscribe(raw_topic, "recorder", names)
    # 50 workers (ordering keys), 20 bars each, interleaved: each key gets a message every ~100 ms.
    # (One key alone saturates at ~110 messages/s on the emulator, the library's ordered publisher
    # alone as well: one batch in flight per key; a live worker publishes one decision per bar.)
    per_worker = [signal_messages("odum", "momentum_v1", f"S{w}", N // 50) for w in range(50)]
    messages = [per_worker[w][i] for i in range(N // 50) for w in range(50)]
    sent: dict[str, float] = {}
    got: dict[str, float] = {}

    def receive(received):
        got[received.attributes["signal_id"]] = time.perf_counter()
        received.ack()

    # the floor: the library's publisher and streaming pull, no wrapper, no ordering key
    pubsub_v1 = pubsub_module()
    raw_publisher = pubsub_v1.PublisherClient()
    raw_got: dict[str, float] = {}

    def raw_receive(message):
        raw_got[message.attributes["signal_id"]] = time.perf_counter()
        message.ack()

    future = admin.subscriber.subscribe(f"projects/{PROJECT}/subscriptions/{raw_sub}", raw_receive)
    raw_sent = {}
    for m in messages:
        raw_sent[m.attributes["signal_id"]] = time.perf_counter()
        raw_publisher.publish(topic_path(PROJECT, raw_topic), m.data, **m.attributes)
        time.sleep(0.002)
    wait_for(lambda: len(raw_got) >= N, 120, f"{N} raw messages")
    future.cancel()

    subscriber = Subscriber(PROJECT, ours_sub, receive).start()
    publisher = Publisher(PROJECT, names, "live", "odum")
    for m in messages:
        sent[m.attributes["signal_id"]] = time.perf_counter()
        publisher.publish(ours_topic, m)
        time.sleep(0.002)
    publisher.confirm()
    wait_for(lambda: len(got) >= N, 120, f"{N} messages")
    subscriber.stop()
    publisher.close()
    print(f"\nLATENCY ({N} messages, one every ~2 ms, 50 ordering keys):"
          f"\n  floor (library publisher -> library streaming pull, no ordering): "
          f"{percentiles([raw_got[i] - raw_sent[i] for i in raw_sent])}"
          f"\n  ours (Publisher, ordering key -> Subscriber, ordered subscription, dedupe): "
          f"{percentiles([got[i] - sent[i] for i in sent])}")
    admin.close()


USS_SCRIPT = """
import json, os, sys, psutil
def uss(): return psutil.Process().memory_full_info().uss / 2**20
out = {"python": uss()}
from google.cloud import pubsub_v1
out["import pubsub_v1"] = uss()
from signalgen.brokers.pubsub import Publisher, Subscriber, TopicNames
out["import signalgen.brokers.pubsub"] = uss()
names = TopicNames(sys.argv[1])
p = Publisher("signalgen-dev", names, "live", "odum")
s = Subscriber("signalgen-dev", sys.argv[2], lambda r: r.ack()).start()
import time; time.sleep(1)
out["publisher + subscriber"] = uss()
s.stop(); p.close()
print(json.dumps(out))
"""


def test_private_memory_of_a_publisher_and_a_subscriber(emulator_host, prefix):
    psutil = pytest.importorskip("psutil")
    assert psutil
    names, admin = TopicNames(prefix), Admin()
    sub = admin.subscribe(names.signals("live", "odum"), "odum", names)
    admin.close()
    out = subprocess.run([sys.executable, "-c", USS_SCRIPT, prefix, sub], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print("\nUSS (MB, a fresh process): " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    assert figures["publisher + subscriber"] < 300
