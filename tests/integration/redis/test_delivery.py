"""Delivery under faults, against real redis-servers these tests start: a worker killed with SIGKILL
resumes from its checkpoint, and a Redis outage of ~10 s loses and duplicates nothing, with bounded
buffering, backpressure logged once and recovery within 5 s. Both end equal to a fault-free run."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timedelta

import pytest

from signalgen.config.loader import load_config
from signalgen.config.workers import worker_specs
from signalgen.data.redis_bars import publish_bars
from signalgen.brokers.redis import connect
from signalgen.storage import open_store
from signalgen.storage.recorder import Recorder
from tests.integration.redis.conftest import make_root
from tests.integration.redis.helpers import (
    BARS_START, KEYS, assert_same, bars, reference, rss_mb, start_worker, streamed, stored, wait_for,
)
from tests.integration.redis.servers import RedisServer

pytestmark = pytest.mark.integration  # real redis-servers these tests start

WORKER = "odum.momentum_v1.SOLUSD.5m"
BAR_S = 300


def checkpoint(r) -> datetime | None:
    raw = r.hget(KEYS.checkpoints("live"), WORKER)
    return datetime.fromisoformat(raw.decode()) if raw else None


def record_all(cfg):
    """Run the recorder over everything in the streams; the store, open."""
    store = open_store(cfg)
    rec = Recorder.from_config(cfg, store, consumer="test", block_ms=10)
    rec.ensure_groups()
    rec.recover()
    while rec.step():
        pass
    return store


def check_against_fault_free(cfg, r, frames) -> None:
    spec = next(s for s in worker_specs(cfg) if s.id == WORKER)
    want = reference(cfg, spec, frames)
    assert want[0].height > 50 and want[1].height > 50, want[1]["reasons"].explode().value_counts()
    assert_same(streamed(r, "live", "odum", internal=True), want)
    store = record_all(cfg)
    try:
        assert_same(stored(store, "odum"), want)
    finally:
        store.close()
    assert_same(streamed(r, "live", "odum"), want)  # the recorder wrote each on to odum's streams once


def test_sigkilled_worker_resumes_from_its_checkpoint(tmp_path, root):
    cfg = load_config("local-integration", "live", root=root)
    r = connect(cfg)
    n = 1500
    frames = bars("SOLUSD", n)
    publish_bars(r, frames, keys=KEYS)
    end = frames[-1]["bar_time"][-1]
    result, log = tmp_path / "result.json", tmp_path / "worker.log"
    paced = {"speed": 300 * BAR_S}  # 300 bars a second: the worker stays behind the stream
    proc = start_worker(root, WORKER, end, result, log, **paced)
    third = BARS_START + timedelta(seconds=BAR_S * n // 3)
    wait_for(lambda: (c := checkpoint(r)) is not None and c >= third, 60, "a third of the bars")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    killed_at = checkpoint(r)
    assert third <= killed_at < end

    proc = start_worker(root, WORKER, end, result, log, **paced)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    out = json.loads(result.read_text())
    assert out["resumed_from"] == str(killed_at)
    assert checkpoint(r) == end
    check_against_fault_free(cfg, r, frames)


def test_redis_outage_loses_and_duplicates_nothing(tmp_path, registry_dir):
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        root = make_root(tmp_path, registry_dir, server.url)
        cfg = load_config("local-integration", "live", root=root)
        r = connect(cfg)
        n = 2000
        frames = bars("SOLUSD", n)
        publish_bars(r, frames, keys=KEYS)
        end = frames[-1]["bar_time"][-1]
        result, log = tmp_path / "result.json", tmp_path / "worker.log"
        # The worker reads 256 bars at a time; stopping Redis in the middle of such a read-ahead leaves
        # it bars to decide while its sink cannot deliver: the buffer (20 entries) fills -> backpressure.
        proc = start_worker(root, WORKER, end, result, log, speed=250 * BAR_S, max_buffered=20, count=256)
        mid_read = BARS_START + timedelta(seconds=BAR_S * (2 * 256 + 128))
        wait_for(lambda: (c := checkpoint(r)) is not None and c >= mid_read, 60, "640 bars decided")
        r.close()
        rss = [rss_mb(proc.pid)]
        server.stop(signal.SIGKILL)  # a crash, not a pause: the process is gone
        down = time.monotonic()
        while time.monotonic() - down < 10:
            time.sleep(0.25)
            rss.append(rss_mb(proc.pid))
        assert proc.poll() is None, "the worker must ride out the outage"
        server.start()
        up = time.monotonic()
        r = connect(cfg)
        before = checkpoint(r)
        assert before is not None and before < end
        wait_for(lambda: (c := checkpoint(r)) is not None and c > before, 5, "the worker's recovery")
        recovery_s = time.monotonic() - up
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        out = json.loads(result.read_text())
        text = log.read_text()
        print(f"recovery {recovery_s:.2f} s after Redis' return; sink outage {out['last_outage_s']:.1f} s; "
              f"rss {min(rss):.0f}-{max(rss):.0f} MB; buffered max {out['max_buffered']}")
        assert recovery_s < 5
        assert out["outages"] == 1 and out["backpressure_events"] == 1
        assert text.count("buffer full") == 1, text[-3000:]
        assert out["max_buffered"] <= 20
        assert max(rss) - rss[0] < 20, rss  # bounded while down
        assert checkpoint(r) == end
        check_against_fault_free(cfg, r, frames)
    finally:
        server.stop()
