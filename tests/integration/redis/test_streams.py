"""The stream pieces one by one against a private redis-server: the sink's checkpoint, poison bars,
the recorder (claims, idempotent replays), RedisOutput."""

from __future__ import annotations

import json
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl
import pytest
import redis
from polars.testing import assert_frame_equal

from signalgen.config.loader import load_config
from signalgen.data.redis_bars import live_feed, publish_bars
from signalgen.modes.worker import MemorySink, ReplayClock, bar_feed, run_worker
from signalgen.data.schema import BAR_REJECTION_SCHEMA
from signalgen.brokers.codec import decode_rows
from signalgen.brokers.redis import RECORDER_GROUP, connect, read_checkpoints
from signalgen.outputs.redis import RedisOutput, RedisSink
from signalgen.signals.types import SIGNAL_SCHEMA
from signalgen.storage import open_store
from signalgen.storage.reads import ReadQuery
from signalgen.storage.recorder import BAR_REJECTION_WIRE, Recorder
from tests.integration.redis.conftest import make_root
from tests.integration.redis.helpers import (
    KEYS, WORKER, assert_same, bars, context, reference, spec_of, stored, streamed, wait_for,
)
from tests.integration.redis.servers import RedisServer
from tests.integration.redis.workers import until

pytestmark = pytest.mark.integration  # real redis-servers these tests start

def batches(cfg, n: int) -> list:
    """The worker's decisions over n bars, one Decisions per bar."""
    sink = MemorySink()
    run_worker(spec_of(cfg), bar_feed(bars("SOLUSD", n)), sink, ReplayClock(), context(cfg))
    return sink.decisions


def bar_end(d) -> datetime:
    return datetime.fromtimestamp(int(d.bar_time_us[-1]) / 1e6, timezone.utc)


def test_sink_checkpoint_advances_only_when_redis_has_the_entries(tmp_path, registry_dir):
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        cfg = load_config("local-integration", "live", root=make_root(tmp_path, registry_dir, server.url))
        spec, ds = spec_of(cfg), batches(cfg, 200)
        sink = RedisSink.from_config(cfg)
        for d in ds[:100]:
            sink.record(spec, d)
        assert sink.checkpoints == {WORKER: bar_end(ds[99])}  # sent on the caller's thread: EXEC returned
        assert read_checkpoints(sink.client, KEYS, "live") == {WORKER: bar_end(ds[99])}

        server.stop(signal.SIGKILL)
        rejected = pl.DataFrame({"symbol": ["SOLUSD"], "timeframe": ["5m"], "bar_time": [bar_end(ds[100])],
                                 "reason": ["gap"], "detail": ["test"]}, schema=BAR_REJECTION_SCHEMA)
        sink.record_bar_rejections(rejected, "run-live")
        for d in ds[100:150]:
            sink.record(spec, d)  # buffered, not blocking: the buffer holds 10,000 entries
        assert sink.checkpoints == {WORKER: bar_end(ds[99])} and sink.buffered == 51

        # When Redis is back, the first EXEC applies everything buffered but its reply is lost: the
        # sender reads the checkpoint back and sends none of it again.
        real, lost = sink._send, []

        def exec_then_lose_reply(batch):
            real(batch)
            if not lost:
                lost.append(len(batch))
                raise redis.ConnectionError("reply lost")

        sink._send = exec_then_lose_reply
        server.start()
        wait_for(lambda: sink.checkpoints[WORKER] == bar_end(ds[149]), 5, "delivery after Redis' return")
        assert lost == [51]
        for d in ds[150:]:
            sink.record(spec, d)
        sink.flush(timeout=10)
        assert sink.checkpoints[WORKER] == bar_end(ds[-1])
        sink.close()
        r = connect(cfg)
        assert read_checkpoints(r, KEYS, "live") == {WORKER: bar_end(ds[-1])}
        sig = pl.concat([d.frames()[0] for d in ds])
        rej = pl.concat([d.frames()[1] for d in ds])
        assert_same(streamed(r, "live", "odum", internal=True), (sig, rej))  # every entry once
        assert r.xlen(KEYS.bar_rejections("live")) == 1
    finally:
        server.stop()


