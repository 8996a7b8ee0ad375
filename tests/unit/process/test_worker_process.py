"""Worker processes: kill -9 and restart resumes after the checkpoint with nothing lost or doubled,
SIGTERM flushes and exits 0, heartbeats say ready, and a worker dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import psutil

from signalgen.modes import run_mode
from signalgen.outputs.local import read_stream
from signalgen.storage.control import ControlStore

from .conftest import REPO, START, Fleet, config, make_root, stored, wait_for

END = datetime(2025, 1, 2, tzinfo=timezone.utc)  # 288 five-minute bars per worker
FIVE_MIN = timedelta(minutes=5)


def outputs(root: Path, mode: str) -> tuple[dict[str, bytes], pl.DataFrame]:
    """(CSV day files by relative path -> bytes, every stream line as a row without its volatile fields)."""
    out = root / "var/local-dev/out" / mode
    csv = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.csv"))}
    lines = pl.concat([read_stream(p, dedupe=False) for p in sorted((root / "var/local-dev/stream" / mode).glob("*.jsonl"))])
    return csv, lines.drop("run_id", "latency_us").sort("signal_id")


def test_kill_9_mid_stream_then_restart_ends_equal_to_a_fault_free_run(tmp_path, short_dir):
    root = make_root(tmp_path / "faulty", mock_bar_interval_s=0.02)
    fleet = Fleet(config(root, "mock", END), short_dir / "w.sock")
    victim = "christian.consensus_v1.ETHUSD.5m"
    try:
        fleet.start_all()
        # kill it once the writer has acked 60 of its bars (and it is still streaming)
        wait_for(lambda: fleet.server.checkpoints.get(victim, START) >= START + 60 * FIVE_MIN, 60, "60 acked bars")
        killed_at = fleet.server.checkpoints[victim]
        os.kill(fleet.procs[victim].pid, signal.SIGKILL)
        fleet.procs[victim].join(10)
        assert fleet.procs[victim].exitcode == -signal.SIGKILL
        assert killed_at < END
        wait_for(lambda: victim not in fleet.server.connected(), 10, "the writer to notice")
        fleet.start(victim)
        codes = fleet.join_all()
        checkpoints = fleet.server.checkpoints
    finally:
        fleet.close()
    assert codes == {wid: 0 for wid in fleet.specs}
    assert checkpoints == {wid: END for wid in fleet.specs}
    log = (root / "var/logs" / f"{victim}.log").read_text()
    resumed = [line for line in log.splitlines() if "worker started" in line]
    assert len(resumed) == 2 and str(START) in resumed[0] and str(START) not in resumed[1]

    twin = make_root(tmp_path / "fault-free")
    assert run_mode(config(twin, "mock", END)).status == "ok"
    for table in ("signals", "rejections"):
        mine, theirs = stored(root, table), stored(twin, table)
        assert mine.height > 0 and mine.equals(theirs), table
    (csv, lines), (csv_twin, lines_twin) = outputs(root, "mock"), outputs(twin, "mock")
    assert csv and csv == csv_twin  # the QuantConnect day files, byte for byte
    assert lines.height > 0 and lines.equals(lines_twin)  # every stream line once: none lost, none doubled
    assert lines["signal_id"].is_unique().all()


def test_sigterm_flushes_then_exits_0_and_heartbeats_say_ready(tmp_path, short_dir):
    root = make_root(tmp_path, mock_bar_interval_s=0.05)
    fleet = Fleet(config(root, "mock", datetime(2025, 1, 8, tzinfo=timezone.utc)), short_dir / "w.sock")
    control = ControlStore(root / "var/local-dev/control.sqlite")
    try:
        fleet.start_all()
        beats = wait_for(lambda: (b := control.heartbeats()) and len(b) == 3 and all(x["ready"] for x in b.values())
                         and b, 60, "three ready heartbeats")
        assert {wid: b["pid"] for wid, b in beats.items()} == {wid: p.pid for wid, p in fleet.procs.items()}
        assert all(b["state"] == "RUNNING" for b in beats.values())
        wait_for(lambda: len(fleet.server.checkpoints) == 3, 30, "a checkpoint of every worker")
        for proc in fleet.procs.values():
            os.kill(proc.pid, signal.SIGTERM)
        codes = fleet.join_all(timeout=20)
        acked = fleet.server.checkpoints
    finally:
        fleet.close()
    assert codes == {wid: 0 for wid in fleet.specs}
    final = control.heartbeats()
    control.close()
    for wid in fleet.specs:
        assert final[wid]["state"] == "STOPPED"
        # everything the worker sent was stored and acked: its last heartbeat's checkpoint is the
        # writer's, and the store holds no bar after it
        assert datetime.fromisoformat(final[wid]["checkpoint"]) == acked[wid]
    decided = pl.concat([stored(root, "signals"), stored(root, "rejections")], how="diagonal_relaxed")
    last = decided.group_by("client_id", "strategy_id", "symbol", "timeframe").agg(pl.col("bar_time").max())
    for row in last.iter_rows(named=True):
        wid = f"{row['client_id']}.{row['strategy_id']}.{row['symbol']}.{row['timeframe']}"
        assert row["bar_time"] == acked[wid]


def test_a_worker_dies_with_its_parent(tmp_path, short_dir):
    """SIGKILL the process that started a worker (as a manager would be killed): no process it made survives."""
    root = make_root(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from tests.unit.process.conftest import "
                               "parent_of_a_worker; parent_of_a_worker(sys.argv[1], sys.argv[2])", str(root),
                               str(short_dir / "nobody.sock")], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        descendants = psutil.Process(parent.pid).children(recursive=True)
        assert worker_pid in {p.pid for p in descendants}
        wait_for(lambda: (root / "var/logs/orphan.log").exists(), 60, "the worker to start")
    finally:
        parent.kill()
        parent.wait()

    def gone() -> bool:
        return not [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(gone, 10, "the worker and the fork server to die")


def test_a_lost_writer_is_a_transient_exit_and_the_last_heartbeat_is_a_state(tmp_path, short_dir):
    # a worker that lost its writer exited 1 (a crash, counted towards FATAL) and its last heartbeat
    # said "FAILED", which is no worker state
    from signalgen.process.states import TRANSIENT_EXIT, State

    root = make_root(tmp_path, mock_bar_interval_s=0.05)
    fleet = Fleet(config(root, "mock", datetime(2025, 1, 8, tzinfo=timezone.utc)), short_dir / "w.sock")
    control = ControlStore(root / "var/local-dev/control.sqlite")
    try:
        fleet.start_all()
        wait_for(lambda: (b := control.heartbeats()) and len(b) == 3 and all(x["ready"] for x in b.values()),
                 60, "three ready heartbeats")
        fleet.server.close()  # the writer goes away under the workers
        codes = fleet.join_all(timeout=60)
    finally:
        fleet.close()
    assert codes == {wid: TRANSIENT_EXIT for wid in fleet.specs}
    final = control.heartbeats()
    control.close()
    assert {final[wid]["state"] for wid in fleet.specs} == {State.EXITED.value}
