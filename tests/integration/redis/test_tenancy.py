"""Tenants against the archive, with real ACL users on a private redis-server: workers write internal
streams no client can touch, the recorder is the only writer of the clients' streams (by routing),
nothing a client does (acks, groups) changes what the store holds, a client's user creates no key,
and a recorder that crashes anywhere writes no client entry twice and loses none."""

from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
import redis
import yaml

from signalgen.config.loader import load_config
from signalgen.config.workers import worker_specs
from signalgen.modes.worker import MemorySink, ReplayClock, bar_feed, run_worker
from signalgen.brokers.redis import RECORDER_GROUP, connect
from signalgen.outputs.redis import RedisSink
from signalgen.storage import open_store
from signalgen.storage.recorder import Recorder
from signalgen.transports.redis import client_connection, grant_client
from tests.integration.redis.conftest import make_root
from tests.integration.redis.helpers import KEYS, assert_same, bars, context, stored, streamed, wait_for

pytestmark = pytest.mark.integration  # a private redis-server per test

PASSWORDS = {"ODUM_REDIS_PASSWORD": "odum-pw-1", "QUINN_REDIS_PASSWORD": "quinn-pw-2"}
ODUM, QUINN = "odum.momentum_v1.SOLUSD.5m", "quinn.momentum_v1.SOLUSD.5m"


def client_yaml(client: str, routing: str) -> str:
    return yaml.safe_dump({
        "id": client, "routing": routing, "redis_password_env": f"{client.upper()}_REDIS_PASSWORD",
        "strategies": [{"id": "momentum_v1", "symbols": ["SOLUSD"], "timeframes": ["5m"],
                        "models": [{"model_id": "swing_high", "confidence_threshold": 0.55, "lookback_window": 60},
                                   {"model_id": "swing_low", "confidence_threshold": 0.55,
                                    "lookback_window": 60}]}]}, sort_keys=False)


@pytest.fixture
def cfg(tmp_path: Path, registry_dir: Path, redis_server, monkeypatch):
    """odum routes to its stream, quinn to QuantConnect files; both granted."""
    root = make_root(tmp_path, registry_dir, redis_server.url)
    shutil.rmtree(root / "clients")
    (root / "clients").mkdir()
    (root / "clients" / "odum.yaml").write_text(client_yaml("odum", "internal"))
    (root / "clients" / "quinn.yaml").write_text(client_yaml("quinn", "quantconnect"))
    for var, value in PASSWORDS.items():
        monkeypatch.setenv(var, value)
    cfg = load_config("local-integration", "live", root=root)
    for client in ("odum", "quinn"):
        grant_client(cfg, client)
    return cfg


def decide(cfg, worker: str, n: int = 300):
    """(spec, the worker's decisions over n bars, one per bar)."""
    spec = next(s for s in worker_specs(cfg) if s.id == worker)
    sink = MemorySink()
    run_worker(spec, bar_feed(bars("SOLUSD", n)), sink, ReplayClock(), context(cfg))
    return spec, sink


def send(cfg, worker: str, n: int = 300) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Send a worker's decisions through its RedisSink; the decisions."""
    spec, memory = decide(cfg, worker, n)
    sink = RedisSink.from_config(cfg)
    for d in memory.decisions:
        sink.record(spec, d)
    sink.close()
    return memory.frames()


def drain(rec: Recorder) -> None:
    rec.recover()
    while rec.step():
        pass


@contextmanager
def recording(cfg, store, **kwargs):
    """A recorder running on a thread, as the manager runs it, until the block ends."""
    rec = Recorder.from_config(cfg, store, consumer="rec", block_ms=50, **kwargs)
    rec.ensure_groups()
    stop = threading.Event()
    thread = threading.Thread(target=rec.run, args=(stop,))
    thread.start()
    try:
        yield rec
    finally:
        stop.set()
        thread.join()


def on_odums_streams(r) -> int:
    return r.xlen(KEYS.signals("live", "odum")) + r.xlen(KEYS.rejections("live", "odum"))


