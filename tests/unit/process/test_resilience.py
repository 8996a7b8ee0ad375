"""Supervision that survives its own stalls and a full disk: a real manager and fleet (mock inference)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.unit.process.test_manager import (BEA_BTC, ODUM_BTC, client_yaml, make_root, managers,  # noqa: F401
                                             pids, start, until)


def test_a_manager_stopped_longer_than_the_threshold_kills_no_healthy_worker(tmp_path: Path, managers) -> None:
    # a manager SIGSTOPped past heartbeat_threshold_s killed every healthy worker when it resumed
    # (18 of 18): the heartbeats travel through its own writer, so they froze with it
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "SOLUSD"]),
                                "bea": client_yaml("bea", ["BTCUSD", "ETHUSD"])}, heartbeat_threshold_s=4.0)
    m = start(managers, root)
    m.wait_states("RUNNING", count=4)
    before = pids(m)
    os.kill(m.pid, signal.SIGSTOP)
    time.sleep(9)  # the stall itself: over 2 x the threshold
    os.kill(m.pid, signal.SIGCONT)
    deadline = time.monotonic() + 8  # two thresholds after the resume: a condemned worker would be dead
    while time.monotonic() < deadline:
        assert not [e for e in m.query("SELECT * FROM events WHERE kind = 'heartbeat'")], m.output()[-2000:]
        time.sleep(0.2)
    rows = m.instances()
    assert {w: r["pid"] for w, r in rows.items()} == before
    assert all(r["state"] == "RUNNING" and r["restarts"] == 0 for r in rows.values()), rows
    assert "the manager did not run for" in m.output()
    # a worker that really stops beating is still caught, one threshold after the manager could see it
    os.kill(before[ODUM_BTC], signal.SIGSTOP)
    until(lambda: any(e["kind"] == "heartbeat" for e in m.events(ODUM_BTC)), 15, lambda: m.events(ODUM_BTC))
    m.wait_states({ODUM_BTC: "RUNNING", BEA_BTC: "RUNNING"}, timeout=30)
    assert pids(m)[ODUM_BTC] != before[ODUM_BTC] and pids(m)[BEA_BTC] == before[BEA_BTC]
    assert m.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 48 MB tmpfs to fill: the root's var/ lives on it (store, control store, logs, stream)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("filling a disk needs a tmpfs of its own: mount(8) as root, which this machine does not allow")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"filling a disk needs a tmpfs of its own, and mount refused: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full (ENOSPC); returns it."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def consecutive(root: Path, client: str) -> list:
    """The bar times a client's one worker decided (signals and rejections), each once."""
    from tests.unit.process.test_manager import decisions

    signals, rejections = decisions(root, client)
    assert not set(signals) & set(rejections)  # one decision per bar
    times = sorted(set(signals) | set(rejections))
    return times


def test_a_full_disk_spends_no_recovery_attempt_and_the_fleet_resumes_within_5s(tmp_path: Path, small_disk,
                                                                                 managers) -> None:
    # a few seconds of ENOSPC made the whole fleet FATAL within ~60 s, and it stayed FATAL after
    # space returned, until someone ran `restart --strategy '*'`
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"]), "bea": client_yaml("bea", ["ETHUSD"])},
                     heartbeat_threshold_s=3.0, max_recovery_attempts=1, backoff_initial_s=0.2,
                     mock_bar_interval_s=0.02)
    (root / "var").symlink_to(small_disk)
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    until(lambda: all((m.heartbeat(w).get("checkpoint") or "") for w in m.instances()), 30, "first checkpoints")
    filler = fill(small_disk)
    time.sleep(8)  # the outage: over twice the heartbeat threshold, and every recovery attempt's backoff
    assert m.proc.poll() is None, m.output()[-3000:]
    before = {w: m.heartbeat(w).get("checkpoint") or "" for w in m.instances()}
    filler.unlink()
    back = time.monotonic()
    until(lambda: all((m.heartbeat(w).get("checkpoint") or "") > before[w] for w in before), 10,
          lambda: (before, {w: m.heartbeat(w).get("checkpoint") for w in before}, m.output()[-3000:]))
    resumed = time.monotonic() - back
    assert resumed < 5, resumed
    rows = m.instances()
    assert all(r["state"] == "RUNNING" and r["failures"] == 0 for r in rows.values()), rows
    states = [json.loads(e["detail"])["to"] for e in m.query("SELECT detail FROM events WHERE kind = 'state'")]
    assert "FATAL" not in states
    assert m.stop() == 0
    for client in ("odum", "bea"):  # nothing lost, nothing twice: every bar decided once, none skipped
        times = consecutive(root, client)
        assert len(times) > 20
        steps = {b - a for a, b in zip(times, times[1:])}
        assert steps == {timedelta(minutes=5)}, steps


def modes_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]
            if not p.is_symlink() and not p.is_socket()}


def test_what_holds_tenants_signals_is_private_and_a_killed_managers_socket_folder_goes(tmp_path: Path,
                                                                                       managers) -> None:
    # store, control store, logs, stream and CSV files were 0644; a manager killed with -9 left its
    # /tmp/signalgen-* socket folder behind for good
    from tests.unit.process.test_manager import cli

    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"]).replace("internal", "both")})
    m = start(managers, root)
    m.wait_states("RUNNING", count=1)
    until(lambda: list((root / "var").rglob("*.csv")) and list((root / "var").rglob("*.jsonl")), 30,
          "a CSV file and a stream file")
    [sock] = re.findall(r"writer serving \d+ checkpoints on (\S+/writer\.sock)", m.output())
    m.kill()
    left = Path(sock).parent
    assert left.exists()  # the killed manager's folder is still there
    m = start(managers, root)
    until(lambda: m.output().count("manager started") == 2, 60, m.output)  # the new one holds the lock
    m.wait_states("RUNNING", count=1)
    assert cli(root, "stop").returncode == 0
    m.proc.wait(30)
    assert not left.exists()  # cleaned up by the next manager of the store (and its own removed at stop)
    modes = modes_under(root / "var")
    assert modes, "nothing under var/"
    wide = {p: oct(mode) for p, mode in modes.items() if mode & 0o077}
    assert not wide, wide
    assert {oct(mode) for p, mode in modes.items() if (root / "var" / p).is_dir()} == {"0o700"}
    for name in ("local-dev/signalgen.duckdb", "local-dev/control.sqlite"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
