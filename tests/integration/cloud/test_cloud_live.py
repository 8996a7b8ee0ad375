"""Live on cloud-dev, end to end: `start --mode live` (worker processes pulling bars from their own
subscriptions, publishing to Pub/Sub; the manager's recorder storing in BigQuery and publishing on to
the clients' topics), `feed` publishing bars, `consume` reading a client's signals through its own
subscription; a worker killed with SIGKILL resumes from its checkpoint and warm-up snapshot in the
control store: every bar is decided exactly once, and the decisions equal a worker's that never
stopped (a historical run over the same bars)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from signalgen.config.loader import load_environment
from signalgen.storage.control import ControlStore, control_for
from tests.integration.cloud.conftest import cli
from tests.integration.cloud.test_cloud_dev import decisions, wait_for
from tests.roots import REPO

pytestmark = pytest.mark.integration  # the Pub/Sub and BigQuery emulators, a manager and its workers

FAST = {"heartbeat_interval_s": 0.2, "heartbeat_threshold_s": 10.0, "backoff_initial_s": 0.2, "backoff_max_s": 2.0,
        "stop_timeout_s": 10.0, "resource_sample_s": 0.5, "max_recovery_attempts": 3}
KILLED = "odum.momentum_v1.SOLUSD.5m"
SHORT = ["incomplete_window", "nan_feature"]  # a bar decided without the history its features need


def live_root(cloud: dict) -> Path:
    """odum alone (internal routing), two symbols; short process intervals; bars may run a day ahead."""
    root = cloud["root"]
    for other in ("christian", "ikenna"):
        (root / "clients" / f"{other}.yaml").unlink()
    (root / "clients" / "odum.yaml").write_text(yaml.safe_dump({
        "id": "odum", "routing": "internal",
        "strategies": [{"id": "momentum_v1", "symbols": ["BTCUSD", "SOLUSD"], "timeframes": ["5m"],
                        "models": [{"model_id": "swing_high", "confidence_threshold": 0.55, "lookback_window": 60},
                                   {"model_id": "swing_low", "confidence_threshold": 0.55,
                                    "lookback_window": 60}]}]}, sort_keys=False))
    env_file = root / "environments" / "cloud-dev.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["messaging"]["max_ahead_s"] = 86_400.0  # `feed --speed 3000` runs bar time ahead of the wall clock
    env["process"] = {**env["process"], **FAST}
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    return root


def workers(root: Path, env: str = "cloud-dev") -> dict:
    """The instance rows of `env`'s control store (cloud-dev's: PostgreSQL, the test's database)."""
    with control_for(load_environment(env, root=root), root) as control:
        return {i["id"]: i for i in control.instances()}


