"""`run --shard i/N` on local-dev: the share `start --shard` takes, recorded in the run, and the day
files of a strategy split across shards keep every shard's signals. Two runs at once on one DuckDB
file: the second fails with a message naming the way out, the first is left whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

from signalgen.process.shard import shard_index
from tests.polling import wait_for
from tests.roots import REPO, copy_config
from tests.unit.test_cli_signals import cli

ADA = ("ada.daily_swing_v1.AAPL.1d", "ada.daily_swing_v1.MSFT.1d", "ada.daily_swing_v1.IBM.1d")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    copy_config(tmp_path, ["ada", "odum"])
    (tmp_path / "registry").symlink_to(REPO / "registry")
    return tmp_path


def csv_files(root: Path) -> dict[str, bytes]:
    out = root / "var/local-dev/out/historical/quantconnect"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.csv"))}


@pytest.mark.parametrize("value", ["2/2", "x", "1/0", "-1/2", "1 of 2"])
def test_a_bad_shard_is_refused_naming_the_option(root: Path, value: str) -> None:
    proc = cli("run", "--root", str(root), "--shard", value, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "--shard" in proc.stderr and "i/N" in proc.stderr
    assert not (root / "var/local-dev/signalgen.duckdb").exists()  # refused before anything ran


def test_shard_runs_decide_their_share_record_it_and_keep_a_split_strategys_files_whole(root: Path) -> None:
    """ada's one strategy has a worker in each of 2 shards. Before, a shard run made the strategy's day
    files its own (the replace of `writer.own`): the second shard's run wiped the first one's symbols."""
    by_shard = {i: {w for w in ADA if shard_index(w, 2) == i} for i in (0, 1)}
    assert by_shard[0] and by_shard[1]  # the strategy is split: what the test is about
    args = ("run", "--root", str(root), "--client", "ada", "--no-progress", "--output", "json")
    full = cli(*args)
    assert full.returncode == 0, full.stderr
    whole = csv_files(root)
    assert whole and sum(b.count(b"\n") for b in whole.values()) > len(whole)  # signals to lose
    shutil.rmtree(root / "var/local-dev/out")
    for i in (0, 1):
        proc = cli(*args, "--shard", f"{i}/2")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["shard"] == f"{i}/2"
        assert report["strategies"][0]["workers"] == len(by_shard[i])
        shown = json.loads(cli("runs", "show", report["run_id"], "--root", str(root), "--output", "json").stdout)
        assert shown["shard"] == f"{i}/2" and shown["status"] == "ok"
    assert csv_files(root) == whole
    runs = json.loads(cli("runs", "list", "--root", str(root), "--output", "json").stdout)
    full_run = json.loads(full.stdout)["run_id"]
    assert [r["shard"] for r in runs if r["run_id"] == full_run] == [None]


def test_a_second_run_on_a_duckdb_file_in_use_fails_clearly_and_the_first_stays_whole(root: Path) -> None:
    """DuckDB takes one writer: a concurrent (shard) run exits 75 naming the lock and `run --workers`;
    the run holding the file finishes with every decision it reported, and the store records it alone."""
    mode = root / "modes/simulation.yaml"  # paced: 1 day of 5m bars per worker in ~4 s, 2 workers
    mode.write_text(yaml.safe_dump({**yaml.safe_load(mode.read_text()), "start": "2025-01-01T00:00:00Z",
                                    "end": "2025-01-02T00:00:00Z", "replay_speed": 21600}))
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "strategy_runner.py"), "run", "--root", str(root), "--mode", "simulation",
               "--client", "odum", "--no-progress"]
    log = root / "first.err"
    with log.open("w") as err:
        first = subprocess.Popen([*command, "--output", "json"], stdout=subprocess.PIPE, stderr=err, text=True,
                                 env=env)
    try:
        wait_for(lambda: "run started" in log.read_text() or first.poll() is not None, 60, "the first run's start")
        second = subprocess.run([*command, "--shard", "0/2"], capture_output=True, text=True, timeout=60, env=env)
        assert first.poll() is None, "the first run ended before the second tried: the test proves nothing"
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 75, second.stderr
    assert "locked by another process" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "run --workers" in second.stderr
    assert first.returncode == 0, log.read_text()[-2000:]
    totals = json.loads(out)["totals"]
    with duckdb.connect(str(root / "var/local-dev/signalgen.duckdb"), read_only=True) as con:
        runs = con.execute("SELECT status, shard, signals, rejections FROM runs").fetchall()
        stored = [con.execute(f"SELECT count(*), count(DISTINCT {key}) FROM {table}").fetchone()
                  for table, key in (("signals", "signal_id"), ("rejections", "rejection_id"))]
    assert runs == [("ok", None, totals["signals"], totals["rejections"])]
    assert stored == [(totals["signals"],) * 2, (totals["rejections"],) * 2]
    assert totals["signals"] + totals["rejections"] == 2 * 288
