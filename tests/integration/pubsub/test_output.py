"""PubSubOutput on the real emulator: what a batch run's signals look like on the client's topic,
confirmation before flush returns, isolation, and an unreachable Pub/Sub."""

from __future__ import annotations

import json

import polars as pl
import pytest

from signalgen.brokers.codec import signal_entries
from signalgen.brokers.pubsub import TopicNames
from signalgen.errors import TransientError
from signalgen.outputs import build_output, output_class
from signalgen.outputs.base import Output
from signalgen.outputs.pubsub import PubSubOutput
from signalgen.signals.types import stream_rows
from tests.integration.pubsub.helpers import Admin, Collector, signals
from tests.polling import wait_for

pytestmark = pytest.mark.integration


def revised(frame: pl.DataFrame, revision: int, retracted: bool = False) -> pl.DataFrame:
    return stream_rows(frame).with_columns(pl.lit(revision, pl.Int32).alias("revision"),
                                           pl.lit(retracted).alias("retracted"))


def test_signals_reach_the_clients_topic_confirmed_with_their_revisions(emulator_host, cloud_cfg):
    assert output_class("pubsub") is PubSubOutput
    out = build_output(cloud_cfg, "odum", "internal")  # messaging.type pubsub -> this output
    assert isinstance(out, PubSubOutput) and isinstance(out, Output)
    out.open()  # creates the topic and odum's own subscription on it
    names, admin = TopicNames(cloud_cfg.environment.messaging.topic_prefix), Admin()
    collector = Collector(admin.subscriber, out.subscription)
    assert out.subscription == names.subscription(names.signals("live", "odum"), "odum")
    first = signals("odum", "momentum_v1", "BTCUSD", 3)
    out.write(first)
    out.write(signals("odum", "momentum_v1", "ETHUSD", 2))
    out.flush()
    assert out._publisher.outstanding == 0  # confirmed when flush returned
    out.write(revised(first.head(1), 1, retracted=True))
    out.write(revised(first.slice(1, 1), 2))
    out.flush()
    wait_for(lambda: len(collector) >= 7, 30, "7 messages")
    collector.stop()
    want = signal_entries(pl.concat([stream_rows(first), stream_rows(signals("odum", "momentum_v1", "ETHUSD", 2)),
                                     revised(first.head(1), 1, True), revised(first.slice(1, 1), 2)]))
    got = {(a["signal_id"], a["revision"]): (d, a, k) for d, a, k, _ in collector.received}
    assert len(got) == 7
    for entry in want:
        record = json.loads(entry["data"])
        data, attributes, key = got[(record["signal_id"], str(record["revision"]))]
        assert data == (entry["data"].encode() if isinstance(entry["data"], str) else entry["data"])
        assert attributes == {"v": "1", "signal_id": record["signal_id"], "client_id": "odum",
                              "strategy_id": "momentum_v1", "symbol": record["symbol"], "timeframe": "5m",
                              "mode": "live", "revision": str(record["revision"])}
        assert key == f"odum.momentum_v1.{record['symbol']}.5m"  # the worker id
    btc = [json.loads(d)["revision"] for d, a, k, _ in collector.received if a["symbol"] == "BTCUSD"]
    assert btc.index(1) > btc.index(0) and btc.index(2) > btc.index(0)  # in order per worker
    out.close()
    admin.close()


def test_the_output_refuses_another_clients_or_modes_signals(emulator_host, cloud_cfg):
    out = PubSubOutput.from_config(cloud_cfg, "odum")
    with pytest.raises(ValueError, match="given signals of \\['ikenna'\\]"):
        out.write(signals("ikenna", "swing_high_v1", "BTCUSD", 1))
    with pytest.raises(ValueError, match="live output of client 'odum' was given \\['mock'\\]"):
        out.write(signals("odum", "momentum_v1", "BTCUSD", 1, mode="mock"))
    assert out._pending == []
    with pytest.raises(RuntimeError, match="open"):
        out.flush()


def test_an_unreachable_pubsub_is_a_transient_error_and_the_signals_follow(emulator, proxy, cloud_cfg, monkeypatch):
    out = PubSubOutput(cloud_cfg, "odum", confirm_timeout_s=2)
    out.open()
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)  # the reader is not cut
    admin = Admin()
    collector = Collector(admin.subscriber, out.subscription)
    proxy.cut()
    out.write(signals("odum", "momentum_v1", "BTCUSD", 4))
    with pytest.raises(TransientError, match="not confirmed 4 messages"):
        out.flush()
    proxy.restore()
    out.flush()  # confirms what the failed flush left queued
    wait_for(lambda: len({a["signal_id"] for _, a, _, _ in collector.received}) >= 4, 30, "4 signals")
    collector.stop()
    ids = list(dict.fromkeys(a["signal_id"] for _, a, _, _ in collector.received))
    assert ids == signals("odum", "momentum_v1", "BTCUSD", 4)["signal_id"].to_list()  # in order
    out.close()
    admin.close()


def test_flush_all_confirms_every_clients_output(emulator_host, cloud_cfg):
    outs = [PubSubOutput.from_config(cloud_cfg, c) for c in ("odum", "ikenna")]
    for out in outs:
        out.open()
    admin = Admin()
    collectors = [Collector(admin.subscriber, out.subscription) for out in outs]
    outs[0].write(signals("odum", "momentum_v1", "BTCUSD", 3))
    outs[1].write(signals("ikenna", "swing_high_v1", "BTCUSD", 2))
    assert PubSubOutput.flush_all(outs) == []
    assert [o._publisher.outstanding for o in outs] == [0, 0]
    for collector, n, client in zip(collectors, (3, 2), ("odum", "ikenna")):
        wait_for(lambda: len(collector) >= n, 30, f"{client}'s signals")
        collector.stop()
        assert {a["client_id"] for _, a, _, _ in collector.received} == {client}
    for out in outs:
        out.close()
    admin.close()
