"""A real manager (`start`, forkserver workers) on a PostgreSQL control store: the CLI against it,
its lease (a second start refused, a kill -9 taken over after the TTL), and the store going down
and coming back while the fleet runs on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.integration.postgres.test_control_postgres import query
from tests.postgres import PrivateServer
from tests.unit.process.test_manager import cli, client_yaml, make_root, managers, start, until  # noqa: F401

pytest.importorskip("psycopg", reason="the postgres extra is not installed")


def pg_root(tmp_path: Path, **process) -> Path:
    """A local-dev root whose control store is PostgreSQL (the DSN from SIGNALGEN_CONTROL_DSN)."""
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "ETHUSD"])}, **process)
    env_file = root / "environments" / "local-dev.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["control"] = {"type": "postgres", "path": "var/local-dev/control.sqlite", "lease_ttl_s": 3}
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    return root


def states(dsn: str) -> dict[str, str]:
    try:
        return {r["id"]: r["state"] for r in query(dsn, "SELECT id, state FROM strategy_instances")}
    except Exception:  # noqa: BLE001 - no table yet, or the server stopped
        return {}


def kill_tree(pid: int) -> None:
    tree = psutil.Process(pid).children(recursive=True)
    psutil.Process(pid).kill()
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_the_cli_runs_the_fleet_through_postgresql_and_a_killed_managers_lease_is_taken_over(
        tmp_path: Path, pg_dsn: str, managers) -> None:  # noqa: F811
    root = pg_root(tmp_path)
    m = start(managers, root)
    until(lambda: list(states(pg_dsn).values()) == ["RUNNING"] * 2, 90, lambda: m.output()[-3000:])
    status = cli(root, "status", "--output", "json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert [(x["shard"], x["pid"], x["live"]) for x in doc["leases"]] == [("0/1", m.pid, True)]
    assert {(w["worker"], w["state"], w["shard"]) for w in doc["workers"]} == {
        ("odum.momentum_v1.BTCUSD.5m", "RUNNING", "0/1"), ("odum.momentum_v1.ETHUSD.5m", "RUNNING", "0/1")}
    until(lambda: len(query(pg_dsn, "SELECT * FROM heartbeats")) == 2, 30, "heartbeats mirrored")

    paused = cli(root, "pause", "--strategy", "odum.*")
    assert paused.returncode == 0 and "pause: 2 worker(s)" in paused.stdout, paused
    assert set(states(pg_dsn).values()) == {"PAUSED"}
    [parent] = query(pg_dsn, "SELECT result_json FROM strategy_commands WHERE parent_id IS NULL")
    assert list(json.loads(parent["result_json"])["children"]) == ["0/1"]
    assert cli(root, "resume", "--strategy", "odum.*").returncode == 0
    missing = cli(root, "pause", "--strategy", "nobody.*")
    assert missing.returncode == 1 and "shard 0/1: no worker matches 'nobody.*'" in missing.stderr, missing

    second = cli(root, "start", "--inference", "mock", timeout=60)
    assert second.returncode == 1 and f"a manager (pid {m.pid} on " in second.stderr, second
    assert "already holds shard 0/1" in second.stderr and len(second.stderr.strip().splitlines()) == 1

    kill_tree(m.pid)
    killed = time.monotonic()
    until(lambda: cli(root, "status").returncode == 3, 20, "status sees the lease expire")
    assert time.monotonic() - killed > 1.5  # the lease outlived its holder until the TTL (3 s)
    shown = json.loads(cli(root, "status", "--output", "json").stdout)
    assert {w["state"] for w in shown["workers"]} == {"UNKNOWN"} and shown["leases"][0]["live"] is False
    again = start(managers, root)
    until(lambda: [x["pid"] for x in json.loads(cli(root, "status", "--output", "json").stdout)["leases"]
                   if x["live"]] == [again.pid], 90, lambda: again.output()[-3000:])
    def own_running() -> bool:  # rows the new manager wrote, of its own workers
        rows = query(pg_dsn, "SELECT state, pid FROM strategy_instances")
        children = {p.pid for p in psutil.Process(again.pid).children(recursive=True)}
        return len(rows) == 2 and all(r["state"] == "RUNNING" and r["pid"] in children for r in rows)
    until(own_running, 90, lambda: again.output()[-3000:])
    stopped = cli(root, "stop", timeout=120)
    assert stopped.returncode == 0, stopped
    assert again.proc.wait(60) == 0 and query(pg_dsn, "SELECT * FROM manager_leases") == []


def test_the_fleet_runs_on_while_the_store_is_down_and_the_manager_resumes_writing_it(
        tmp_path: Path, monkeypatch, managers) -> None:  # noqa: F811
    server = PrivateServer().init()
    try:
        monkeypatch.setenv("SIGNALGEN_CONTROL_DSN", server.dsn)
        root = pg_root(tmp_path, heartbeat_threshold_s=3.0)
        m = start(managers, root)
        until(lambda: list(states(server.dsn).values()) == ["RUNNING"] * 2, 90, lambda: m.output()[-3000:])
        server.stop()
        time.sleep(8)  # over twice the heartbeat threshold and the lease's TTL
        assert m.proc.poll() is None, m.output()[-3000:]
        server.start()
        back = time.time()

        def fresh() -> bool:
            try:
                beats = query(server.dsn, "SELECT ts FROM heartbeats")
            except Exception:  # noqa: BLE001
                return False
            return len(beats) == 2 and all(b["ts"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(back))
                                           for b in beats)
        until(fresh, 30, lambda: m.output()[-3000:])
        rows = query(server.dsn, "SELECT state, restarts FROM strategy_instances")
        assert [(r["state"], r["restarts"]) for r in rows] == [("RUNNING", 0)] * 2  # no worker killed meanwhile
        assert "control store" in m.output()  # the outage was logged
        assert cli(root, "stop", timeout=120).returncode == 0
        assert m.proc.wait(60) == 0
    finally:
        server.remove()
