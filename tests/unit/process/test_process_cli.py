"""The manager's commands as an operator types them: `start` (foreground and --daemon), `status`,
`pause`/`resume`/`restart`/`stop-strategy`/`stop`, `reload`, `add-strategy`, `logs`, `monitor`.
Real manager and worker processes; mock inference; short intervals from the private root's YAML."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import duckdb
import psutil
import pytest
import yaml

from tests.unit.process.conftest import STORE
from tests.unit.process.test_manager import (BEA_BTC, BEA_ETH, ODUM_BTC, ODUM_SOL, client_yaml, cli, gone,
                                             make_root, managers, pids, start, until)  # noqa: F401 (fixture)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "SOLUSD"]),
                                "bea": client_yaml("bea", ["BTCUSD", "ETHUSD"])})


def status(root: Path, code: int | None = None) -> dict:
    """`status` as JSON; exit 0 (all as they should be) or 3 (FATAL, BACKOFF, UNKNOWN or no manager),
    exactly `code` when given."""
    proc = cli(root, "status", "--output", "json")
    assert proc.returncode in ((0, 3) if code is None else (code,)), proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_status_pause_resume_restart_and_stop_from_the_cli(root: Path, managers) -> None:
    m = start(managers, root)
    m.wait_states("RUNNING", count=4)
    until(lambda: all(w["signals"] is not None for w in status(root)["workers"]), 30, "heartbeats in status")
    doc = status(root, 0)
    assert doc["manager_pid"] == m.pid and doc["manager"] == "running"
    rows = {w["worker"]: w for w in doc["workers"]}
    assert sorted(rows) == sorted([BEA_BTC, BEA_ETH, ODUM_BTC, ODUM_SOL])
    for w in rows.values():
        assert w["state"] == "RUNNING" and psutil.pid_exists(w["pid"]) and w["uptime_s"] >= 0
        assert w["last_heartbeat_s"] is not None and w["restarts"] == 0
        assert {"checkpoint", "signals", "errors"} <= set(w)
    table = cli(root, "status")
    assert table.returncode == 0 and f"pid {m.pid}" in table.stdout and ODUM_BTC in table.stdout
    assert "RUNNING" in table.stdout and "heartbeat" in table.stdout
    as_yaml = yaml.safe_load(cli(root, "status", "--output", "yaml").stdout)
    assert len(as_yaml["workers"]) == 4

    proc = cli(root, "pause", "--strategy", "bea.*")
    assert proc.returncode == 0, proc.stderr
    assert "pause: 2 worker(s)" in proc.stdout
    states = {w["worker"]: w["state"] for w in status(root)["workers"]}
    assert states[BEA_BTC] == states[BEA_ETH] == "PAUSED" and states[ODUM_BTC] == "RUNNING"
    assert psutil.Process(rows[BEA_BTC]["pid"]).status() == psutil.STATUS_STOPPED
    proc = cli(root, "resume", "--strategy", "bea")
    assert proc.returncode == 0, proc.stderr
    m.wait_states("RUNNING", count=4)

    proc = cli(root, "restart", "--strategy", ODUM_SOL)
    assert proc.returncode == 0, proc.stderr
    until(lambda: pids(m)[ODUM_SOL] not in (None, rows[ODUM_SOL]["pid"]), 30, "a new process")
    m.wait_states("RUNNING", count=4)
    assert gone(rows[ODUM_SOL]["pid"]) and pids(m)[ODUM_BTC] == rows[ODUM_BTC]["pid"]

    proc = cli(root, "stop-strategy", "--strategy", ODUM_SOL)
    assert proc.returncode == 0, proc.stderr
    m.wait_states({ODUM_SOL: "STOPPED"}, timeout=20)

    proc = cli(root, "pause", "--strategy", "nobody")
    assert proc.returncode == 1 and "no worker matches 'nobody'" in proc.stderr

    proc = cli(root, "stop")
    assert proc.returncode == 0, proc.stderr
    # `stop` answers once the manager has let go of the store: it opens for writing at once and
    # holds the manager's finished run, with what produced its bars (the mock preset: synthetic, seed 7)
    with duckdb.connect(str(root / STORE)) as con:
        assert con.execute("SELECT status, data_source, seed, json_extract_string(config, '$.mode.name') "
                           "FROM runs").fetchall() == [("stopped", "synthetic", 7, "mock")]
    assert m.proc.wait(30) == 0
    assert all(gone(p) for p in (r["pid"] for r in rows.values()))
    assert status(root, 3)["manager_pid"] is None  # no manager: exit 3
    runs = json.loads(cli(root, "runs", "list", "-o", "json").stdout)
    counts = json.loads(cli(root, "signals", "count", "--mode", "mock", "--by", "mode", "-o", "json").stdout)
    # the manager's run records what its writer stored (this fleet's mock decisions, none replayed)
    # and how long it ran
    assert [(r["mode"], r["status"]) for r in runs] == [("mock", "stopped")]
    assert runs[0]["signals"] == counts["total"]["signals"] > 0
    assert runs[0]["rejections"] == counts["total"]["rejections"] > 0
    assert runs[0]["bars"] == runs[0]["signals"] + runs[0]["rejections"] and runs[0]["bar_rejections"] == 0
    assert runs[0]["elapsed_s"] > 1 and runs[0]["bars_per_s"] > 0


def test_commands_without_a_manager_exit_1_and_leave_no_pending_row(root: Path) -> None:
    proc = cli(root, "pause", "--strategy", ODUM_BTC)
    assert proc.returncode == 1 and "no manager runs" in proc.stderr
    proc = cli(root, "status")
    assert proc.returncode == 3 and "not running" in proc.stdout


def test_status_of_a_frozen_manager_a_killed_one_and_the_next(root: Path, managers) -> None:
    m = start(managers, root, "odum")
    m.wait_states("RUNNING", count=2)
    until(lambda: cli(root, "status").returncode == 0, 30, lambda: status(root))
    old = {w["worker"]: w["pid"] for w in status(root, 0)["workers"]}
    os.kill(m.pid, signal.SIGSTOP)  # a stalled manager supervises nothing
    try:
        doc = status(root, 3)
        assert doc["manager"] == "frozen" and [w["state"] for w in doc["workers"]] == ["UNKNOWN", "UNKNOWN"]
    finally:
        os.kill(m.pid, signal.SIGCONT)
    until(lambda: cli(root, "status").returncode == 0, 30, lambda: status(root))

    m.kill()  # kill -9: its workers die with it, their rows stay behind
    until(lambda: all(gone(p) for p in old.values()), 30, "the workers died with their manager")
    doc = status(root, 3)
    assert doc["manager"] == "gone" and [(w["state"], w["last_state"], w["pid"]) for w in doc["workers"]] == [
        ("UNKNOWN", "RUNNING", None)] * 2
    assert all(w["reason"].startswith("manager gone; last RUNNING (pid ") for w in doc["workers"])
    table = cli(root, "status")
    assert table.returncode == 3 and "manager: not running" in table.stdout
    assert [line.split()[1] for line in table.stdout.splitlines() if line.startswith(tuple(old))] == ["UNKNOWN"] * 2

    # the next manager: from before it holds the store until its workers run, no row of the dead
    # one is shown as current
    m2 = start(managers, root, "odum")
    seen: list[dict] = []

    def running() -> bool:
        seen.append(doc := status(root))
        return doc["manager"] == "running" and [w["state"] for w in doc["workers"]] == ["RUNNING", "RUNNING"]

    until(running, 90, lambda: seen[-1])
    shown = [(w["state"], w["pid"]) for doc in seen for w in doc["workers"]]
    assert not [s for s in shown if s[0] != "UNKNOWN" and s[1] in old.values()], shown
    assert status(root, 0)["manager_pid"] == m2.pid
    assert m2.stop() == 0


def test_daemon_start_writes_a_pidfile_and_stop_ends_it(root: Path, managers) -> None:
    pidfile = root / "var" / "manager.pid"
    proc = cli(root, "start", "odum", "--inference", "mock", "--daemon", "--pidfile", str(pidfile))
    assert proc.returncode == 0, proc.stderr
    pid = int(pidfile.read_text())
    assert f"pid {pid}" in proc.stdout and psutil.pid_exists(pid)
    assert psutil.Process(pid).ppid() != os.getpid()  # detached: not our child
    until(lambda: [w["state"] for w in status(root)["workers"]] == ["RUNNING", "RUNNING"], 60,
          lambda: status(root))
    assert sorted(w["worker"] for w in status(root)["workers"]) == [ODUM_BTC, ODUM_SOL]
    workers = [w["pid"] for w in status(root)["workers"]]
    proc = cli(root, "stop")
    assert proc.returncode == 0, proc.stderr
    until(lambda: gone(pid) and all(gone(p) for p in workers), 30, "manager and workers gone")
    assert not pidfile.exists()
    log = (root / "var" / "local-dev" / "logs" / "manager.log").read_text()
    assert "manager started" in log and "manager stopped" in log


def test_start_refuses_a_second_manager_and_historical_mode(root: Path, managers) -> None:
    m = start(managers, root, "odum")
    m.wait_states("RUNNING", count=2)
    proc = cli(root, "start", "bea", "--inference", "mock")
    assert proc.returncode == 1 and f"a manager (pid {m.pid}) already runs" in proc.stderr
    proc = cli(root, "start", "--mode", "historical")
    assert proc.returncode == 2 and "--mode mock or simulation" in proc.stderr
    proc = cli(root, "start", "nobody")
    assert proc.returncode == 2
    assert m.stop() == 0


def test_start_live_without_a_broker_is_refused_before_any_worker_starts(root: Path) -> None:
    for daemon in ((), ("--daemon",)):
        proc = cli(root, "start", "--mode", "live", "--inference", "mock", *daemon, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == ["error: messaging.type: live mode reads bars from a broker, and environment "
                                            "local-dev has none (messaging.type local): use an environment with "
                                            "Redis, such as --env local-integration"]
    assert not (root / "var" / "local-dev" / "control.sqlite").exists()  # no manager, no worker ever started
    assert not (root / "var" / "local-dev" / "logs").exists()


def test_shard_takes_a_disjoint_share(root: Path, managers) -> None:
    seen = []
    for i in range(2):
        m = start(managers, root, "--shard", f"{i}/2")
        until(lambda: m.instances() and set(m.states().values()) == {"RUNNING"}, 60, m.output)
        seen.append(set(m.instances()))
        assert m.stop() == 0
    # the second manager's rows replaced the first's: each shard's workers are its own
    assert not (seen[0] & seen[1])


def test_reload_and_add_strategy_from_the_cli(root: Path, managers, tmp_path: Path) -> None:
    m = start(managers, root)
    m.wait_states("RUNNING", count=4)
    before = pids(m)
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"id": "breakout_v1", "symbols": ["SOLUSD"], "timeframes": ["5m"],
                                     "models": [{"model_id": "swing_high", "confidence_threshold": 0.7}]}))
    proc = cli(root, "add-strategy", "--client", "bea", "--config", str(extra))
    assert proc.returncode == 0, proc.stderr
    assert "started: 1 bea.breakout_v1.SOLUSD.5m" in proc.stdout
    # bea's exposure budget is now split three ways: its two other workers' configs changed too
    assert f"restarted: 2 {BEA_BTC} {BEA_ETH}" in proc.stdout
    assert "breakout_v1" in (root / "clients" / "bea.yaml").read_text()
    m.wait_states("RUNNING", count=5)
    assert pids(m)[ODUM_BTC] == before[ODUM_BTC]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"id": "broken_v1", "symbols": ["SOLUSD"], "timeframes": ["5m"],
                                   "models": [{"model_id": "no_such_model", "confidence_threshold": 0.7}]}))
    text = (root / "clients" / "bea.yaml").read_text()
    proc = cli(root, "add-strategy", "--client", "bea", "--config", str(bad))
    assert proc.returncode == 1 and "no_such_model" in proc.stderr
    assert (root / "clients" / "bea.yaml").read_text() == text  # restored
    proc = cli(root, "reload")
    assert proc.returncode == 0 and "unchanged: 5" in proc.stdout, proc.stdout
    assert m.stop() == 0


def test_logs_and_monitor(root: Path, managers) -> None:
    m = start(managers, root, "odum")
    m.wait_states("RUNNING", count=2)
    log = root / "var" / "local-dev" / "logs" / f"{ODUM_BTC}.log"
    until(lambda: log.exists() and log.stat().st_size > 0, 30, "a worker log")
    proc = cli(root, "logs", "--strategy", ODUM_BTC, "--tail", "3")
    assert proc.returncode == 0, proc.stderr
    assert 1 <= len(proc.stdout.splitlines()) <= 3
    assert proc.stdout.splitlines()[-1] in log.read_text()
    (log.parent / f"{BEA_BTC}.log").write_text("bea's line\n")  # another client's log: not shown
    proc = cli(root, "logs", "--strategy", "odum", "--tail", "1")  # two logs match: both, each under its name
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("==> ")] == [
        f"==> {log} <==", f"==> {log.with_name(ODUM_SOL + '.log')} <=="]
    assert "bea" not in proc.stdout
    until(lambda: len(m.query("SELECT DISTINCT worker_id FROM resources")) == 2, 30, "resource samples")
    proc = cli(root, "monitor", "--interval", "0.3", "--count", "2")
    assert proc.returncode == 0, proc.stderr
    assert ODUM_BTC in proc.stdout and "uss MB" in proc.stdout and "cpu %" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if ODUM_BTC in line)
    assert "RUNNING" in row and float(row.split("│")[6]) > 0  # uss MB
    assert m.stop() == 0
