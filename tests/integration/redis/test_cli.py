"""The stream commands end to end: feed -> a live worker -> consume (with the client's credentials)
and recorder -> `signals list`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime

import pytest

from signalgen.config.loader import load_config
from signalgen.data.redis_bars import live_feed
from signalgen.modes.worker import ReplayClock, run_worker
from signalgen.brokers.redis import connect
from signalgen.outputs.redis import RedisSink
from tests.integration.redis.helpers import KEYS, REPO, context, run_cli, spec_of, wait_for
from tests.integration.redis.workers import until

pytestmark = pytest.mark.integration  # real redis-servers these tests start


def test_feed_worker_consume_recorder(root):
    env = {"ODUM_REDIS_PASSWORD": "odum-pw-1", "CHRISTIAN_REDIS_PASSWORD": "christian-pw-2"}
    common = ("--env", "local-integration", "--root", str(root))
    proc = run_cli("feed", *common, "--source", "synthetic", "--speed", "0", "--symbols", "SOLUSD",
                   "--bars", "300", "--start", "2030-01-01T00:00:00")
    assert proc.returncode == 0, proc.stderr
    assert "published 300 bars (0 already there)" in proc.stdout
    cfg = load_config("local-integration", "live", root=root)
    r = connect(cfg)
    assert r.xlen(KEYS.bars("SOLUSD", "5m")) == 300

    spec = spec_of(cfg)
    sink = RedisSink.from_config(cfg)
    last = r.xrevrange(KEYS.bars("SOLUSD", "5m"), count=1)[0][1][b"bar_time"].decode()
    outcome = run_worker(spec, until(live_feed(cfg, spec, after=None), datetime.fromisoformat(last)), sink,
                         ReplayClock(), context(cfg))
    sink.close()
    assert outcome.bars == 300 and outcome.signals > 10

    proc = run_cli("clients", "grant", *common, "--client", "odum", env=env)
    assert proc.returncode == 0, proc.stderr
    # the recorder writes the worker's decisions on to odum's streams (and stores them)
    recorder = subprocess.Popen([sys.executable, "strategy_runner.py", "recorder", *common], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: r.xlen(KEYS.signals("live", "odum")) == outcome.signals, 60, "odum's signals on its stream",
                 interval=0.2)
        proc = run_cli("consume", *common, "--client", "odum", "--from-start", "--format", "json",
                       "--max", str(outcome.signals), "--idle-exit", "5", env=env)
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(lines) == outcome.signals
        assert {x["client_id"] for x in lines} == {"odum"} and {x["mode"] for x in lines} == {"live"}
        assert len({x["signal_id"] for x in lines}) == len(lines)
        proc = run_cli("consume", *common, "--client", "odum", "--from-start", "--max", "3", "--idle-exit", "5",
                       env=env)
        assert proc.returncode == 0 and "odum" in proc.stdout and "momentum_v1" in proc.stdout  # the table
        # --max reads no further than it prints: the group's next consumer goes on at the 4th signal
        taken = []
        for args in (("--from-start", "--max", "3"), ("--max", "2")):
            proc = run_cli("consume", *common, "--client", "odum", "--group", "paged", *args, "--format", "json",
                           "--idle-exit", "5", env=env)
            assert proc.returncode == 0, proc.stderr
            taken.append([json.loads(line)["signal_id"] for line in proc.stdout.splitlines()])
        assert [len(t) for t in taken] == [3, 2]
        assert taken[0] + taken[1] == [x["signal_id"] for x in lines[:5]]

        def listed():
            p = run_cli("signals", "list", *common, "--mode", "live", "--client", "odum", "--format", "json",
                        "--limit", "100000")
            return p.returncode == 0 and len(p.stdout.splitlines()) == outcome.signals

        wait_for(listed, 60, "the recorder to store every signal", interval=0.5)
    finally:
        recorder.send_signal(signal.SIGTERM)
        out, err = recorder.communicate(timeout=30)
    assert recorder.returncode == 0, err
    assert f"{outcome.signals:,} signals" in out


def test_feed_from_files_is_idempotent(root):
    import polars as pl

    from tests.integration.redis.helpers import bars

    folder = root / "var" / "data" / "5m"
    folder.mkdir(parents=True)
    pl.concat(bars("SOLUSD", 120)).write_parquet(folder / "SOLUSD.parquet")
    common = ("feed", "--env", "local-integration", "--root", str(root), "--source", "files", "--speed", "0",
              "--symbols", "SOLUSD")
    first, again = run_cli(*common), run_cli(*common)
    assert first.returncode == 0 and "published 120 bars (0 already there)" in first.stdout, first.stderr
    assert again.returncode == 0 and "published 0 bars (120 already there)" in again.stdout, again.stderr
    assert connect(load_config("local-integration", "live", root=root)).xlen(KEYS.bars("SOLUSD", "5m")) == 120