def test_live_on_cloud_dev_feed_consume_kill_and_stop(cloud):
    root = live_root(cloud)
    env = {**os.environ, **cloud["vars"], "PYTHONPATH": str(REPO)}
    granted = cli(cloud, "clients", "grant", "--env", "cloud-dev", "--client", "odum")
    assert granted.returncode == 0, granted.stderr
    bindings = json.loads(granted.stdout)
    assert "odum" in json.dumps(bindings) and "christian" not in json.dumps(bindings)
    with (root / "manager.out").open("ab") as out:
        manager = subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "start", "--env", "cloud-dev",
                                    "--mode", "live", "--inference", "mock", "--root", str(root)],
                                   cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    feeder = None
    try:
        wait_for(lambda: len(w := workers(root)) == 2 and all(x["state"] == "RUNNING" for x in w.values()), 120,
                 "2 RUNNING live workers")
        # 40 bars that already ended, then 120 paced at 10 per wall second (5m bars at speed 3000)
        feeder = subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "feed", "--env", "cloud-dev",
                                   "--root", str(root), "--source", "synthetic", "--speed", "3000", "--backfill", "40",
                                   "--bars", "160"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        control = ControlStore(root / "var" / "cloud-dev" / "control.sqlite")
        wait_for(lambda: (s := control.worker_state("live", KILLED)) and len(s[1]) >= 30, 120,
                 "a checkpoint and a warm-up snapshot of the worker to kill")
        before = workers(root)[KILLED]
        os.kill(before["pid"], signal.SIGKILL)
        wait_for(lambda: (w := workers(root)[KILLED])["restarts"] == 1 and w["state"] == "RUNNING"
                 and w["pid"] != before["pid"], 60, "the killed worker restarted and RUNNING")
        out, err = feeder.communicate(timeout=180)
        assert feeder.returncode == 0, err
        assert "published 320 bars" in out  # 2 series x 160 bars
        wait_for(lambda: sum(decisions(cloud, "cloud-dev", k, "odum").height for k in ("signals", "rejections"))
                 >= 320, 120, "every bar's decision in BigQuery")
        signals = decisions(cloud, "cloud-dev", "signals", "odum")
        assert signals.height > 3, "too few signals to prove anything"
        consumed = cli(cloud, "consume", "--env", "cloud-dev", "--client", "odum", "--format", "json", "--max",
                       str(signals.height), "--idle-exit", "10")
        assert consumed.returncode == 0, consumed.stderr
        lines = [json.loads(line) for line in consumed.stdout.splitlines()]
        assert {x["client_id"] for x in lines} == {"odum"} and {x["mode"] for x in lines} == {"live"}
        assert sorted(x["signal_id"] for x in lines) == sorted(signals["signal_id"].to_list())
        stopped = cli(cloud, "stop", "--env", "cloud-dev")
        assert stopped.returncode == 0, stopped.stderr
        assert manager.wait(timeout=120) == 0
    finally:
        for p in (feeder, manager):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    assert "manager stopped" in (root / "manager.out").read_text()
    # every bar of each series decided exactly once: none lost to the kill, none repeated by the restart
    both = pl.concat([decisions(cloud, "cloud-dev", k, "odum").select("symbol", "bar_time")
                      for k in ("signals", "rejections")])
    assert both.height == both.unique().height == 320, both.height
    assert workers(root)[KILLED]["restarts"] == 1
    # the restart lost no warm-up: the killed worker's bars lacking history are the same bar times as the
    # untouched worker's (both series were fed the same way), and its decisions after the restart equal
    # those of a worker that never stopped: a historical run over the same bars (past the first bars'
    # warm-up, and leaving out the backfill's bars, stale on the wall clock)
    restarted_at = workers(root)[KILLED]["started_at"]
    rejections = decisions(cloud, "cloud-dev", "rejections", "odum", drop=["run_id", "latency_us"])

    def short_of_history(symbol: str) -> set:
        rows = rejections.filter((pl.col("symbol") == symbol)
                                 & pl.col("reasons").list.eval(pl.element().is_in(SHORT)).list.any())
        return set(rows["bar_time"].to_list())

    assert short_of_history("SOLUSD") == short_of_history("BTCUSD")
    signals = decisions(cloud, "cloud-dev", "signals", "odum", drop=["run_id", "latency_us"])
    live = pl.concat([signals.with_columns(reasons=pl.lit([], pl.List(pl.String))), rejections], how="diagonal").filter(pl.col("symbol") == "SOLUSD")
    comparable = live.filter(~pl.col("reasons").list.eval(pl.element().is_in(SHORT + ["stale_data"])).list.any())
    assert comparable.height >= 40, comparable.height
    after_restart = comparable.filter(pl.col("generated_at") > datetime.fromisoformat(restarted_at.replace("Z", "+00:00")))
    assert after_restart.height >= 10, "too few decisions after the restart to prove anything"
    first, last = comparable["bar_time"].min(), comparable["bar_time"].max()
    done = cli(cloud, "run", "--env", "local-dev", "--mode", "historical", "--inference", "mock", "--client", "odum",
               "--start", str(first - timedelta(minutes=5)), "--end", str(last))
    assert done.returncode == 0, done.stderr[-2000:]
    hist = pl.concat([decisions(cloud, "local-dev", "signals", "odum").with_columns(reasons=pl.lit([], pl.List(pl.String))),
                      decisions(cloud, "local-dev", "rejections", "odum")], how="diagonal")
    keep = ["symbol", "bar_time", "direction", "confidence", "reasons"]
    got = comparable.select(keep).sort("bar_time")
    want = hist.filter(pl.col("symbol") == "SOLUSD").join(got.select("bar_time"), on="bar_time").select(keep).sort("bar_time")
    assert_frame_equal(got, want)