def test_a_client_cannot_take_decisions_from_the_store(cfg):
    """The attack of issue 16: XREADGROUP GROUP recorder ... then XACK, on every key the client's user
    may touch. Before, the recorder read the clients' own streams, so the stolen entries never reached
    the store."""
    r = connect(cfg)
    store = open_store(cfg)
    try:
        rec = Recorder.from_config(cfg, store, consumer="rec", block_ms=10, gather_s=0.05)
        rec.ensure_groups()
        want = send(cfg, ODUM)
        assert want[0].height > 20 and want[1].height > 20
        thief = client_connection(cfg, "odum")
        stolen = 0
        for kind in ("signals", "rejections"):
            key = getattr(KEYS, kind)("live", "odum")
            try:
                thief.xgroup_create(key, RECORDER_GROUP, id="0")
            except redis.ResponseError as exc:
                assert "BUSYGROUP" in str(exc)
            for _, entries in thief.xreadgroup(RECORDER_GROUP, "thief", {key: ">"}) or ():
                stolen += thief.xack(key, RECORDER_GROUP, *[eid for eid, _ in entries])
        drain(rec)
        assert_same(stored(store, "odum"), want)
        assert_same(streamed(r, "live", "odum"), want)
        for kind in ("signals", "rejections"):  # the workers' streams are out of the client's reach
            with pytest.raises(redis.exceptions.NoPermissionError):
                thief.xreadgroup(RECORDER_GROUP, "thief", {KEYS.internal("live", kind, "odum"): ">"})
            with pytest.raises(redis.exceptions.NoPermissionError):
                thief.xinfo_groups(KEYS.internal("live", kind, "odum"))
        # and once the decisions are on its streams, the client's acks change nothing either
        for kind in ("signals", "rejections"):
            key = getattr(KEYS, kind)("live", "odum")
            for _, entries in thief.xreadgroup(RECORDER_GROUP, "thief", {key: ">"}) or ():
                stolen += thief.xack(key, RECORDER_GROUP, *[eid for eid, _ in entries])
        assert stolen == want[0].height + want[1].height  # the client did read (and ack) every decision
        for key in rec.streams:
            r.xgroup_setid(key, RECORDER_GROUP, "0")  # replay everything: the same rows, nothing added
        drain(Recorder.from_config(cfg, store, consumer="again", block_ms=10))
        assert_same(stored(store, "odum"), want)
        assert_same(streamed(r, "live", "odum"), want)
    finally:
        store.close()