def test_a_full_buffer_blocks_record_until_redis_is_back(tmp_path, registry_dir, caplog):
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        cfg = load_config("local-integration", "live", root=make_root(tmp_path, registry_dir, server.url))
        spec, ds = spec_of(cfg), batches(cfg, 60)
        sink = RedisSink.from_config(cfg, max_buffered=10)
        sink.record(spec, ds[0])
        server.stop(signal.SIGKILL)
        done = threading.Event()

        def produce():
            for d in ds[1:]:
                sink.record(spec, d)
            done.set()

        threading.Thread(target=produce, daemon=True).start()
        wait_for(lambda: sink.buffered == 10, 5, "a full buffer")
        assert not done.wait(1.0) and sink.buffered == 10  # blocked: backpressure, memory bounded
        server.start()
        assert done.wait(5), "record() must resume within 5 s of Redis' return"
        sink.close()
        assert sink.checkpoints[WORKER] == bar_end(ds[-1])
        assert sum("buffer full" in r.message for r in caplog.records) == 1
        assert sink.stats.max_buffered == 10
    finally:
        server.stop()


def test_poison_bars_go_to_the_dead_letter_stream(root):
    cfg = load_config("local-integration", "live", root=root)
    r = connect(cfg)
    frames = bars("SOLUSD", 300)
    good = pl.concat(frames)
    key = KEYS.bars("SOLUSD", "5m")
    publish_bars(r, [good.head(150)], keys=KEYS)
    last_ms = int(good["bar_time"][149].timestamp() * 1000)
    fields = {"v": "1", "symbol": "SOLUSD", "timeframe": "5m", "bar_time": "", "open": "1", "high": "1",
              "low": "1", "close": "1", "volume": "1"}
    poison = {
        "wrong_schema": {**fields, "v": "2"},
        "undecodable": {**fields, "close": b"\xff\xfe"},
        "unknown_symbol": {**fields, "symbol": "BTCUSD"},
        "id_mismatch": {**fields, "bar_time": "2030-01-01T00:00:00Z"},
    }
    for i, (reason, entry) in enumerate(poison.items(), 1):
        r.xadd(key, entry, id=f"{last_ms + i}-0")
    r.xadd(key, {"v": "1", "symbol": "SOLUSD"}, id=f"{last_ms + 9}-0")  # missing fields
    publish_bars(r, [good.tail(150)], keys=KEYS)

    stop = threading.Event()
    sink = MemorySink()
    feed = until(live_feed(cfg, spec_of(cfg), after=None, stop=stop, block_ms=100), good["bar_time"][-1])
    run_worker(spec_of(cfg), feed, sink, ReplayClock(), context(cfg))
    assert_same(sink.frames(), reference(cfg, spec_of(cfg), frames))  # the worker went on as if they were not there
    letters = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(KEYS.deadletter)]
    assert sorted(e["reason"] for e in letters) == sorted([*poison, "wrong_schema"])
    assert {e["stream"] for e in letters} == {key} and {e["worker"] for e in letters} == {WORKER}


def test_a_poison_entry_is_dead_lettered_once_and_clipped_however_many_workers_read_it(root):
    from signalgen.data.redis_bars import DEADLETTER_MAX_BYTES

    cfg = load_config("local-integration", "live", root=root)
    r = connect(cfg)
    good = pl.concat(bars("SOLUSD", 40))
    key = KEYS.bars("SOLUSD", "5m")
    publish_bars(r, [good.head(20)], keys=KEYS)
    last_ms = int(good["bar_time"][19].timestamp() * 1000)
    r.xadd(key, {"v": "2", "symbol": "SOLUSD"}, id=f"{last_ms + 1}-0")
    r.xadd(key, {"v": "1", "symbol": "SOLUSD", "blob": "x" * 1_000_000}, id=f"{last_ms + 2}-0")  # 1 MB
    publish_bars(r, [good.tail(20)], keys=KEYS)
    for _ in range(3):  # three workers of the stream (e.g. three clients' strategies on SOLUSD 5m)
        list(until(live_feed(cfg, spec_of(cfg), after=None, block_ms=100), good["bar_time"][-1]))
    letters = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(KEYS.deadletter)]
    assert [e["id"] for e in letters] == [f"{last_ms + 1}-0", f"{last_ms + 2}-0"]
    big = letters[1]
    assert len(big["fields"].encode()) <= DEADLETTER_MAX_BYTES == 64 * 1024 and int(big["size"]) > 1_000_000
    assert big["fields"].startswith('{"v": "1", "symbol": "SOLUSD", "blob": "xxx')
    assert "size" not in letters[0] and json.loads(letters[0]["fields"]) == {"v": "2", "symbol": "SOLUSD"}


