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


class _ListWriter:
    """The writer's record/checkpoints interface, keeping what it is handed."""

    def __init__(self) -> None:
        self.batches: list = []
        self.checkpoints: dict = {}

    def record(self, spec, decisions) -> None:
        self.batches.append((spec.id, decisions))


def test_batching_sink_hands_the_writer_one_batch_per_size_bars_of_a_worker(root):
    """Batches of `size` bars, a partial one when the worker changes and at drain; the joined
    batches are the worker's per-bar decisions, record for record."""
    from signalgen.config.workers import worker_specs
    from signalgen.modes.simulation import BatchingSink
    from signalgen.modes.worker import MemorySink, ReplayClock, bar_feed, run_worker
    from tests.unit.modes.test_records import assert_bit_identical
    from tests.unit.modes.test_worker_equivalence import config, context, raw

    cfg = config(root, "synthetic")
    writer = _ListWriter()
    size = 500
    sink = BatchingSink(writer, size=size)
    specs, per_bar = [s for s in worker_specs(cfg) if s.timeframe == "5m"][:2], {}
    for spec in specs:
        memory = MemorySink()
        run_worker(spec, bar_feed(raw(cfg, spec)), memory, ReplayClock(), context(cfg))
        per_bar[spec.id] = memory
        for decisions in memory.decisions:
            sink.record(spec, decisions)
    sink.drain()
    expected = []
    for spec in specs:
        n = len(per_bar[spec.id].decisions)
        assert n > size and n % size
        expected += [(spec.id, size)] * (n // size) + [(spec.id, n % size)]
    assert [(wid, d.bars) for wid, d in writer.batches] == expected
    for spec in specs:
        frames = [d.frames() for wid, d in writer.batches if wid == spec.id]
        for i, want in enumerate(per_bar[spec.id].frames()):
            assert_bit_identical(pl.concat([f[i] for f in frames]), want)
