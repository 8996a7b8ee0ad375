"""`deploy supervisor` under a real supervisord (PyPI `supervisor`, started here on a private socket):
a worker killed with SIGKILL is restarted by supervisord and resumes after its checkpoint, so the
store ends with exactly the decisions of an uninterrupted batch run over the same bars."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from signalgen.cli.deploy import program_name
from signalgen.process.shard import shard_index
from tests.polling import wait_for
from tests.roots import REPO, copy_config

BIN = Path(sys.executable).parent
WORKERS = ("odum.momentum_v1.BTCUSD.5m", "odum.momentum_v1.SOLUSD.5m")
BARS = 144  # 12 hours of 5m bars, one per 0.05 s: ~7 s per worker


def make_root(path: Path) -> Path:
    copy_config(path, ["odum"])
    (path / "registry").symlink_to(REPO / "registry")
    env = yaml.safe_load((path / "environments/local-dev.yaml").read_text())
    env["process"] |= {"mock_bar_interval_s": 0.05, "heartbeat_interval_s": 0.2, "heartbeat_threshold_s": 5.0,
                       "stop_timeout_s": 5.0}
    (path / "environments/local-dev.yaml").write_text(yaml.safe_dump(env))
    mock = yaml.safe_load((path / "modes/mock.yaml").read_text())
    mock |= {"start": "2025-01-01T00:00:00Z", "end": "2025-01-01T12:00:00Z"}
    (path / "modes/mock.yaml").write_text(yaml.safe_dump(mock))
    return path


def cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "signalgen", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def ctl(conf: Path, *args: str) -> str:
    return subprocess.run([BIN / "supervisorctl", "-c", conf, *args], capture_output=True, text=True,
                          timeout=30).stdout


def decisions(db: Path, mode: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(
            "SELECT 'signal', signal_id, symbol, bar_time, direction, confidence, weight FROM signals WHERE mode = ? "
            "UNION ALL SELECT 'rejection', rejection_id, symbol, bar_time, NULL, NULL, NULL FROM rejections "
            "WHERE mode = ? ORDER BY 4, 3, 1", [mode, mode]).fetchall()


@pytest.mark.skipif(not (BIN / "supervisord").exists(), reason="supervisord is installed with the dev extra")
def test_supervisord_restarts_a_killed_worker_which_resumes_from_its_checkpoint(tmp_path):
    root = make_root(tmp_path / "sv")
    conf_dir = tmp_path / "sv/var/supervisor"
    cli("deploy", "supervisor", "--root", str(root), "--mode", "mock", "--out", str(conf_dir))
    conf = conf_dir / "supervisord.conf"
    text = conf.read_text()
    assert all(f"[program:{program_name(w)}]" in text and f"--id {w}" in text for w in WORKERS)

    daemon = subprocess.Popen([BIN / "supervisord", "-n", "-c", conf], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    victim = f"signalgen:{program_name(WORKERS[0])}"  # programs are in the signalgen group
    log = root / "var/local-dev/logs" / f"{WORKERS[0]}.log"
    try:
        wait_for(lambda: ctl(conf, "status").count("RUNNING") == 3, 60, "writer and both workers RUNNING")
        first_pid = int(ctl(conf, "pid", victim))
        # kill it once it has a checkpoint and is some way into its range
        wait_for(lambda: log.exists() and "worker ready" in log.read_text(), 60, "the worker's first bars")
        time.sleep(2.0)
        os.kill(first_pid, signal.SIGKILL)
        restarted = wait_for(lambda: (p := ctl(conf, "pid", victim).strip()).isdigit() and int(p) not in (0, first_pid)
                             and int(p), 30, "supervisord to restart the killed worker")
        assert restarted != first_pid
        wait_for(lambda: ctl(conf, "status").count("EXITED") == 2, 120, "both workers to finish their range")
        resumed = [line for line in log.read_text().splitlines() if "resuming after" in line]
        assert len(resumed) == 2 and "2025-01-01 00:00:00" not in resumed[1]  # resumed after a checkpoint
    finally:
        daemon.send_signal(signal.SIGTERM)  # stops the writer too, which flushes and closes the store
        daemon.wait(timeout=60)
    streamed = decisions(root / "var/local-dev/signalgen.duckdb", "mock")

    # the same bars in one uninterrupted batch run
    batch_root = make_root(tmp_path / "batch")
    cli("run", "--root", str(batch_root), "--mode", "mock", "--no-progress")
    expected = decisions(batch_root / "var/local-dev/signalgen.duckdb", "mock")
    assert len(expected) == BARS * len(WORKERS)
    assert streamed == expected  # none lost, none duplicated, bit-identical confidences and weights


def test_with_redis_messaging_the_store_is_written_by_the_recorder_program(tmp_path):
    root = make_root(tmp_path / "redis")
    conf_dir = tmp_path / "redis/var/supervisor"
    cli("deploy", "supervisor", "--root", str(root), "--env", "local-integration", "--mode", "live",
        "--out", str(conf_dir))
    text = (conf_dir / "supervisord.conf").read_text()
    assert "[program:recorder]" in text and "[program:writer]" not in text
    assert " recorder --env local-integration --mode live" in text
    assert f"programs=recorder,{program_name(WORKERS[0])},{program_name(WORKERS[1])}" in text


def test_a_shard_gets_only_its_share_of_the_worker_programs(tmp_path):
    """`deploy supervisor --shard i/N` on each of N hosts: together every worker program once, each host
    with the share `start --shard i/N` would run (and its own writer)."""
    root = copy_config(tmp_path / "root", ["christian", "ikenna", "odum"])
    (root / "registry").symlink_to(REPO / "registry")
    every = []
    for i in range(3):
        conf_dir = tmp_path / f"shard{i}"
        cli("deploy", "supervisor", "--root", str(root), "--mode", "mock", "--out", str(conf_dir), "--shard", f"{i}/3")
        text = (conf_dir / "supervisord.conf").read_text()
        ids = [line.split("--id ", 1)[1].split()[0] for line in text.splitlines() if " worker --id " in line]
        assert ids and all(shard_index(w, 3) == i for w in ids)
        assert "[program:writer]" in text
        every += ids
    assert len(every) == len(set(every)) == 9  # christian 3 + ikenna 4 + odum 2, each on one host


@pytest.mark.parametrize("value", ["3/3", "a/b", "0/0"])
def test_a_bad_shard_is_refused_naming_the_option(tmp_path, value):
    root = copy_config(tmp_path / "root", ["odum"])
    done = subprocess.run([sys.executable, "-m", "signalgen", "deploy", "supervisor", "--root", str(root), "--mode",
                           "mock", "--out", str(tmp_path / "sv"), "--shard", value], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--shard" in done.stderr, done.stderr
    assert not (tmp_path / "sv").exists()


def test_an_empty_shard_is_refused_naming_the_option(tmp_path):
    root = copy_config(tmp_path / "root", ["odum"])  # 2 workers: 8 shards leave some empty
    (root / "registry").symlink_to(REPO / "registry")
    empty = next(i for i in range(8) if not any(shard_index(w, 8) == i for w in WORKERS))
    done = subprocess.run([sys.executable, "-m", "signalgen", "deploy", "supervisor", "--root", str(root), "--mode",
                           "mock", "--out", str(tmp_path / "sv"), "--shard", f"{empty}/8"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--shard" in done.stderr and "no worker" in done.stderr, done.stderr
