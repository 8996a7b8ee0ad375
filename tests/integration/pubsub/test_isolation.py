"""Tenancy: names, the IAM document, and an audit subscription on every topic proving no message
crosses clients or modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signalgen.brokers.pubsub import (Publisher, TopicNames, ensure_client, iam_bindings, record_message)
from signalgen.config.models import Mode
from signalgen.brokers.codec import signal_entries
from tests.integration.pubsub.helpers import Admin, Collector, signal_messages, signals
from tests.polling import wait_for

pytestmark = pytest.mark.integration
CLIENTS = ("christian", "ikenna", "odum")
MODES = [m.value for m in Mode]


def test_names_follow_the_layout_and_refuse_unsafe_parts():
    n = TopicNames("signalgen")
    assert n.signals("live", "odum") == "signalgen.live.signals.odum"
    assert n.rejections("mock", "odum") == "signalgen.mock.rejections.odum"
    assert n.internal("live", "bar_rejections", "odum") == "signalgen.live.internal.bar_rejections.odum"
    assert n.bars("BRK.B", "5m") == "signalgen.bars.BRK.B.5m"
    assert n.subscription(n.signals("live", "odum"), "odum") == "signalgen.live.signals.odum.odum"
    assert n.deadletter("signalgen.live.signals.odum.odum") == "signalgen.live.signals.odum.odum.deadletter"
    for bad in (lambda: n.signals("live", "Odum"), lambda: n.signals("live", "od.um"),
                lambda: n.signals("live", "a*"), lambda: n.signals("paper", "odum"),
                lambda: n.internal("live", "bars", "odum"), lambda: n.bars("btc", "5m"),
                lambda: n.bars("BTC", "5x"), lambda: n.subscription("other.live.signals.odum", "odum"),
                lambda: n.subscription(n.signals("live", "odum"), "a.b"), lambda: TopicNames("Signal"),
                lambda: TopicNames("goog").signals("live", "odum"), lambda: TopicNames("1abc").signals("live", "x")):
        with pytest.raises(ValueError):
            bad()
    long = TopicNames("p" * 63)
    with pytest.raises(ValueError, match="3-255"):  # every part safe, the whole too long
        long.deadletter(long.subscription(long.internal("historical", "bar_rejections", "c" * 63), "x" * 63)
                        + "." + "z" * 50)


def test_the_iam_document_names_only_the_clients_own_resources(cloud_cfg, tmp_path: Path):
    prefix = cloud_cfg.environment.messaging.topic_prefix
    doc = iam_bindings(cloud_cfg, "odum")
    json.loads(json.dumps(doc))  # a JSON document
    assert doc["member"] == f"serviceAccount:{prefix}-odum@signalgen-dev.iam.gserviceaccount.com"
    subs = [r for r in doc["resources"] if r["type"] == "pubsub.subscription"]
    datasets = [r for r in doc["resources"] if r["type"] == "bigquery.dataset"]
    want = {f"projects/signalgen-dev/subscriptions/{prefix}.{m}.{k}.odum.odum{dl}" for m in MODES
            for k in ("signals", "rejections") for dl in ("", ".deadletter")}
    assert {r["name"] for r in subs} == want
    assert [r["name"] for r in datasets] == ["projects/signalgen-dev/datasets/signalgen_odum"]
    roles = {r["type"]: {b["role"] for b in r["policy"]["bindings"]} for r in doc["resources"]}
    assert roles == {"pubsub.subscription": {"roles/pubsub.subscriber"}, "bigquery.dataset": {"roles/bigquery.dataViewer"}}
    text = json.dumps(doc)
    for other in ("christian", "ikenna", "internal", "bars"):
        assert other not in text
    assert all(b["members"] == [doc["member"]] for r in doc["resources"] for b in r["policy"]["bindings"])
    assert subs[0]["command"][:4] == ["gcloud", "pubsub", "subscriptions", "add-iam-policy-binding"]


def test_no_message_crosses_clients_or_modes(emulator_host, cloud_cfg):
    m = cloud_cfg.environment.messaging
    names, admin = TopicNames(m.topic_prefix), Admin()
    for client in CLIENTS:
        assert ensure_client(m, client) == ensure_client(m, client)  # idempotent
    topics = [t for c in CLIENTS for mode in MODES for t in names.internal_topics(mode, c) + names.client_topics(mode, c)]
    audits = {t: Collector(admin.subscriber, admin.subscribe(t, "audit", names)) for t in topics}
    sent = 0
    for client in CLIENTS:
        for mode in MODES:
            publisher = Publisher(m.project, names, mode, client)
            for message in signal_messages(client, "s1", "BTCUSD", 3, mode=mode):  # as a worker
                publisher.publish(names.internal(mode, "signals", client), message)
            for entry in signal_entries(signals(client, "s1", "ETHUSD", 2, mode=mode)):  # as the decision host
                publisher.publish(names.signals(mode, client), record_message("signals", entry))
            publisher.close()
            sent += 5
    wait_for(lambda: sum(len({r[1]["signal_id"] for r in a.received}) for a in audits.values()) >= sent, 60,
             f"{sent} messages")
    for topic, audit in audits.items():
        audit.stop()
        parts = topic.split(".")
        mode, client = parts[1], parts[-1]
        for data, attributes, key, _ in audit.received:
            record = json.loads(data)
            assert (attributes["client_id"], attributes["mode"]) == (client, mode), topic
            assert (record["client_id"], record["mode"]) == (client, mode), topic
            assert key.startswith(client + ".")
    counts = {t: len(a.received) for t, a in audits.items() if a.received}
    assert len(counts) == len(CLIENTS) * len(MODES) * 2  # each client's internal and client signal topics
    admin.close()
