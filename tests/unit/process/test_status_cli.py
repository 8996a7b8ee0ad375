"""`status`, `events` and `logs` read what a manager left: the control store, the lock file and the log
folder. Here a test writes those itself (a real ControlStore, a lock held by this process as a
manager holds it) and runs the real CLI at 80 columns; tests/unit/process/test_process_cli.py runs
the same commands against a real manager."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from signalgen.storage.control import ControlStore
from tests.unit.process.test_manager import REPO, client_yaml, make_root

CONTROL = Path("var/local-dev/control.sqlite")
ODUM = "odum.momentum_v1.BTCUSD.5m"
CHRISTIAN = "christian.consensus_v1.ETHUSD.5m"  # 32 characters, as long as the demo's longest ids


def cli(root: Path, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args, "--root", str(root)],
                          cwd=root, capture_output=True, text=True, timeout=60, env=env)


def fits(text: str, width: int = 80) -> bool:
    return all(len(line) <= width for line in text.splitlines())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"])})
    (root / CONTROL).parent.mkdir(parents=True)
    return root


@pytest.fixture
def store(root: Path) -> Iterator[ControlStore]:
    with ControlStore(root / CONTROL) as s:
        yield s


@contextmanager
def manager_lock(root: Path) -> Iterator[None]:
    """Hold `<control>.lock` as a running manager does (this process: alive, started before any row)."""
    fd = os.open(root / f"{CONTROL}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def worker(store: ControlStore, wid: str, state: str, **more) -> None:
    store.set_instance(wid, state=state, pid=more.pop("pid", 4242 if state == "RUNNING" else None),
                       started_at=time.time() - 75, restarts=more.pop("restarts", 0), **more)


def status(root: Path, *args: str) -> tuple[int, dict]:
    proc = cli(root, "status", "-o", "json", *args)
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize(("states", "code"), [
    (("RUNNING", "RUNNING"), 0), (("RUNNING", "PAUSED"), 0), (("STOPPED", "EXITED"), 0), (("STARTING", "STOPPING"), 0),
    (("RUNNING", "BACKOFF"), 3), (("RUNNING", "FATAL"), 3),
])
def test_status_exits_3_when_a_worker_is_fatal_or_in_backoff(root: Path, store, states, code) -> None:
    with manager_lock(root):
        worker(store, ODUM, states[0])
        worker(store, CHRISTIAN, states[1], reason="killed by SIGKILL; BACKOFF (failure 2)")
        got, doc = status(root)
        assert got == code and doc["manager"] == "running" and doc["manager_pid"] == os.getpid()
        assert [w["state"] for w in doc["workers"]] == [states[1], states[0]]  # by worker id
        got, doc = status(root, "--strategy", "odum")  # only the matching workers count
        assert got == (3 if states[0] in ("BACKOFF", "FATAL") else 0)


def test_without_a_manager_no_worker_is_shown_running_and_status_exits_3(root: Path, store) -> None:
    worker(store, ODUM, "RUNNING", pid=4242)
    worker(store, CHRISTIAN, "STOPPED", reason="stop-strategy command")
    code, doc = status(root)
    assert code == 3 and doc["manager"] == "gone" and doc["manager_pid"] is None
    rows = {w["worker"]: w for w in doc["workers"]}
    assert rows[ODUM]["state"] == "UNKNOWN" and rows[ODUM]["last_state"] == "RUNNING" and rows[ODUM]["pid"] is None
    assert rows[ODUM]["reason"] == "manager gone; last RUNNING (pid 4242)"
    assert rows[CHRISTIAN]["state"] == "STOPPED"  # true with or without a manager
    table = cli(root, "status")
    assert table.returncode == 3 and "manager: not running" in table.stdout and fits(table.stdout)
    line = next(line for line in table.stdout.splitlines() if line.startswith(ODUM))
    assert line.split()[1] == "UNKNOWN" and "RUNNING" not in line
    assert f"{ODUM}: manager gone; last RUNNING (pid 4242)" in table.stdout


def test_rows_older_than_the_running_manager_are_not_shown_as_current(root: Path, store) -> None:
    worker(store, ODUM, "RUNNING", pid=4242)  # written before the manager below started
    with sqlite3.connect(root / CONTROL) as con:  # ... long before: this test process is that manager
        con.execute("UPDATE strategy_instances SET updated_at = '2000-01-01T00:00:00.000Z'")
    with manager_lock(root):
        code, doc = status(root)
        assert code == 3 and doc["manager"] == "running"
        [row] = doc["workers"]
        assert row["state"] == "UNKNOWN" and row["reason"] == "a previous manager's row; last RUNNING (pid 4242)"
        worker(store, ODUM, "RUNNING", pid=4343)  # the running manager rewrote it
        code, doc = status(root)
        assert code == 0 and doc["workers"][0]["state"] == "RUNNING" and doc["workers"][0]["pid"] == 4343


def test_status_table_fits_80_columns_and_wide_shows_every_column(root: Path, store) -> None:
    with manager_lock(root):
        worker(store, CHRISTIAN, "RUNNING", pid=4194303, restarts=12)
        worker(store, ODUM, "FATAL", exit_code=2, reason="exit code 2 " + "x" * 300)
        store.heartbeat(CHRISTIAN, pid=4194303, state="RUNNING", last_bar_time=None, checkpoint="2025-01-01T00:05:00",
                        signals=1_234_567, rejections=7, errors=3, ready=True)
        proc = cli(root, "status")
        assert proc.returncode == 3 and fits(proc.stdout), proc.stdout
        row = next(line for line in proc.stdout.splitlines() if line.startswith(CHRISTIAN)).split()
        assert row[1:3] == ["RUNNING", "4194303"] and row[-2:] == ["1,234,567", "12"]
        unwrapped = proc.stdout.replace("\n", "")  # a reason longer than a line wraps
        assert f"{ODUM}: exit code 2 xxx" in unwrapped and "x" * 200 not in unwrapped  # clipped at 200
        wide = cli(root, "status", "--wide")
        header = wide.stdout.splitlines()[1].split()
        assert header == ["worker", "state", "pid", "uptime", "heartbeat", "signals", "rejected", "errors",
                          "restarts", "exit", "checkpoint", "reason"]
        assert "2025-01-01T00:05:00" in wide.stdout and max(map(len, wide.stdout.splitlines())) > 80


def test_events_lists_state_changes_with_json_and_text_details(root: Path, store) -> None:
    store.event(ODUM, "state", {"from": "RUNNING", "to": "BACKOFF", "reason": "killed by SIGKILL", "exit_code": -9,
                                "restarts": 2, "pid": 123})
    store.event(ODUM, "failure", "killed by SIGKILL; BACKOFF (failure 1)")
    store.event(CHRISTIAN, "command", "pause")
    store.event("odum2.momentum_v1.BTCUSD.5m", "command", "x" * 5000)  # another client whose id starts the same
    with sqlite3.connect(root / CONTROL) as con:
        con.execute("INSERT INTO events (ts, worker_id, kind, detail) VALUES "
                    f"('2000-01-01T00:00:00.000Z', '{ODUM}', 'exit', 'long ago')")
    proc = cli(root, "events", "--strategy", "odum", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    events = json.loads(proc.stdout)
    assert [(e["worker"], e["kind"]) for e in events] == [(ODUM, "exit"), (ODUM, "state"), (ODUM, "failure")]
    assert events[1]["detail"] == {"exit_code": -9, "from": "RUNNING", "pid": 123, "reason": "killed by SIGKILL",
                                   "restarts": 2, "to": "BACKOFF"}
    proc = cli(root, "events", "--since", "1h")
    assert proc.returncode == 0 and fits(proc.stdout), proc.stdout
    assert "long ago" not in proc.stdout and ODUM in proc.stdout and CHRISTIAN in proc.stdout
    words = " ".join(proc.stdout.split())  # the detail wraps under the worker id
    assert 'exit_code=-9 from=RUNNING pid=123 reason="killed by SIGKILL" restarts=2 to=BACKOFF' in words
    assert "killed by SIGKILL; BACKOFF (failure 1)" in words and "x" * 200 not in proc.stdout.replace("\n", "")
    wider = cli(root, "events", "--strategy", ODUM, columns=160).stdout  # one line per event where that fits
    assert any(line.split()[2:5] == [ODUM, "failure", "killed"] for line in wider.splitlines()), wider
    [clipped] = json.loads(cli(root, "events", "--strategy", "odum2", "-o", "json").stdout)
    assert clipped["detail"] == "x" * 197 + "..."  # an echoed excerpt: at most 200 characters
    proc = cli(root, "events", "--since", "2000-01-01", "--limit", "2", "-o", "json")
    assert [e["kind"] for e in json.loads(proc.stdout)] == ["command", "command"]
    assert "showing the newest 2 events; 3 older ones match" in proc.stderr
    proc = cli(root, "events", "--since", "tomorrow")
    assert proc.returncode == 2 and "not a time: 'tomorrow'" in " ".join(proc.stderr.split())


def test_logs_prints_every_log_that_matches_and_no_other(root: Path) -> None:
    folder = root / "var/local-dev/logs"
    folder.mkdir(parents=True)
    for wid in (ODUM, "odum.momentum_v1.SOLUSD.5m", "odum2.momentum_v1.BTCUSD.5m", CHRISTIAN):
        (folder / f"{wid}.log").write_text("".join(f"{wid} line {i}\n" for i in range(5)))
    proc = cli(root, "logs", "--strategy", "odum", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"==> {folder / ODUM}.log <==\n{ODUM} line 3\n{ODUM} line 4\n\n"
                           f"==> {folder}/odum.momentum_v1.SOLUSD.5m.log <==\n"
                           "odum.momentum_v1.SOLUSD.5m line 3\nodum.momentum_v1.SOLUSD.5m line 4\n")
    proc = cli(root, "logs", "--strategy", CHRISTIAN, "-n", "1")  # one log: its lines only
    assert proc.returncode == 0 and proc.stdout == f"{CHRISTIAN} line 4\n"
    proc = cli(root, "logs", "--strategy", "bea")
    assert proc.returncode == 1 and "no log matches 'bea'" in proc.stderr
    assert "odum" not in proc.stderr and "christian" not in proc.stderr