def test_a_clients_user_creates_no_key(cfg):
    """`clients grant` creates the client's streams of every mode, and the user may touch those keys
    only: its consumer groups need no MKSTREAM, and MKSTREAM finds nothing to create. Before, its key
    pattern `<p>:*:signals:<client>` matched any number of keys (and the workers' internal streams)."""
    r = connect(cfg)
    keys = KEYS.client_streams("odum")
    assert len(keys) == 8 and all(r.type(k) == b"stream" and r.xlen(k) == 0 for k in keys)
    before = r.dbsize()
    odum = client_connection(cfg, "odum")
    odum.xgroup_create(KEYS.signals("live", "odum"), "mine", id="0")  # its own group, no MKSTREAM needed
    odum.xgroup_create(KEYS.rejections("historical", "odum"), "mine", id="$", mkstream=True)
    for key in ("signalgen:evil:signals:odum", "signalgen:1:2:signals:odum", KEYS.internal("live", "signals", "odum"),
                KEYS.signals("live", "quinn"), "signalgen:live:signals:odum2"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            odum.xgroup_create(key, "mine", id="$", mkstream=True)
    with pytest.raises(redis.exceptions.NoPermissionError):  # another database would hold new keys
        odum.execute_command("SELECT", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        odum.xadd(KEYS.signals("live", "odum"), {"v": "1"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        odum.delete(KEYS.signals("live", "odum"))
    assert r.dbsize() == before
    odum.xgroup_destroy(KEYS.signals("live", "odum"), "mine")  # its groups are its own business


def test_the_recorder_writes_each_decision_on_as_routing_says(cfg):
    """odum routes internal: its decisions reach its streams; quinn routes quantconnect: its signals
    reach its QuantConnect files and nothing reaches its streams. The store holds both."""
    r = connect(cfg)
    odum, quinn = send(cfg, ODUM), send(cfg, QUINN)
    store = open_store(cfg)
    try:
        rec = Recorder.from_config(cfg, store, consumer="rec", block_ms=10)
        rec.ensure_groups()
        drain(rec)
        rec.close()
        assert_same(stored(store, "odum"), odum)
        assert_same(stored(store, "quinn"), quinn)
    finally:
        store.close()
    assert_same(streamed(r, "live", "odum"), odum)
    assert [r.xlen(k) for k in (KEYS.signals("live", "quinn"), KEYS.rejections("live", "quinn"))] == [0, 0]
    files = sorted((Path(cfg.root) / cfg.environment.paths.output_dir / "live" / "quantconnect").rglob("*.csv"))
    assert files and {f.relative_to(files[0].parents[2]).parts[0] for f in files} == {"quinn"}
    csv = pl.concat([pl.read_csv(f, schema_overrides={"signal_id": pl.String}) for f in files])
    assert sorted(csv["signal_id"]) == sorted(quinn[0]["signal_id"])


class Crash(Exception):
    """The recorder process dies here."""


@pytest.mark.parametrize("where", ["before the write on", "before the store commit", "before the ack"])
def test_a_recorder_crash_anywhere_writes_nothing_twice_and_loses_nothing(cfg, where):
    want = send(cfg, ODUM, 200)
    r = connect(cfg)
    store = open_store(cfg)
    try:
        crashed = Recorder.from_config(cfg, store, consumer="crashed", block_ms=10, count=50)
        crashed.ensure_groups()
        if where == "before the write on":
            crashed._forward = lambda forward: (_ for _ in ()).throw(Crash())
        else:
            real = store.write_decisions

            def write_then_crash(signals, rejections):
                if where == "before the ack":
                    real(signals, rejections)
                raise Crash()

            store.write_decisions = write_then_crash
        with pytest.raises(Crash):
            drain(crashed)
        read = sum(r.xpending(k, RECORDER_GROUP)["pending"] for k in crashed.streams)  # never acked
        written = on_odums_streams(r)
        assert read > 0 and written == (0 if where == "before the write on" else read)
        store.__dict__.pop("write_decisions", None)  # the survivor's store works
        survivor = Recorder.from_config(cfg, store, consumer="survivor", block_ms=10, claim_idle_ms=0)
        drain(survivor)
        assert survivor.stats.claimed == read
        assert survivor.stats.replayed == (0 if where == "before the write on" else read)
        assert_same(stored(store, "odum"), want)
    finally:
        store.close()
    assert_same(streamed(r, "live", "odum"), want)


def test_a_decision_reaches_its_clients_stream_before_the_store_gathers_it(cfg):
    """The store commits every `gather_s` (DuckDB transactions cost milliseconds); the client's stream
    does not wait for it."""
    spec, memory = decide(cfg, ODUM, 200)
    store = open_store(cfg)
    r = connect(cfg)
    sink = RedisSink.from_config(cfg)
    with recording(cfg, store, gather_s=30.0) as rec:
        for d in memory.decisions[-5:]:
            sink.record(spec, d)
        sink.close()
        wait_for(lambda: on_odums_streams(r) == 5, 5, "five decisions on odum's streams")
        assert rec.stats.transactions == 0  # still gathering
    assert rec.stats.transactions == 1  # stored when the recorder stopped
    got = stored(store, "odum")
    store.close()
    assert got[0].height + got[1].height == 5


def test_a_slow_store_does_not_hold_up_the_write_on(cfg):
    """Store transactions run on a thread of their own: with every commit taking 3 s, bars that arrive
    meanwhile still reach the client's stream at once (on one thread each waited for the commit)."""
    import time

    spec, memory = decide(cfg, ODUM, 200)
    store = open_store(cfg)
    write_decisions = store.write_decisions

    def slow(signals, rejections):
        time.sleep(3.0)
        return write_decisions(signals, rejections)

    store.write_decisions = slow
    r = connect(cfg)
    sink = RedisSink.from_config(cfg)
    late = []
    try:
        with recording(cfg, store, gather_s=0.05) as rec:
            for d in memory.decisions[-20:]:
                before, sent = on_odums_streams(r), time.monotonic()
                sink.record(spec, d)
                wait_for(lambda: on_odums_streams(r) > before, 10, "the decision on odum's stream")
                late.append(time.monotonic() - sent)
                time.sleep(0.05)
    finally:
        sink.close()
        store.close()
    assert max(late) < 1.0, late  # a commit takes 3 s
    assert rec.stats.signals + rec.stats.rejections == 20


def test_the_manager_hands_the_gil_over_every_half_millisecond_while_it_hosts_the_recorder(cfg):
    """The write-on thread shares the manager's GIL; Python's default 5 ms turns were its p99 at 100
    bars/s (bench/live_latency.py, docs/streams.md)."""
    import sys

    from signalgen.transports.redis import RecorderHost

    default = sys.getswitchinterval()
    store = open_store(cfg)
    try:
        host = RecorderHost(cfg, store, run_id="r").start()
        assert sys.getswitchinterval() <= 0.0005
        host.close()
    finally:
        store.close()
    assert sys.getswitchinterval() == default
