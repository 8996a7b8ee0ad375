"""Bars on the real emulator: the codec, `publish_bars` (order per series, confirmation, pacing,
refusal of the future) and a live worker's subscription read by `BarPull` (held until acked)."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from signalgen.brokers.pubsub import (BAR_COLUMNS, BarPull, PoisonMessage, bar_message, bar_subscription,
                                      decode_bar, deadletter, ensure_bar_subscription, publish_bars, topic_path)
from signalgen.brokers.codec import encode_bar
from signalgen.data.schema import BAR_SCHEMA
from tests.integration.pubsub.helpers import Admin, Collector
from tests.integration.pubsub.servers import PROJECT
from tests.polling import wait_for

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)


def bars(symbol: str, n: int, *, timeframe: str = "1m", end: datetime | None = None) -> pl.DataFrame:
    """`n` bars of one series (BAR_SCHEMA) ending at `end` (default: the last whole minute), oldest first."""
    step = {"1m": timedelta(minutes=1), "5m": timedelta(minutes=5)}[timeframe]
    end = end or NOW
    times = [end - step * (n - 1 - i) for i in range(n)]
    closes = [100.0 + i + 1 / 3 for i in range(n)]
    return pl.DataFrame({"symbol": symbol, "timeframe": timeframe, "bar_time": times, "open": closes,
                         "high": [c + 1 for c in closes], "low": [c - 1 for c in closes], "close": closes,
                         "volume": [1000.0 + i for i in range(n)]}, schema=BAR_SCHEMA)


@pytest.fixture
def fast_cfg(cloud_cfg):
    """cloud_cfg with a 10 s ack deadline (Pub/Sub's minimum we allow), for redelivery tests."""
    from signalgen.config.loader import load_config

    env = Path(cloud_cfg.root) / "environments" / "cloud-dev.yaml"
    text = env.read_text()
    prefix = cloud_cfg.environment.messaging.topic_prefix
    env.write_text(text.replace(f"  topic_prefix: {prefix}\n", f"  topic_prefix: {prefix}\n  ack_deadline_s: 10\n"))
    cfg = load_config("cloud-dev", "live", root=Path(cloud_cfg.root))
    assert cfg.environment.messaging.ack_deadline_s == 10
    return cfg


def pull_all(reader: BarPull, n: int, timeout: float = 30.0) -> list:
    """Pull (acking each run, as a worker whose decisions are confirmed at once) until `n` bars came."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        run = reader.pull(100, timeout_s=3)
        got += run
        reader.ack([p.ack_id for p in run])
    return got


def test_the_bar_columns_are_bar_schema():
    assert BAR_COLUMNS == tuple(BAR_SCHEMA.names())


def test_a_bar_round_trips_as_the_redis_entry_and_poison_is_named():
    [bar] = bars("BTC-USD.X", 1, timeframe="5m").iter_rows(named=True)
    message = bar_message(bar)
    assert json.loads(message.data) == encode_bar(bar)  # the Redis entry's fields, as one JSON object
    assert message.attributes == {"v": "1", "symbol": "BTC-USD.X", "timeframe": "5m",
                                  "bar_time": bar["bar_time"].strftime("%Y-%m-%dT%H:%M:%S.000000Z")}
    assert message.ordering_key == "BTC-USD.X.5m"
    assert decode_bar(message.data) == bar == decode_bar(message.data, "BTC-USD.X", "5m")
    numbers = json.dumps({**encode_bar(bar), "close": bar["close"], "volume": 7}).encode()  # another publisher's
    assert decode_bar(numbers)["close"] == bar["close"] and decode_bar(numbers)["volume"] == 7.0
    good = encode_bar(bar)
    cases = {
        b"\xff\xfe": "undecodable", b"not json": "undecodable", b"[1, 2]": "undecodable",
        json.dumps({**good, "v": "2"}).encode(): "wrong_schema",
        json.dumps({k: v for k, v in good.items() if k != "close"}).encode(): "wrong_schema",
        json.dumps({**good, "close": "abc"}).encode(): "undecodable",
        json.dumps({**good, "close": True}).encode(): "undecodable",
        json.dumps({**good, "bar_time": "yesterday"}).encode(): "undecodable",
    }
    for data, reason in cases.items():
        with pytest.raises(PoisonMessage) as info:
            decode_bar(data)
        assert info.value.reason == reason, data
        assert isinstance(info.value, ValueError) and reason in str(info.value)
    with pytest.raises(PoisonMessage, match="unknown_symbol: symbol 'BTC-USD.X' on the topic of ETHUSD"):
        decode_bar(message.data, "ETHUSD", "5m")
    with pytest.raises(PoisonMessage, match="wrong_timeframe"):
        decode_bar(message.data, "BTC-USD.X", "1m")


def test_a_workers_subscription_is_named_after_it_or_a_stable_hash():
    assert bar_subscription("sg", "odum.momentum_v1.BTCUSD.5m", "BTCUSD", "5m") == \
        "sg.bars.BTCUSD.5m.odum.momentum_v1.BTCUSD.5m"
    sym, prefix = "S" * 32, "p" * 63  # the longest symbol and prefix the config allows
    long_id = "c" * 63 + "." + "t" * 63 + f".{sym}.5m"  # with them, the name would pass 255 characters
    topic = f"{prefix}.bars.{sym}.5m"
    for worker in (long_id, "odum.momentum v1.BTCUSD.5m", "odum/x"):
        name = bar_subscription(prefix, worker, sym, "5m")
        assert name == bar_subscription(prefix, worker, sym, "5m")  # stable
        assert name.startswith(topic + ".w") and len(name) == len(topic) + 18
        assert len(deadletter(name)) <= 255
    assert bar_subscription(prefix, "odum.x", sym, "5m") == f"{topic}.odum.x"
    assert bar_subscription("sg", "a.b", "X", "5m") != bar_subscription("sg", "a b", "X", "5m")


def test_bars_of_many_series_are_confirmed_and_each_series_arrives_in_order(emulator_host, cloud_cfg):
    series = [("BTCUSD", "1m"), ("ETHUSD", "1m"), ("SOLUSD", "5m")]
    readers = {s: BarPull.for_worker(cloud_cfg, f"odum.momentum_v1.{s[0]}.{s[1]}", *s) for s in series}
    frames = [pl.concat([bars(s, 60, timeframe=tf) for s, tf in series]).sort("bar_time", maintain_order=True)]
    calls = []
    stats = publish_bars(cloud_cfg, frames, speed=0, stop=threading.Event(), max_ahead=timedelta(minutes=5),
                         on_publish=lambda t, n: calls.append((t, n)), window=25)
    assert (stats.published, stats.refused, stats.already_there) == (180, 0, 0)
    assert sum(n for _, n in calls) == 180 and [t for t, _ in calls] == sorted(t for t, _ in calls)
    for (symbol, tf), reader in readers.items():
        got = pull_all(reader, 60)
        assert [p.problem for p in got] == [None] * 60
        assert [p.bar for p in got] == list(bars(symbol, 60, timeframe=tf).iter_rows(named=True))
        assert reader.pull(10, timeout_s=2) == []  # everything acked: nothing comes again
        reader.close()


def test_paced_bars_are_spaced_and_bars_from_the_future_are_refused_at_once(emulator_host, cloud_cfg):
    reader = BarPull.for_worker(cloud_cfg, "odum.momentum_v1.BTCUSD.1m", "BTCUSD", "1m")
    future = BarPull.for_worker(cloud_cfg, "odum.momentum_v1.ETHUSD.1m", "ETHUSD", "1m")
    times = []
    started = time.monotonic()
    stats = publish_bars(cloud_cfg, [bars("BTCUSD", 6), bars("ETHUSD", 3, end=NOW + timedelta(hours=2))],
                         speed=600, stop=threading.Event(), max_ahead=timedelta(0),  # 1 minute of bars: 0.1 s
                         on_publish=lambda t, n: times.append(time.monotonic()))
    elapsed = time.monotonic() - started
    assert (stats.published, stats.refused) == (6, 3)
    assert stats.refused_examples == [f"ETHUSD 1m {(NOW + timedelta(minutes=m)).strftime('%Y-%m-%dT%H:%M:%S.000000Z')}"
                                      for m in (118, 119, 120)]
    assert 0.5 <= elapsed < 10, elapsed  # 5 intervals of 0.1 s; the future bars were not waited for (2 h / 600 = 12 s)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 5 and min(gaps) > 0.05, gaps
    assert [p.bar["bar_time"] for p in pull_all(reader, 6)] == bars("BTCUSD", 6)["bar_time"].to_list()
    assert future.pull(10, timeout_s=2) == []
    reader.close()
    future.close()


def test_a_stop_ends_publishing_with_what_was_confirmed(emulator_host, cloud_cfg):
    stop = threading.Event()
    stats = publish_bars(cloud_cfg, [bars("BTCUSD", 50)], speed=60, stop=stop, max_ahead=timedelta(minutes=5),
                         on_publish=lambda t, n: stop.set())  # 1 s a bar: stopped after the first
    assert stats.published == 1


def test_a_worker_holds_its_bars_until_it_acks_them(emulator_host, fast_cfg):
    """Unacked bars come again after the ack deadline (10 s) or at once after `close()`; acked ones never;
    while bars of the series are held, none after them is delivered (ordering)."""
    worker = "odum.momentum_v1.BTCUSD.1m"
    reader = BarPull.for_worker(fast_cfg, worker, "BTCUSD", "1m")
    publish_bars(fast_cfg, [bars("BTCUSD", 5)], speed=0, max_ahead=timedelta(minutes=5))
    want = bars("BTCUSD", 5)["bar_time"].to_list()
    first = []
    wait_for(lambda: first.extend(reader.pull(10, timeout_s=2)) or len(first) >= 5, 30, "5 bars")
    assert [p.bar["bar_time"] for p in first] == want and reader.held == 5
    reader.ack([p.ack_id for p in first[:2]])  # the first two decisions are confirmed
    publish_bars(fast_cfg, [bars("BTCUSD", 1, end=NOW + timedelta(minutes=1))], speed=0,
                 max_ahead=timedelta(minutes=5))
    assert reader.pull(10, timeout_s=3) == []  # three held: neither they nor the new bar come meanwhile
    again = []
    wait_for(lambda: again.extend(reader.pull(10, timeout_s=2)) or len(again) >= 4, 30,
             "the unacked bars after the ack deadline")
    assert [p.bar["bar_time"] for p in again] == want[2:] + [NOW + timedelta(minutes=1)]  # never the acked two
    assert reader.held == 7  # the first delivery's three ack ids are stale, the new ones held
    reader.close()  # gives the held bars back at once
    started = time.monotonic()
    second = BarPull.for_worker(fast_cfg, worker, "BTCUSD", "1m")
    third = []
    wait_for(lambda: third.extend(second.pull(10, timeout_s=2)) or len(third) >= 4, 8, "the bars given back")
    assert time.monotonic() - started < 8  # not the 10 s ack deadline
    assert [p.bar["bar_time"] for p in third] == want[2:] + [NOW + timedelta(minutes=1)]
    second.ack([p.ack_id for p in third])
    assert second.pull(10, timeout_s=3) == []
    second.close()


def test_a_poison_bar_is_returned_with_its_problem_and_dead_lettered(emulator_host, cloud_cfg):
    worker = "odum.momentum_v1.BTCUSD.1m"
    sub = ensure_bar_subscription(cloud_cfg, worker, "BTCUSD", "1m")
    admin = Admin()
    letters = Collector(admin.subscriber, deadletter(sub))
    topic = topic_path(PROJECT, f"{cloud_cfg.environment.messaging.topic_prefix}.bars.BTCUSD.1m")
    [bar] = bars("BTCUSD", 1).iter_rows(named=True)
    eth = bar_message({**bar, "symbol": "ETHUSD"})
    for data, key in ((b"garbage", "BTCUSD.1m"), (eth.data, "BTCUSD.1m"), (bar_message(bar).data, "BTCUSD.1m")):
        admin.publisher.publish(topic, data, **{"v": "1"}).result()
    reader = BarPull(PROJECT, sub, "BTCUSD", "1m")
    got = []
    wait_for(lambda: got.extend(reader.pull(10, timeout_s=2)) or len(got) >= 3, 30, "3 messages")
    by = {(p.problem.reason if p.problem else None): p for p in got}
    assert set(by) == {"undecodable", "unknown_symbol", None} and by[None].bar == bar
    for p in got:
        if p.problem and p.problem.reason == "undecodable":
            reader.dead_letter(p.ack_id, p.problem)  # the problem as it came (transports/pubsub.LiveBars)
        elif p.problem:
            reader.dead_letter(p.ack_id, p.problem.reason, p.problem.detail)
        else:
            reader.ack([p.ack_id])
    wait_for(lambda: len(letters) >= 2, 30, "2 dead letters")
    letters.stop()
    reasons = {r[1]["reason"]: r for r in letters.received}
    assert set(reasons) == {"undecodable", "unknown_symbol"}
    assert reasons["undecodable"][0] == b"garbage" and reasons["undecodable"][1]["subscription"] == sub
    assert reasons["undecodable"][1]["detail"].startswith("not JSON")
    assert reader.held == 0 and reader.pull(10, timeout_s=2) == []
    reader.close()
    admin.close()
