"""Bars from the future, with the default `messaging.max_ahead_s` (300 s): one entry far ahead would make
Redis refuse every real bar before it, so `feed` refuses such bars (and reports a stream already cut
off), and a live worker dead-letters one another program wrote instead of jumping its checkpoint."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from signalgen.config.loader import load_config
from signalgen.brokers.codec import encode_bar
from signalgen.data.redis_bars import entry_id, live_feed, publish_bars
from signalgen.data.synthetic import synthetic_bars
from signalgen.modes.worker import MemorySink, ReplayClock, run_worker
from signalgen.brokers.redis import connect
from tests.integration.redis.helpers import KEYS, context, run_cli, spec_of, wait_for

pytestmark = pytest.mark.integration  # a private redis-server per test

FAR = datetime(2100, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def default_root(root):
    """The private root with local-integration's own max_ahead_s (the fixture root lifts it for 2030 bars)."""
    env = root / "environments" / "local-integration.yaml"
    env.write_text(env.read_text().replace("  max_ahead_s: 1.0e+9\n", ""))
    return root


def now_bars(n: int, ahead: int = 0):
    """n 5m SOLUSD bars ending at or before now, then `ahead` more after it."""
    end = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    end -= timedelta(minutes=end.minute % 5)
    return synthetic_bars(["SOLUSD"], "5m", end - n * timedelta(minutes=5), end + ahead * timedelta(minutes=5), 7)


def test_feed_refuses_bars_from_the_future_and_says_so(default_root):
    common = ("feed", "--env", "local-integration", "--root", str(default_root), "--symbols", "SOLUSD",
              "--source", "synthetic", "--speed", "0")
    start = now_bars(100)["bar_time"][0] - timedelta(minutes=5)
    pinned = ("--start", start.strftime("%Y-%m-%dT%H:%M:%S"), "--bars", "124")  # 24 bars reach 2 hours past now
    proc = run_cli(*common, *pinned)
    assert proc.returncode == 1, proc.stderr
    published = int(proc.stdout.split("published ")[1].split(" bars")[0])
    assert 101 <= published <= 103  # those ending by now + 5 min (one bar) + 300 s
    refused = int(proc.stderr.split("refused ")[1].split(" bars")[0])
    assert published + refused == 124 and "SOLUSD 5m" in proc.stderr and "--max-ahead" in proc.stderr
    r = connect(load_config("local-integration", "live", root=default_root))
    key = KEYS.bars("SOLUSD", "5m")
    last = datetime.fromisoformat(r.xrevrange(key, count=1)[0][1][b"bar_time"].decode())
    assert last <= datetime.now(timezone.utc) + timedelta(minutes=10)

    # --max-ahead lets them in
    proc = run_cli(*common, *pinned, "--max-ahead", "3h")
    assert proc.returncode == 0, proc.stderr
    assert f"published {refused} bars ({published} already there)" in proc.stdout

    # a bar another program wrote far ahead cuts the stream off: feed says so instead of "already there"
    bar = now_bars(1).to_dicts()[0] | {"bar_time": FAR}
    r.xadd(key, encode_bar(bar), id=entry_id(FAR))
    proc = run_cli(*common, "--backfill", "10", "--bars", "20")
    assert proc.returncode == 1
    assert "SOLUSD:5m: not published" in proc.stderr and "2100-01-01 00:00:00" in proc.stderr
    assert "XSETID" in proc.stderr and "published 0 bars (0 already there)" in proc.stdout


def test_paced_bars_that_will_be_refused_are_not_waited_for(default_root):
    """At --speed 300 bar time outruns the wall clock: the 50 bars past now would go out one a second
    and all but ~2 be refused at their turn; feed refuses them at once instead of waiting ~50 s."""
    import time

    started = time.monotonic()
    proc = run_cli("feed", "--env", "local-integration", "--root", str(default_root), "--symbols", "SOLUSD",
                   "--source", "synthetic", "--speed", "300", "--backfill", "10", "--bars", "60")
    assert proc.returncode == 1, proc.stderr
    assert 47 <= int(proc.stderr.split("refused ")[1].split(" bars")[0]) <= 49
    assert time.monotonic() - started < 25


def test_a_worker_dead_letters_a_bar_from_the_future_instead_of_jumping_its_checkpoint(default_root):
    cfg = load_config("local-integration", "live", root=default_root)
    r = connect(cfg)
    good = now_bars(60)
    publish_bars(r, [good], keys=KEYS)
    r.xadd(KEYS.bars("SOLUSD", "5m"), encode_bar(good.to_dicts()[-1] | {"bar_time": FAR}), id=entry_id(FAR))
    stop, sink = threading.Event(), MemorySink()
    feed = live_feed(cfg, spec_of(cfg), after=None, stop=stop, block_ms=50)
    worker = threading.Thread(target=run_worker, args=(spec_of(cfg), feed, sink, ReplayClock(), context(cfg)))
    worker.start()
    try:
        wait_for(lambda: r.xlen(KEYS.deadletter), 30, "the dead letter")
        wait_for(lambda: sum(d.bars for d in sink.decisions) == 60, 30, "the 60 good bars decided")
    finally:
        stop.set()
        worker.join()
    letter = {k.decode(): v.decode() for k, v in r.xrange(KEYS.deadletter)[0][1].items()}
    assert letter["reason"] == "future" and letter["id"] == entry_id(FAR)
    decided = [t for d in sink.decisions for t in d.bar_time_us]
    assert max(decided) == int(good["bar_time"][-1].timestamp() * 1e6)  # the checkpoint never saw 2100


def test_feed_shows_its_progress_and_takes_only_the_timeframes_asked(root):
    common = ("feed", "--env", "local-integration", "--root", str(root), "--source", "synthetic", "--speed", "0",
              "--start", "2030-01-01T00:00:00", "--bars", "110")
    proc = run_cli(*common, "--timeframes", "5m", "--symbols", "SOLUSD", env={"TTY_COMPATIBLE": "1"})  # a terminal
    assert proc.returncode == 0, proc.stderr
    assert "110/110" in proc.stderr and "eta" in proc.stderr  # the progress bar (on stderr only)
    assert proc.stdout == "published 110 bars (0 already there)\n"
    assert run_cli(*common, "--symbols", "SOLUSD").stderr.count("110/110") == 0  # not a terminal: no bar
    proc = run_cli(*common, "--timeframes", "1d")
    assert proc.returncode == 2 and "--timeframes" in proc.stderr
    assert "no enabled strategy uses timeframe 1d" in proc.stderr