def test_the_live_feed_reads_the_same_bars_over_resp2_and_resp3(root):
    """live_feed parses XREAD's raw reply itself: a map per stream in RESP3 (redis-py's default), a
    list of [key, entries] pairs in RESP2 (`?protocol=2` in the URL)."""
    cfg = load_config("local-integration", "live", root=root)
    frames = bars("SOLUSD", 40)
    publish_bars(connect(cfg), frames, keys=KEYS)
    expected = pl.concat(frames).to_dicts()
    for protocol in (2, 3):
        client = redis.Redis.from_url(cfg.environment.messaging.url, protocol=protocol)
        stop = threading.Event()
        timer = threading.Timer(10.0, stop.set)  # a feed that reads nothing ends, and the test fails
        timer.start()
        got = list(until(live_feed(cfg, spec_of(cfg), after=None, stop=stop, client=client, count=16, block_ms=100),
                         expected[-1]["bar_time"]))
        timer.cancel()
        assert got == expected, f"RESP{protocol}"


def test_recorder_claims_a_crashed_consumers_entries_and_replays_idempotently(root):
    cfg = load_config("local-integration", "live", root=root)
    spec = spec_of(cfg)
    frames = bars("SOLUSD", 400)
    bad = pl.concat(frames).with_columns(pl.when(pl.int_range(pl.len()) == 300).then(-1.0).otherwise(pl.col("low"))
                                         .alias("low"))  # one bar fails validation: a bar rejection
    sink = RedisSink.from_config(cfg)
    run_worker(spec, bar_feed([bad]), sink, ReplayClock(), context(cfg))
    sink.close()
    r = connect(cfg)
    reasons = sorted(decode_rows([f[b"data"] for _, f in r.xrange(KEYS.bar_rejections("live"))],
                                 BAR_REJECTION_WIRE)["reason"])
    assert reasons == ["gap", "non_positive_price"]

    store = open_store(cfg)
    try:
        rec = Recorder.from_config(cfg, store, consumer="second", claim_idle_ms=0, block_ms=10)
        rec.ensure_groups()
        crashed = r.xreadgroup(RECORDER_GROUP, "first", {KEYS.internal("live", "signals", "odum"): ">"}, count=100)
        assert len(crashed[0][1]) == 100  # read, never acked: "first" died
        rec.recover()
        while rec.step():
            pass
        assert rec.stats.claimed == 100
        for key in rec.streams:
            assert r.xpending(key, RECORDER_GROUP)["pending"] == 0
        want = streamed(r, "live", "odum", internal=True)
        first = stored(store, "odum")
        assert_same(first, want)
        assert_same(streamed(r, "live", "odum"), want)  # written on to odum's streams, once
        assert store.read(ReadQuery(kind="signals", modes=("live",))).height == want[0].height

        # replay everything: same rows, none added
        for key in rec.streams:
            r.xgroup_setid(key, RECORDER_GROUP, "0")
        again = Recorder.from_config(cfg, store, consumer="third", block_ms=10)
        while again.step():
            pass
        assert again.stats.entries == rec.stats.entries
        for a, b in zip(stored(store, "odum"), first):
            assert_frame_equal(a, b)
        assert again.stats.forwarded == 0 and again.stats.replayed == rec.stats.forwarded
        assert_same(streamed(r, "live", "odum"), want)  # nothing written on twice
    finally:
        store.close()
    with duckdb.connect(str(Path(cfg.root) / cfg.environment.storage.path), read_only=True) as db:
        rows = db.execute("select reason, run_id from bar_rejections where mode = 'live' order by reason").fetchall()
    assert rows == [("gap", "run-live"), ("non_positive_price", "run-live")]


def test_the_recorder_gathers_bars_that_arrive_one_by_one_into_few_store_transactions(root):
    """A live fleet sends one entry per bar; the recorder waits `gather_s` after a read that was not
    full, so 60 bars arriving 10 ms apart take a handful of store transactions, not 60 — and all are
    stored."""
    import time

    cfg = load_config("local-integration", "live", root=root)
    spec, ds = spec_of(cfg), batches(cfg, 200)[-60:]
    store = open_store(cfg)
    writes = []
    write_decisions = store.write_decisions

    def counting(signals, rejections):
        writes.append(signals.height + rejections.height)
        return write_decisions(signals, rejections)

    store.write_decisions = counting
    stop = threading.Event()
    rec = Recorder.from_config(cfg, store, consumer="test", block_ms=50, gather_s=0.25)
    rec.ensure_groups()
    thread = threading.Thread(target=rec.run, args=(stop,))
    thread.start()
    sink = RedisSink.from_config(cfg)
    try:
        for d in ds:
            sink.record(spec, d)
            time.sleep(0.01)
        sink.close()
        deadline = time.monotonic() + 10
        while sum(writes) < len(ds) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        store.close()
    assert sum(writes) == len(ds)
    assert len(writes) <= 8, writes  # ~0.7 s of arrivals in 0.25 s gathers (one per bar: 60)


