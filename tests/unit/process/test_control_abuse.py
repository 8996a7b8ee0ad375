"""The control plane under hostile rows: a real manager and fleet, command rows inserted with plain SQL
as any program may. Every row ends completed or failed with a bounded message; the manager and its
workers never notice."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from signalgen.process.manager import COMMANDS, matches
from signalgen.storage.control import ControlStore
from tests.unit.process.test_manager import (ODUM_BTC, ODUM_SOL, client_yaml, make_root, managers, pids,  # noqa: F401
                                             sqlite_path, start, until)

COMMENTED = "# odum's file: this comment must survive add-strategy\n" + client_yaml("odum", ["BTCUSD", "SOLUSD"])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path, {"odum": COMMENTED})


def insert(path: Path, rows: list[tuple]) -> list[int]:
    """(strategy_id, command, parameters_json[, created_at]) rows, as another program writes them."""
    ids = []
    with sqlite3.connect(path, timeout=10) as con:
        for row in rows:
            cols = "strategy_id, command, parameters_json" + (", created_at" if len(row) > 3 else "")
            ids.append(con.execute(f"INSERT INTO strategy_commands ({cols}) VALUES ({', '.join('?' * len(row))})",
                                   row).lastrowid)
    return ids


def settled(m, ids: list[int], timeout: float = 60) -> dict[int, dict]:
    """The rows once none of `ids` is pending."""
    def rows() -> dict[int, dict]:
        found = m.query(f"SELECT * FROM strategy_commands WHERE id IN ({', '.join(map(str, ids))})")
        return {r["id"]: r for r in found}
    until(lambda: all(r["status"] != "pending" for r in rows().values()), timeout,
          lambda: [r["id"] for r in rows().values() if r["status"] == "pending"][:20])
    return rows()


def assert_fleet_untouched(m, before: dict[str, int]) -> None:
    assert m.proc.poll() is None, m.output()[-2000:]
    rows = m.instances()
    assert {w: r["pid"] for w, r in rows.items()} == before
    assert all(r["state"] == "RUNNING" and r["restarts"] == 0 for r in rows.values()), rows


def test_a_deeply_nested_row_fails_alone_and_the_fleet_runs_on(root: Path, managers) -> None:
    # this row crashed the manager (RecursionError in pending()) and every worker died with it
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    before = pids(m)
    [cid] = insert(m.store, [(None, "add-strategy", "[" * 2000 + "]" * 2000)])
    row = settled(m, [cid])[cid]
    assert row["status"] == "failed" and "nests deeper than 32 levels" in row["result_json"], row
    good = m.command(m.submit("pause", "nobody"))  # the manager still answers
    assert good["status"] == "failed" and "no worker matches" in good["result_json"]
    assert_fleet_untouched(m, before)
    assert m.stop() == 0


def test_poison_rows_left_pending_do_not_stop_the_next_manager(root: Path, managers) -> None:
    # a row with created_at 'yesterday' stopped the manager from starting (ValueError); a deep one crashed it
    path = sqlite_path(root)
    ControlStore(path).pending()  # the tables, as a previous manager left them
    ids = insert(path, [(None, "reload", "[" * 2000 + "]" * 2000), (ODUM_BTC, "pause", "{}", "yesterday"),
                        (ODUM_BTC, "pause", "{}", "2001-01-01T00:00:00Z")])
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    rows = settled(m, ids)
    reasons = [json.loads(rows[i]["result_json"])["error"] for i in ids]
    assert [rows[i]["status"] for i in ids] == ["failed"] * 3
    assert "nests deeper" in reasons[0] and "created_at is not an ISO 8601 time: 'yesterday'" in reasons[1]
    assert "submitted before this manager started" in reasons[2]
    assert m.stop() == 0


@pytest.mark.parametrize("client", ["../../other/clients/odum", "ABSOLUTE"])
def test_add_strategy_cannot_write_outside_clients(root: Path, managers, client: str) -> None:
    # this rewrote ../../other/clients/odum.yaml (and dropped its comments)
    outside = root.parent / "other" / "clients" / "odum.yaml"  # = root/clients/../../other/clients
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_text(COMMENTED)
    if client == "ABSOLUTE":
        client = str(outside.with_suffix(""))
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    before = pids(m)
    strategy = client_yaml("x", ["ETHUSD"], strategy="breakout_v1").split("strategies:\n", 1)[1]
    [cid] = insert(m.store, [(None, "add-strategy", json.dumps({"client": client, "config": strategy}))])
    row = settled(m, [cid])[cid]
    assert row["status"] == "failed" and "is not a safe name" in row["result_json"], row
    assert outside.read_text() == COMMENTED
    assert (root / "clients" / "odum.yaml").read_text() == COMMENTED
    assert_fleet_untouched(m, before)
    assert m.stop() == 0


def test_add_strategy_keeps_the_client_files_comments(root: Path, managers) -> None:
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    strategy = client_yaml("x", ["ETHUSD"], strategy="breakout_v1").split("strategies:\n", 1)[1]
    [cid] = insert(m.store, [(None, "add-strategy", json.dumps({"client": "odum", "config": strategy}))])
    row = settled(m, [cid])[cid]
    assert row["status"] == "completed", row
    assert json.loads(row["result_json"])["started"] == ["odum.breakout_v1.ETHUSD.5m"]
    text = (root / "clients" / "odum.yaml").read_text()
    assert text.startswith(COMMENTED) and "breakout_v1" in text[len(COMMENTED):]
    m.wait_states("RUNNING", count=3)
    assert m.stop() == 0


def test_echoed_input_is_clipped_in_results_and_log_lines(root: Path, managers) -> None:
    # a 5 MB strategy_id gave a 5 MB result_json and a 5 MB log line
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    ids = insert(m.store, [("x" * 5_000_000, "pause", "{}"), ("y" * 4000, "pause", "{}"),
                           (ODUM_BTC, "z" * 4000, "{}")])
    rows = settled(m, ids)
    for cid in ids:
        assert rows[cid]["status"] == "failed" and len(rows[cid]["result_json"]) < 600, rows[cid]["result_json"][:300]
    assert "5,000,000 characters" in rows[ids[0]]["result_json"]
    assert "no worker matches 'yyyy" in rows[ids[1]]["result_json"] and "(4,000 characters)" in rows[ids[1]]["result_json"]
    assert "unknown command 'zzz" in rows[ids[2]]["result_json"]
    assert m.stop() == 0
    assert max(map(len, m.output().splitlines())) < 1000


HOSTILE_TEXT = ["", " ", "*", "?", "[", "]", "[!", "\x00", "\n", "'", '"', "\\", "%", "..", "../../etc/passwd",
                "/etc/passwd", "odum.*.NOPE.*", "é" * 100, "\U0001f600", "x" * 5000, "-1", "NULL",
                "; DROP TABLE strategy_commands; --", "$(reboot)", "odum..", ".", "odum.momentum_v1.BTCUSD.5m.x"]


def hostile_row(rnd: random.Random, workers: list[str]) -> tuple:
    """One random row of hostile content that no legitimate command could be read into: it names no
    worker of the fleet, and `stop` (the one command with no target) is left out."""
    def text() -> str | None:
        pick = rnd.random()
        if pick < 0.1:
            return None
        if pick < 0.6:
            return rnd.choice(HOSTILE_TEXT)
        chars = (rnd.choice([rnd.randrange(32, 127), rnd.randrange(0, 0x2FFFF)]) for _ in range(rnd.randrange(1, 80)))
        return "".join(chr(c) for c in chars if not 0xD800 <= c < 0xE000)  # SQLite text is UTF-8
    command = rnd.choice([c for c in COMMANDS if c != "stop"] + ["", "STOP", "pause ", "x" * 5000, "rm -rf"])
    strategy_id = text()
    while strategy_id is not None and any(matches(w, strategy_id) for w in workers):
        strategy_id = text()
    params = rnd.choice([
        "{}", "[" * rnd.randrange(30, 3000) + "]" * 10, '{"client": "../../x", "config": "id: a"}',
        json.dumps({"client": text(), "config": text()}), json.dumps({"client": "odum", "config": text()}),
        "not json", "null", "[]", '{"a": ' * 40 + "1" + "}" * 40, json.dumps({"config": "x" * 70_000}),
        '{"client": "odum", "config": "- [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"}',
        '{"client": "odum", "config": "a: &a [*a]"}',
    ])
    created = rnd.choice([None, None, "yesterday", "", "2100-01-01T00:00:00Z", "2026-13-45", "1" * 5000])
    row = (strategy_id, command, params)
    return row + ((created,) if created is not None else ())


def test_a_thousand_hostile_rows_leave_the_manager_up_and_no_worker_restarted(root: Path, managers) -> None:
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    before = pids(m)
    rnd = random.Random(16)
    rows = [hostile_row(rnd, list(before)) for _ in range(1000)]
    ids = insert(m.store, rows)
    done = settled(m, ids, timeout=180)
    assert {r["status"] for r in done.values()} <= {"completed", "failed"}
    for r in done.values():
        result = json.loads(r["result_json"])
        assert r["status"] == "completed" or len(result["error"]) < 400, result["error"][:300]
        assert len(r["result_json"]) < 1000
    assert sum(r["status"] == "failed" for r in done.values()) >= 900  # hostile: nearly all refused
    assert_fleet_untouched(m, before)
    assert m.command(m.submit("pause", ODUM_SOL))["status"] == "completed"  # and it still obeys
    assert m.stop() == 0


def one_line_answer(root: Path, *args: str):
    from tests.unit.process.test_manager import cli

    proc = cli(root, *args)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc


def test_a_deleted_control_store_is_recreated_and_the_manager_stays_reachable(root: Path, managers) -> None:
    # deleting it left the manager running but unreachable: it kept writing an unlinked file
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    before = pids(m)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{m.store}{suffix}").unlink(missing_ok=True)
    until(lambda: len(m.instances()) == 2, 20, "every instance row back in a new store")
    assert one_line_answer(root, "pause", "--strategy", ODUM_BTC).returncode == 0
    m.wait_states({ODUM_BTC: "PAUSED"}, timeout=10)
    assert "deleted" in m.output() and m.proc.poll() is None
    assert {w: r["pid"] for w, r in m.instances().items()} == before
    assert m.stop() == 0


def test_a_corrupt_control_store_is_moved_aside_and_every_command_answers_in_one_line(root: Path, managers) -> None:
    # a corrupt one made `pause` print a 45-line traceback
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    before = pids(m)
    with open(m.store, "r+b") as f:  # overwritten in place (same file): the manager's WAL hid it
        f.write(b"this is not a database " * 400)
    one_line_answer(root, "pause", "--strategy", ODUM_BTC)  # fails or works: one line either way
    until(lambda: list(m.store.parent.glob("control.sqlite.corrupt-*")), 20, m.output)
    until(lambda: len(m.instances()) == 2, 20, "every instance row in the new store")
    assert one_line_answer(root, "pause", "--strategy", ODUM_SOL).returncode == 0
    m.wait_states({ODUM_SOL: "PAUSED"}, timeout=10)
    assert "damaged" in m.output() and m.proc.poll() is None
    assert {w: r["pid"] for w, r in m.instances().items()} == before
    assert m.stop() == 0


def test_a_refused_second_daemon_start_touches_nothing_of_the_running_manager(root: Path, managers) -> None:
    # it deleted the running manager's pidfile, appended its own error to that manager's log and
    # printed that manager's log lines as its own
    from tests.unit.process.test_manager import cli, gone

    logs = root / "var" / "local-dev" / "logs"
    pidfile = root / "var" / "local-dev" / "manager.pid"
    first = cli(root, "start", "--inference", "mock", "--daemon")
    assert first.returncode == 0, first.stderr
    pid = int(pidfile.read_text())
    try:
        until(lambda: "manager started" in (logs / "manager.log").read_text(), 30, "the first manager's log")
        second = cli(root, "start", "--inference", "mock", "--daemon")
        assert second.returncode == 1 and f"a manager (pid {pid}) already runs" in second.stderr, second
        assert len((second.stdout + second.stderr).strip().splitlines()) == 1
        assert pidfile.read_text().strip() == str(pid)
        log = (logs / "manager.log").read_text()
        assert "already runs" not in log and "manager started" not in second.stderr
        assert not (logs / "manager.out").exists() or "already runs" not in (logs / "manager.out").read_text()
    finally:
        assert cli(root, "stop").returncode == 0
        until(lambda: gone(pid), 30, "the manager gone")
    assert not pidfile.exists()


def test_a_daemon_that_dies_during_start_up_is_reported_with_exit_1(root: Path) -> None:
    # the manager died after writing its pidfile (a poison row, a store it cannot open) and `start
    # --daemon` still printed "manager started: pid N" and exited 0
    from tests.unit.process.test_manager import cli

    store = root / "var" / "local-dev" / "signalgen.duckdb"
    store.mkdir(parents=True)  # a folder where the store's file should be: it cannot be opened
    proc = cli(root, "start", "--inference", "mock", "--daemon")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the manager exited during start-up with code 1" in proc.stderr and "signalgen.duckdb" in proc.stderr
    assert "manager started" not in proc.stdout
    assert not (root / "var" / "local-dev" / "manager.pid").exists()


def test_manager_and_worker_logs_rotate_at_the_configured_size(tmp_path: Path, managers) -> None:
    # manager.log grew without bound (a plain FileHandler); worker logs kept 3 files, not configurable
    from tests.unit.process.test_manager import cli, gone

    root = make_root(tmp_path, {"odum": COMMENTED}, log_max_mb=0.001, log_backups=2)
    logs = root / "var" / "local-dev" / "logs"
    assert cli(root, "start", "--inference", "mock", "--daemon").returncode == 0
    pid = int((root / "var" / "local-dev" / "manager.pid").read_text())
    try:
        # every pause and resume logs two state changes per worker: enough lines to rotate twice
        for _ in range(40):
            assert cli(root, "pause", "--strategy", "odum").returncode == 0
            resumed = cli(root, "resume", "--strategy", "odum")
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            if (logs / "manager.log.2").exists():
                break
    finally:
        assert cli(root, "stop").returncode == 0
        until(lambda: gone(pid), 30, "the manager gone")
    assert (logs / "manager.log.2").exists() and not (logs / "manager.log.3").exists()
    for path in [logs / "manager.log", logs / "manager.log.1", *logs.glob(f"{ODUM_BTC}.log*")]:
        assert path.stat().st_size <= 0.001 * 2**20 + 1000, path
