"""The recorder's metrics and health (local-integration): `start --mode mock` on a private redis-server —
workers write the internal streams, the manager's recorder stores them — scraped through real HTTP and
parsed with prometheus_client's parser: counts equal to the store's, the dead-letter stream's length,
readiness while Redis is away."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml

from signalgen.brokers.redis import connect
from signalgen.config.loader import load_config
from tests.integration.redis.helpers import KEYS, REPO
from tests.polling import wait_for as _wait_for
from tests.unit.process.test_health import get, scrape, states
from tests.unit.process.test_manager import FAST, client_yaml

pytestmark = pytest.mark.integration  # a private redis-server, a manager and its worker processes

wait_for = partial(_wait_for, interval=0.2)  # each poll is a scrape
WORKERS = {"odum.momentum_v1.BTCUSD.5m", "odum.momentum_v1.SOLUSD.5m"}


@pytest.fixture
def mock_root(tmp_path: Path, redis_server) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    for folder in ("environments", "modes"):
        subprocess.run(["cp", "-r", str(REPO / folder), str(root / folder)], check=True)
    (root / "registry").symlink_to(REPO / "registry")  # mock inference: the model cards
    (root / "clients").mkdir()
    (root / "clients" / "odum.yaml").write_text(client_yaml("odum", ["BTCUSD", "SOLUSD"]))
    env_file = root / "environments" / "local-integration.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["messaging"]["url"] = redis_server.url
    env["process"] = {**env["process"], **FAST, "heartbeat_threshold_s": 10.0}
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    return root


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args, "--env", "local-integration",
                           "--root", str(root)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_recorders_metrics_and_readiness(mock_root: Path, redis_server) -> None:
    root = mock_root
    out = root / "manager.out"
    with out.open("ab") as f:
        manager = subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "start", "--env",
                                    "local-integration", "--mode", "mock", "--inference", "mock", "--root", str(root)],
                                   cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=f,
                                   stderr=subprocess.STDOUT)
    try:
        base = wait_for(lambda: re.findall(r"metrics: (http://127\.0\.0\.1:\d+)/metrics", out.read_text()), 60,
                        "the metrics URL in the manager's log")[0]
        wait_for(lambda: states(base) == dict.fromkeys(WORKERS, "RUNNING"), 60, "2 RUNNING workers")
        wait_for(lambda: sum(scrape(base).get("signalgen_signals_total", {}).values()) > 0, 60, "signals stored")
        assert get(base + "/healthz")[:2] == (200, "ok\n") and get(base + "/readyz")[:2] == (200, "ready\n")

        # a poison bar set aside by a live worker: the dead-letter stream's length, read at scrape time
        r = connect(load_config("local-integration", "mock", root=root))
        assert scrape(base)["signalgen_dead_letter_entries"] == {(): 0.0}
        r.xadd(KEYS.deadletter, {"v": "1", "reason": "bad_bar"})
        assert scrape(base)["signalgen_dead_letter_entries"] == {(): 1.0}

        assert cli(root, "stop-strategy", "--strategy", "odum").returncode == 0
        wait_for(lambda: states(base) == dict.fromkeys(WORKERS, "STOPPED"), 30, "2 STOPPED workers")
        # the recorder drains what the workers sent before they stopped: then the counts stand still
        wait_for(lambda: scrape(base)["signalgen_writer_lag_seconds"] == {(): 0.0}, 30, "nothing left to store")
        counts = json.loads(cli(root, "signals", "count", "--mode", "mock", "--by", "mode", "-o", "json").stdout)
        signals, rejections = counts["total"]["signals"], counts["total"]["rejections"]
        m = scrape(base)
        assert sum(m["signalgen_signals_total"].values()) == signals > 0
        assert sum(m["signalgen_bars_total"].values()) == signals + rejections
        assert {dict(k)["symbol"] for k in m["signalgen_signals_total"]} == {"BTCUSD", "SOLUSD"}
        assert sum(m["signalgen_decision_latency_seconds_count"].values()) == signals + rejections
        assert sum(m["signalgen_writer_batch_rows_sum"].values()) == signals + rejections

        # Redis away: the recorder cannot take decisions, so the process is not ready; alive all the same
        redis_server.stop()
        wait_for(lambda: get(base + "/readyz")[0] == 503, 30, "unready without Redis")
        assert "Redis unreachable" in get(base + "/readyz")[1] and get(base + "/healthz")[0] == 200
        redis_server.start()
        wait_for(lambda: get(base + "/readyz")[0] == 200, 30, "ready again")
        manager.send_signal(signal.SIGTERM)
        assert manager.wait(60) == 0
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait(10)
