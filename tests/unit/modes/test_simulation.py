"""`run --mode simulation` end to end: the same stored decisions as `run --mode historical` over the
same bars, bit for bit, each in its own mode's namespace."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from signalgen.config.loader import Overrides, load_config
from signalgen.modes import run_mode
from signalgen.outputs.local import read_stream

REPO = Path(__file__).resolve().parents[3]
START = datetime(2025, 1, 1, tzinfo=timezone.utc)
END = datetime(2025, 1, 2, 12, tzinfo=timezone.utc)  # 432 five-minute bars per worker
CLIENTS = ["christian", "odum"]  # majority of 4 models, unanimous, weighted with the trend filter


def _rows(root: Path, table: str, mode: str) -> pl.DataFrame:
    # every stored field but the ones that name the run or time its compute; floats compared as bits
    drop = {"mode", "run_id", "latency_us"}
    with duckdb.connect(str(root / "var/local-dev/signalgen.duckdb"), read_only=True) as con:
        cols = [c for c, in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall() if c not in drop]
        key = "signal_id" if table == "signals" else "rejection_id"
        select = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" if c == key else c for c in cols)
        df = con.sql(f"SELECT {select} FROM {table} WHERE mode = '{mode}' ORDER BY {key}").pl()
    floats = [c for c, t in df.schema.items() if t == pl.Float64]
    return df.with_columns(pl.col(floats).reinterpret(signed=True))


def test_simulation_stores_exactly_the_decisions_of_historical(root):
    reports = {}
    for mode in ("historical", "simulation"):
        cfg = load_config("local-dev", mode, root=root, clients=CLIENTS,
                          overrides=Overrides(start=START, end=END, data_source="synthetic"))
        reports[mode] = run_mode(cfg)
    hist, sim = reports["historical"], reports["simulation"]
    assert sim.status == hist.status == "ok" and sim.totals == hist.totals and hist.totals["bars"] == 5 * 432
    assert hist.totals["signals"] > 0
    for table in ("signals", "rejections"):
        a, b = _rows(root, table, "historical"), _rows(root, table, "simulation")
        assert a.height > 0 and a.equals(b), table
    # each mode streams to its own file; the same signals in both
    streams = [read_stream(root / f"var/local-dev/stream/{mode}/odum.jsonl").drop("mode", "run_id", "latency_us")
               for mode in ("historical", "simulation")]
    assert streams[0].height > 0 and streams[0].equals(streams[1])


def test_cli_runs_the_simulation_preset_on_the_demo(root):
    proc = subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), "run", "--mode", "simulation",
                           "--root", str(root), "--client", "odum", "--end", "2025-01-01T06:00:00Z", "-o", "json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"mode": "simulation"' in proc.stdout and '"bars": 144' in proc.stdout
