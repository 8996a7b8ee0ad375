"""`signals` and `runs` as an operator runs them: the real CLI in a subprocess, while another process
holds the store (as a run does) and when nothing holds it."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from signalgen.storage.duckdb import DuckDBStore
from tests.unit.storage.reads_fixtures import RUN_ID, fill_store, hold_and_serve

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for layer in ("clients", "environments", "modes"):
        shutil.copytree(REPO / layer, tmp_path / layer)
    return tmp_path


def db_of(root: Path) -> Path:
    return root / "var" / "local-dev" / "signalgen.duckdb"


@pytest.fixture
def holder(root: Path):
    """A child process that holds the store (DuckDB's file lock) and serves reads, like a run.

    Yields (root, more, events): set `more` to make it write 2 more signals; it reports on `events`.
    """
    ctx = multiprocessing.get_context("spawn")
    events, stop, more = ctx.Queue(), ctx.Event(), ctx.Event()
    child = ctx.Process(target=hold_and_serve, args=(str(db_of(root)), events, stop, more))
    child.start()
    try:
        assert events.get(timeout=60)[0] == "serving"
        yield root, more, events
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_signals_list_reads_through_the_process_holding_the_store(holder) -> None:
    held = holder[0]
    with pytest.raises(duckdb.IOException, match="lock"):  # what a reader met before: the file is locked
        duckdb.connect(str(db_of(held)), read_only=True)
    proc = cli("signals", "list", "--root", str(held), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = _json_lines(proc.stdout)
    assert len(rows) == 16 and {r["mode"] for r in rows} == {"historical", "mock"}
    proc = cli("signals", "list", "--root", str(held), "--mode", "mock")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" mock ") == 4 and "historical" not in proc.stdout
    proc = cli("signals", "list", "--root", str(held), "--kind", "rejections", "-f", "csv", "--symbol", "AAPL")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 3 and {r["symbol"] for r in rows} == {"AAPL"} and all(r["reasons"] for r in rows)
    proc = cli("runs", "show", RUN_ID, "--root", str(held), "--output", "json")
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "ok" and run["bars"] == 1234567
    assert run["rejections_by_reason"] == {"below_confidence": 5, "no_consensus": 1}


def test_signals_read_the_file_when_nothing_holds_it_and_let_go_at_once(root: Path, tmp_path: Path) -> None:
    with DuckDBStore(db_of(root)) as store:
        fill_store(store)
    out = tmp_path / "ikenna.parquet"
    proc = cli("signals", "export", "--root", str(root), "--client", "ikenna", "-f", "parquet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert pl.read_parquet(out).height == 12 and "12 signals ->" in proc.stderr
    with DuckDBStore(db_of(root)) as store:  # a run can open it for writing right away
        assert store.count("signals") == 16
    proc = cli("signals", "tail", "-n", "3", "--root", str(root), "-f", "json", "--client", "ikenna")
    assert proc.returncode == 0, proc.stderr
    times = [r["bar_time"] for r in _json_lines(proc.stdout)]
    assert len(times) == 3 and times == sorted(times) and times[-1] == "2024-01-02T14:55:00+00:00"
    proc = cli("runs", "list", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert RUN_ID in proc.stdout and "1,234,567" in proc.stdout


def test_tail_follow_prints_new_rows_and_ctrl_c_exits_0(holder) -> None:
    import signal

    held, more, events = holder

    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "signals", "tail", "-n", "2",
                             "--follow", "--interval", "0.2", "--root", str(held), "-f", "json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = [proc.stdout.readline(), proc.stdout.readline()]
    assert all(json.loads(line)["signal_id"] for line in first)
    more.set()  # the holder writes 2 signals while tail follows
    assert events.get(timeout=30)[0] == "wrote"
    new = [json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())]
    assert {r["run_id"] for r in new} == {"later"}
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err  # nothing printed twice


def test_parquet_needs_out_and_a_missing_store_is_one_line(root: Path) -> None:
    proc = cli("signals", "list", "--root", str(root))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no signal store at" in proc.stderr and "run` first" in " ".join(proc.stderr.split())
    with DuckDBStore(db_of(root)) as store:
        fill_store(store)
    proc = cli("signals", "export", "--root", str(root), "-f", "parquet")
    assert proc.returncode == 2 and "--format parquet needs --out FILE" in proc.stderr
    proc = cli("runs", "show", "no-such-run", "--root", str(root))
    assert proc.returncode == 1 and "no run 'no-such-run'" in proc.stderr


def test_runs_show_says_what_produced_the_bars(root: Path) -> None:
    from datetime import datetime, timezone

    from signalgen.storage.base import RunRecord

    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    digest = "0123456789abcdef" * 4
    with DuckDBStore(db_of(root)) as store:
        fill_store(store)  # RUN_ID: a run recorded without provenance, as older versions did
        store.start_run(RunRecord(run_id="files-run", config_hash="h", mode="historical", environment="local-dev",
                                  start=t0, end=t0, started_at=t0, clients=["ada"], data_source="files", seed=12345,
                                  data_files={"1d/AAPL.parquet": digest}, config={"seed": 12345}))
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), "runs", "show", "files-run", "--root",
                           str(root)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    fields = {line.split()[0]: line.split()[1:] for line in lines if line.strip()}
    assert fields["data_source"] == ["files"] and fields["seed"] == ["12345"]
    assert fields["config"][0] == "recorded," and "data files (sha256)" in proc.stdout
    assert fields["1d/AAPL.parquet"] == [digest[:16]]
    proc = cli("runs", "show", "files-run", "--root", str(root), "--output", "json")
    run = json.loads(proc.stdout)
    assert run["data_files"] == {"1d/AAPL.parquet": digest} and run["config"] == {"seed": 12345}
    proc = cli("runs", "show", RUN_ID, "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert {line.split()[0]: " ".join(line.split()[1:]) for line in proc.stdout.splitlines() if line.strip()}[
        "data_source"] == "not recorded"
    proc = cli("runs", "list", "--root", str(root), "--output", "json")
    assert all("config" not in r for r in json.loads(proc.stdout))  # snapshots are for `runs show`