def test_live_on_cloud_dev_decides_what_live_on_local_integration_decides(cloud, redis_url):
    """The same bars fed to a cloud-dev fleet (Pub/Sub, BigQuery) and a local-integration fleet (Redis,
    DuckDB) at once: every decision is the same, column for column (bars an hour ahead of the clock,
    so no bar's staleness depends on when either fleet decided it)."""
    root = live_root(cloud)
    env_file = root / "environments" / "local-integration.yaml"
    li = yaml.safe_load(env_file.read_text())
    li["messaging"]["url"], li["messaging"]["max_ahead_s"] = redis_url, 86_400.0
    li["process"] = {**li["process"], **FAST}
    env_file.write_text(yaml.safe_dump(li, sort_keys=False))
    env = {**os.environ, **cloud["vars"], "PYTHONPATH": str(REPO)}
    plain = {**os.environ, "PYTHONPATH": str(REPO)}  # SIGNALGEN_* variables would apply to local-integration too
    start = (datetime.now(timezone.utc) + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    managers = {}
    try:
        for name, variables in (("cloud-dev", env), ("local-integration", plain)):
            with (root / f"{name}.out").open("ab") as out:
                managers[name] = subprocess.Popen(
                    [sys.executable, str(REPO / "strategy_runner.py"), "start", "--env", name, "--mode", "live",
                     "--inference", "mock", "--root", str(root)], cwd=root, env=variables, stdout=out,
                    stderr=subprocess.STDOUT)
        for name in managers:
            wait_for(lambda n=name: len(w := workers(root, n)) == 2 and all(x["state"] == "RUNNING" for x in w.values()),
                     120, f"2 RUNNING workers on {name}")
        for name, variables in (("cloud-dev", env), ("local-integration", plain)):
            fed = subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), "feed", "--env", name, "--root",
                                  str(root), "--source", "synthetic", "--speed", "0", "--start", start.isoformat(),
                                  "--bars", "150", "--backfill", "0"], cwd=root, env=variables, capture_output=True,
                                 text=True, timeout=300)
            assert fed.returncode == 0, fed.stderr[-2000:]
            assert "published 300 bars" in fed.stdout, fed.stdout
        wait_for(lambda: all(sum(decisions(cloud, name, k, "odum").height for k in ("signals", "rejections")) >= 300
                             for name in managers), 180, "every bar decided on both")
        for name, variables in (("cloud-dev", env), ("local-integration", plain)):
            stopped = subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), "stop", "--env", name, "--root",
                                      str(root)], cwd=root, env=variables, capture_output=True, text=True, timeout=120)
            assert stopped.returncode == 0, stopped.stderr
            assert managers[name].wait(timeout=120) == 0
    finally:
        for p in managers.values():
            if p.poll() is None:
                p.kill()
    for kind in ("signals", "rejections"):
        cloud_rows, redis_rows = (decisions(cloud, name, kind, "odum") for name in ("cloud-dev", "local-integration"))
        assert set(cloud_rows["mode"]) == {"live"}
        assert_frame_equal(cloud_rows, redis_rows)
    assert decisions(cloud, "cloud-dev", "signals", "odum").height > 3, "too few signals to prove anything"
