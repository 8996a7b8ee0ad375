"""Batch runs over bar files: history by bar count, one bad worker isolated, SIGINT / SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import polars as pl
import pytest

from signalgen.config.loader import Overrides, load_config
from signalgen.data.synthetic import synthetic_bars
from signalgen.errors import SignalgenError
from signalgen.modes import run_mode
from signalgen.config.workers import worker_specs

REPO = Path(__file__).resolve().parents[3]
SYMBOLS = ("BTCUSD", "ETHUSD", "SOLUSD", "XRPUSD")
CLIENTS = ["christian", "ikenna", "odum"]  # the clients trading 5m bars: write_bars writes only those
FIRST = datetime(2024, 12, 30, tzinfo=timezone.utc)   # the files start here
EARLY = datetime(2025, 1, 1, tzinfo=timezone.utc)     # an early run's start
LATE = datetime(2025, 1, 3, 7, 35, tzinfo=timezone.utc)  # a later start, inside the early run's range
END = datetime(2025, 1, 5, tzinfo=timezone.utc)
FIVE_MIN = timedelta(minutes=5)
GAP_BARS = 150


def write_bars(root: Path, gap_before: datetime | None = None, end: datetime = END) -> None:
    """Bar files of every demo symbol; `gap_before`: the GAP_BARS bars up to it are missing."""
    folder = root / "var/data/5m"
    folder.mkdir(parents=True, exist_ok=True)
    bars = synthetic_bars(SYMBOLS, "5m", FIRST, end, seed=3)
    if gap_before is not None:
        bars = bars.filter(~pl.col("bar_time").is_between(gap_before - GAP_BARS * FIVE_MIN, gap_before,
                                                          closed="right"))
    for (symbol,), frame in bars.group_by("symbol"):
        frame.write_parquet(folder / f"{symbol}.parquet")


def twin(root: Path, tmp_path_factory) -> Path:
    """A second root sharing root's configs, models and data but with its own store and outputs."""
    other = tmp_path_factory.mktemp("twin")
    for item in root.iterdir():
        if item.name != "var":
            (other / item.name).symlink_to(item)
    (other / "var").mkdir()
    (other / "var/data").symlink_to(root / "var/data")
    return other


def files_config(root: Path, start: datetime, end: datetime = END, **kw):
    """A files run of the 5m clients (unless `clients` says otherwise): the daily client ada has no 1d files here."""
    kw.setdefault("clients", CLIENTS)
    return load_config("local-dev", "historical", root=root,
                       overrides=Overrides(start=start, end=end, data_source="files"), **kw)


def run_files(root: Path, start: datetime, end: datetime = END, **kw):
    return run_mode(files_config(root, start, end, **kw))


def table(root: Path, sql: str) -> pl.DataFrame:
    with duckdb.connect(str(root / "var/local-dev/signalgen.duckdb"), read_only=True) as con:
        return con.sql(sql).pl()


def decisions_after(root: Path, start: datetime) -> tuple[pl.DataFrame, pl.DataFrame]:
    after = f"bar_time > '{start.isoformat()}'"
    signals = table(root, "select signal_id, direction, confidence, strength, magnitude, weight, period "
                          f"from signals where {after} order by signal_id")
    rejections = table(root, "select rejection_id, reasons, direction, confidence "
                             f"from rejections where {after} order by rejection_id")
    return signals, rejections


@pytest.mark.parametrize("gap", [False, True], ids=["no_gap", "gap_before_start"])
def test_a_later_start_gives_the_decisions_of_an_earlier_one(root, tmp_path_factory, gap):
    """History is loaded by bar count: after a data gap right before the start too."""
    write_bars(root, gap_before=LATE if gap else None)
    later = twin(root, tmp_path_factory)
    early_report = run_files(root, EARLY)
    late_report = run_files(later, LATE)
    assert not early_report.failures and not late_report.failures
    early, late = decisions_after(root, LATE), decisions_after(later, LATE)
    assert late[0].height > 0 and late[1].height > 0
    assert late[0].equals(early[0])  # the same signals, bit for bit
    assert late[1].equals(early[1])  # and the same rejections with the same reasons
    # bar problems are those of the range: the gap lands on the first bar after it, in both runs
    bad_bars = f"select symbol, bar_time, reason from bar_rejections where bar_time > '{LATE.isoformat()}' order by all"
    assert table(later, "select count(*) from bar_rejections").item() == table(later, bad_bars).height
    assert table(later, bad_bars).equals(table(root, bad_bars))
    assert table(later, bad_bars)["reason"].to_list() == (["gap"] * len(SYMBOLS) if gap else [])


