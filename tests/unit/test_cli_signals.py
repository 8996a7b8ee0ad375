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
from tests.roots import REPO, copy_config
from tests.unit.storage.reads_fixtures import RUN_ID, fill_store, hold_and_serve



def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return copy_config(tmp_path)


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


# ---------------------------------------------------------------- counts, limits, times, 80 columns


def cli_at(width: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(width), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def own_root(tmp_path: Path) -> Path:
    """The repo's environments and modes; clients of the test's own (the store is what matters here)."""
    from tests.unit.process.test_manager import client_yaml

    for layer in ("environments", "modes"):
        shutil.copytree(REPO / layer, tmp_path / layer)
    (tmp_path / "clients").mkdir()
    for client in ("ikenna", "odum"):
        (tmp_path / "clients" / f"{client}.yaml").write_text(client_yaml(client, ["BTCUSD"]))
    return tmp_path


def test_signals_count_answers_how_many_signals_a_client_got_today(own_root: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.unit.outputs.factories import rejection_frame, signal_frame

    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    odum = {"client_id": "odum", "strategy_id": "momentum_v1", "symbols": ("BTCUSD",)}
    with DuckDBStore(db_of(own_root)) as store:
        fill_store(store)  # ikenna's and odum's older signals (2024)
        store.write_signals(signal_frame(3, **odum, mode="live", start=today))  # bars ending at 00:00, 00:05, 00:10
        store.write_rejections(rejection_frame(2, **odum, mode="live", start=today + timedelta(minutes=15)))
        store.write_signals(signal_frame(2, **odum, mode="live", start=today - timedelta(hours=1)))
        hour_ago = (datetime.now(UTC) - timedelta(hours=1)).replace(second=0, microsecond=0)
        store.write_signals(signal_frame(1, **odum, mode="simulation", start=hour_ago))
    root = ("--root", str(own_root))
    proc = cli_at(80, "signals", "count", "--client", "odum", "--start", "today", "--mode", "live", "-o", "json", *root)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    # (start, end]: the bar ending at midnight belongs to yesterday
    assert doc["rows"] == [{"client": "odum", "strategy": "momentum_v1", "mode": "live", "signals": 2,
                            "rejections": 2}]
    assert doc["total"] == {"signals": 2, "rejections": 2} and doc["start"] == today.isoformat()
    proc = cli_at(80, "signals", "count", "--client", "odum", "--start", "yesterday", "--mode", "live", "--by",
                  "mode", "-o", "json", *root)
    assert json.loads(proc.stdout)["rows"] == [{"mode": "live", "signals": 5, "rejections": 2}]
    for since, want in (("2h", 1), ("-2h", 1), ("30m", 0)):
        proc = cli_at(80, "signals", "count", "--mode", "simulation", "--start", since, "-o", "json", *root)
        assert json.loads(proc.stdout)["total"]["signals"] == want, since
    proc = cli_at(80, "signals", "count", *root)  # everything, per client, strategy and mode
    assert proc.returncode == 0 and all(len(line) <= 80 for line in proc.stdout.splitlines()), proc.stdout
    lines = proc.stdout.splitlines()
    assert "ikenna swing_high_v1 historical 12 6" in [" ".join(line.split()) for line in lines]
    assert " ".join(lines[-1].split()) == "total 22 8"


@pytest.mark.parametrize("command", ["list", "count", "export"])
def test_an_unknown_client_or_a_start_after_the_end_exits_2_as_run_does(own_root: Path, command: str) -> None:
    with DuckDBStore(db_of(own_root)) as store:
        fill_store(store)
    root = ("--root", str(own_root))
    proc = cli_at(80, "signals", command, "--client", "odum", "--client", "nobody", *root)
    assert proc.returncode == 2 and "unknown client 'nobody'; known clients: ikenna, odum" in proc.stderr
    proc = cli_at(80, "signals", command, "--start", "2025-02-02", "--end", "2025-02-01", *root)
    assert proc.returncode == 2 and "start (2025-02-02T00:00:00+00:00) must be before end" in proc.stderr
    proc = cli_at(80, "signals", command, "--start", "last tuesday", *root)
    assert proc.returncode == 2 and "not a time: 'last tuesday'" in " ".join(proc.stderr.split())


def test_signals_list_says_when_it_stopped_at_its_limit(own_root: Path) -> None:
    with DuckDBStore(db_of(own_root)) as store:
        fill_store(store)  # 16 signals
    root = ("--root", str(own_root))
    proc = cli_at(80, "signals", "list", "--limit", "5", "-f", "json", *root)
    assert proc.returncode == 0 and len(_json_lines(proc.stdout)) == 5  # stdout: the rows only
    assert proc.stderr == "--limit 5 reached: more signals match after 2024-01-02 14:35:00 (raise --limit or pass --start)\n"
    proc = cli_at(80, "signals", "list", "--limit", "16", *root)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "[default: 100]" in cli_at(200, "signals", "list", "--help").stdout


def test_every_table_fits_80_columns_and_wide_shows_the_rest(own_root: Path) -> None:
    from datetime import UTC, datetime

    from signalgen.storage.base import RunRecord

    with DuckDBStore(db_of(own_root)) as store:
        fill_store(store)
        t = datetime(2025, 3, 2, tzinfo=UTC)
        store.start_run(RunRecord(run_id="20250302T000000Z-0badc0de", config_hash="abc", mode="simulation",
                                  environment="local-dev", start=t, end=t, started_at=t, clients=["odum"]))
    root = ("--root", str(own_root))
    for args in (("signals", "list"), ("signals", "list", "--kind", "rejections"), ("runs", "list"),
                 ("signals", "count", "--by", "client", "--by", "strategy", "--by", "symbol", "--by", "mode")):
        proc = cli_at(80, *args, *root)
        assert proc.returncode == 0, proc.stderr
        assert all(len(line) <= 80 for line in proc.stdout.splitlines()), proc.stdout
    signals = cli_at(80, "signals", "list", *root).stdout.splitlines()
    assert signals[0].split() == ["bar_time", "(UTC)", "client", "strategy", "symbol", "tf", "mode", "dir", "conf"]
    assert signals[2].split()[:7] == ["2024-01-02", "14:30", "ikenna", "swing_high_v1", "AAPL", "5m", "historical"]
    rejections = cli_at(80, "signals", "list", "--kind", "rejections", *root).stdout.splitlines()
    # several reasons wrap inside their column, nothing is cut
    assert rejections[2].split()[-2:] == ["historical", "volatility_filter,"]
    assert rejections[3].split() == ["trend_unconfirmed"]
    runs = [" ".join(line.split()) for line in cli_at(80, "runs", "list", *root).stdout.splitlines()]
    assert runs[1] == "run mode status elapsed bars signals rejected"
    assert runs[3].startswith("20250302T000000Z-0badc0de simulation running ")  # so far: a long time
    assert runs[4] == f"{RUN_ID} historical ok 2.5s 1,234,567 16 6"
    wide = cli_at(80, "signals", "list", "--wide", *root).stdout.splitlines()
    assert wide[0].split()[-2:] == ["strength", "weight"] and wide[2].split()[:2] == ["2024-01-02", "14:30:00"]
    wide = cli_at(80, "runs", "list", "--wide", *root).stdout
    assert "local-dev" in wide and "2025-03-01 00:00:00" in wide and "bad bars" in wide