def test_redis_output_writes_a_clients_signals_of_its_mode(root):
    cfg = load_config("local-integration", "historical", root=root)
    ds = batches(load_config("local-integration", "live", root=root), 200)
    sig = pl.concat([d.frames()[0] for d in ds])
    out = RedisOutput.from_config(cfg, "odum")
    out.open()
    with pytest.raises(ValueError, match="live"):
        out.write(sig)  # live signals never reach a historical stream
    hist = sig.with_columns(pl.lit("historical").alias("mode"))
    out.write(hist)
    out.write(hist)  # written twice before a flush: sent once
    out.close()
    r = connect(cfg)
    got = decode_rows([f[b"data"] for _, f in r.xrange(KEYS.signals("historical", "odum"))], SIGNAL_SCHEMA)
    assert_frame_equal(got, hist)
    assert r.exists(KEYS.signals("live", "odum")) == 0


def test_small_batches_are_encoded_without_polars_into_the_same_records(root):
    from signalgen.signals.records import SMALL_BATCH, Decisions
    from signalgen.brokers.codec import decision_entries
    from signalgen.signals.types import REJECTION_SCHEMA

    ds = batches(load_config("local-integration", "live", root=root), 400)
    groups = [[d] for d in ds] + [ds[i:i + 7] for i in range(0, len(ds), 7)]  # single bars and small batches
    for group in groups:
        d = Decisions.concat(group)
        assert d.bars <= SMALL_BATCH
        signals, rejections = decision_entries(d)
        want = d.frames()
        for entries, schema, frame in ((signals, SIGNAL_SCHEMA, want[0]), (rejections, REJECTION_SCHEMA, want[1])):
            got = decode_rows([e["data"].encode() for e in entries], schema)
            assert_same_bits(got, frame)
            assert [e["id"] for e in entries] == frame[schema.names()[0]].to_list()


def test_small_batches_write_non_finite_numbers_as_null_as_polars_does(root):
    """An unhealthy model's NaN output and a NaN or infinite confidence or strength become JSON null
    in the plain-Python records, exactly as in `record_entries(frames)`."""
    from dataclasses import replace

    import numpy as np

    from signalgen.signals.records import Decisions
    from signalgen.brokers.codec import decision_entries, record_entries

    ds = Decisions.concat(batches(load_config("local-integration", "live", root=root), 200)[-8:])
    n = ds.bars
    ev = replace(ds.evaluation, confidence=np.where(np.arange(n) % 2 == 0, np.nan, ds.evaluation.confidence),
                 strength=np.where(np.arange(n) % 3 == 0, np.inf, ds.evaluation.strength))
    preds = ds.predictions.copy()
    preds[::2, 0] = np.nan
    preds[1::4, -1] = -np.inf
    d = replace(ds, evaluation=ev, predictions=preds)
    signals, rejections = decision_entries(d)
    want_signals, want_rejections = d.frames()
    assert [e["data"].encode() for e in signals] == [e["data"] for e in record_entries(want_signals, "signal_id")]
    assert [e["data"].encode() for e in rejections] == [e["data"] for e in record_entries(want_rejections,
                                                                                          "rejection_id")]
    assert any('"confidence":null' in e["data"] for e in signals + rejections)
    assert any('"output":null' in e["data"] for e in signals + rejections)


def assert_same_bits(got: pl.DataFrame, want: pl.DataFrame) -> None:
    import numpy as np

    assert_frame_equal(got, want, check_exact=True)
    for column, dtype in want.schema.items():
        if dtype == pl.Float64:
            assert np.array_equal(got[column].to_numpy().view(np.int64), want[column].to_numpy().view(np.int64))


def test_live_bars_that_arrive_late_are_stale_on_the_wall_clock(root):
    from signalgen.modes.worker import WallClock

    cfg = load_config("local-integration", "live", root=root)
    r = connect(cfg)
    old = pl.concat(bars("SOLUSD", 200)).with_columns(pl.col("bar_time") - pl.duration(days=365 * 8))  # 2022
    publish_bars(r, [old], keys=KEYS)
    sink = MemorySink()
    feed = until(live_feed(cfg, spec_of(cfg), after=None, block_ms=100), old["bar_time"][-1])
    run_worker(spec_of(cfg), feed, sink, WallClock(), context(cfg))
    signals, rejections = sink.frames()
    assert signals.height == 0 and rejections.height == 200
    assert all("stale_data" in reasons for reasons in rejections["reasons"])