def synthetic_config(root: Path, start: datetime):
    return load_config("local-dev", "historical", root=root,
                       overrides=Overrides(start=start, end=END, data_source="synthetic"))


@pytest.mark.parametrize("late", [LATE, LATE + timedelta(minutes=2)], ids=["on_a_bar", "between_bars"])
def test_a_later_start_gives_the_decisions_of_an_earlier_one_on_synthetic_bars(root, tmp_path_factory, late):
    """Before: synthetic bars were anchored at each run's own history start, so a later start decided on
    other bars under the same bar times and replaced the earlier run's decisions."""
    later = twin(root, tmp_path_factory)
    early_report, late_report = run_mode(synthetic_config(root, EARLY)), run_mode(synthetic_config(later, late))
    assert not early_report.failures and not late_report.failures
    early, again = decisions_after(root, late), decisions_after(later, late)
    assert again[0].height > 0 and again[1].height > 0
    assert again[0].equals(early[0])
    assert again[1].equals(early[1])


def test_every_worker_of_a_symbol_reads_the_same_synthetic_bars(root):
    """Before: ETHUSD's bars of ikenna's and christian's workers shared no close (each series was anchored
    at its own worker's history start, which depends on the strategy's lookback)."""
    from signalgen.config.workers import history_bars
    from signalgen.modes.sources import chunk_feed

    cfg = synthetic_config(root, EARLY)
    specs = [s for s in worker_specs(cfg) if (s.symbol, s.timeframe) == ("ETHUSD", "5m")]
    assert len({history_bars(s) for s in specs}) > 1  # the case that broke: different history lengths
    seen = [pl.concat([chunk.bars for chunk in chunk_feed(cfg, spec, chunk_bars=500)]) for spec in specs]
    first = seen[0]
    for other in seen[1:]:
        shared = first.join(other, on="bar_time", suffix="_other")
        assert shared.height >= min(first.height, other.height)
        for col in ("open", "high", "low", "close", "volume"):
            assert shared[col].equals(shared[f"{col}_other"].alias(col))


def test_a_run_records_what_produced_its_bars_and_the_config_it_ran(root, monkeypatch):
    """data source, seed, each data file's sha256 and the resolved config (secrets redacted) are kept in
    the run's row, so its decisions can be scored and reproduced later. Before: none of it was."""
    import hashlib
    import json

    from signalgen.config.loader import redacted

    monkeypatch.setenv("IKENNA_QC_API_TOKEN", "tok-3f9a-secret-value")  # clients/ikenna.yaml names it
    write_bars(root)
    cfg = files_config(root, EARLY)
    run_mode(cfg)
    run_mode(synthetic_config(root, EARLY))
    rows = table(root, "SELECT data_source, seed, data_files, config FROM runs ORDER BY started_at").rows(named=True)
    files, synthetic = rows
    expected = {f"5m/{s}.parquet": hashlib.sha256((root / f"var/data/5m/{s}.parquet").read_bytes()).hexdigest()
                for s in SYMBOLS}
    assert (files["data_source"], files["seed"], json.loads(files["data_files"])) == ("files", cfg.seed, expected)
    assert json.loads(files["config"]) == json.loads(json.dumps(redacted(cfg)))
    assert "IKENNA_QC_API_TOKEN (set)" in files["config"]  # the variable's name, never its value
    assert (synthetic["data_source"], synthetic["seed"], synthetic["data_files"]) == ("synthetic", 7, None)
    assert json.loads(synthetic["config"])["data_source"] == "synthetic"
    assert not any("tok-3f9a-secret-value" in (r["config"] or "") for r in rows)


def test_a_bad_file_fails_its_worker_alone(root):
    write_bars(root)
    data = root / "var/data/5m"
    (data / "SOLUSD.parquet").write_bytes(b"PAR1 not really a parquet file \x00\xff" * 100)
    (data / "XRPUSD.parquet").unlink()
    cfg = files_config(root, EARLY)
    report = run_mode(cfg)
    bad = {"odum.momentum_v1.SOLUSD.5m", "christian.consensus_v1.XRPUSD.5m", "christian.reversal_v1.SOLUSD.5m"}
    assert set(report.failures) == bad
    assert report.status == "failed"
    assert "XRPUSD" in report.failures["christian.consensus_v1.XRPUSD.5m"]
    assert "SOLUSD.parquet" in report.failures["odum.momentum_v1.SOLUSD.5m"]
    assert all("\n" not in why and len(why) <= 300 for why in report.failures.values())
    stored = table(root, "select client_id, strategy_id, symbol, count(*) n from signals group by all order by all")
    workers = {r[:3] for r in stored.iter_rows()}
    assert not workers & {tuple(w.split(".")[:3]) for w in bad}
    assert {("odum", "momentum_v1", "BTCUSD"), ("christian", "consensus_v1", "ETHUSD"),
            ("ikenna", "swing_high_v1", "ETHUSD")} <= workers  # the good workers' signals are stored ...
    streamed = pl.read_ndjson(root / "var/local-dev/stream/historical/odum.jsonl")  # the mode's folder
    assert set(streamed["symbol"]) == {"BTCUSD"}  # ... and routed
    assert streamed.height == stored.filter(pl.col("client_id") == "odum")["n"].item()
    assert list((root / "var/local-dev/out/historical/quantconnect/ikenna").rglob("*.csv"))
    [(status, signals)] = table(root, "select status, signals from runs").rows()
    assert status == "failed" and signals == stored["n"].sum()
    # only strategies whose workers all finished own (replace) their range in the QuantConnect CSV
    assert sorted(report.finished(worker_specs(cfg))) == [("ikenna", "swing_high_v1"), ("ikenna", "swing_low_v1")]


def test_an_empty_range_is_a_warning(root):
    write_bars(root)
    report = run_files(root, END + timedelta(days=1), END + timedelta(days=2), clients=["odum"])
    assert report.status == "ok" and report.totals["bars"] == 0
    assert any(p.startswith("odum.momentum_v1.BTCUSD.5m: no bars in (") for p in report.problems)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_and_records_it(root, signum):
    """A real process gets the signal mid-run: it flushes, records `stopped`, says so on one line."""
    long_end = datetime(2025, 3, 1, tzinfo=timezone.utc)
    cmd = [sys.executable, str(REPO / "strategy_runner.py"), "run", "--root", str(root), "--no-progress",
           "--start", "2025-01-01", "--end", f"{long_end:%Y-%m-%d}"]
    mode = root / "modes/historical.yaml"
    mode.write_text(mode.read_text().replace("chunk_bars: 50000", "chunk_bars: 500"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    store = root / "var/local-dev/signalgen.duckdb"
    deadline = time.monotonic() + 120
    try:
        while not _under_way(store):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never stored a signal"
            time.sleep(0.05)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    # stderr also carries the INFO log (run started / finished); besides it, one line says what happened
    lines = [line for line in err.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1 and f"stopped by {signal.Signals(signum).name}" in lines[0], err
    assert lines[0].startswith("error: stopped by "), err
    assert "recorded as stopped" in lines[0] and "Traceback" not in err
    with duckdb.connect(str(store), read_only=True) as con:
        [(status, bars, signals)] = con.execute("select status, bars, signals from runs").fetchall()
        [(stored,)] = con.execute("select count(*) from signals").fetchall()
    assert status == "stopped" and 0 < bars and signals == stored


# a record of signalgen/logs.py's format: "<UTC time> LEVEL logger: message k=v ..."
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR|CRITICAL) signalgen[\w.]*: ")


def _under_way(store: Path) -> bool:
    """True once the run has written decisions. The writing process holds DuckDB's lock, so watch the
    files' size: a fresh store after start_run is ~15 KB, the first batches of decisions add far more."""
    files = [store, store.with_name(store.name + ".wal")]
    return sum(f.stat().st_size for f in files if f.exists()) > 200_000


def test_a_failing_output_leaves_the_run_recorded_as_failed(root):
    (root / "var/local-dev").mkdir(parents=True)
    (root / "var/local-dev/out").write_text("a file where the output folder should be")
    cfg = load_config("local-dev", "historical", root=root, clients=["ikenna"],
                      overrides=Overrides(start=EARLY, end=EARLY + timedelta(hours=6)))
    with pytest.raises((OSError, SignalgenError)):
        run_mode(cfg)
    [(status,)] = table(root, "select status from runs").rows()
    assert status == "failed"


def test_when_even_recording_the_failure_fails_the_first_error_is_raised(root, monkeypatch):
    """A store that cannot record `failed` (e.g. its disk is full) must not hide why the run failed."""
    from signalgen.storage.duckdb import DuckDBStore

    record = DuckDBStore.finish_run

    def finish_run(self, run_id, **values):
        if values.get("status") == "failed":
            raise OSError("no space left on device")
        return record(self, run_id, **values)

    monkeypatch.setattr(DuckDBStore, "finish_run", finish_run)
    (root / "var/local-dev").mkdir(parents=True)
    (root / "var/local-dev/out").write_text("a file where the output folder should be")
    cfg = load_config("local-dev", "historical", root=root, clients=["ikenna"],
                      overrides=Overrides(start=EARLY, end=EARLY + timedelta(hours=6)))
    with pytest.raises(Exception) as raised:
        run_mode(cfg)
    assert str(root / "var/local-dev/out") in str(raised.value) and "no space" not in str(raised.value)
