"""Store write throughput through write_decisions.

    PYTHONPATH=. python bench/store_write.py [rows] [batch]          # a batch run's chunks
    PYTHONPATH=. python bench/store_write.py --groups W G            # a streaming fleet's group commits

Batch: N rejection rows upserted in batches, fresh then replayed; rows/s and CPU seconds for each pass.
Groups: G group commits of W workers x 1 bar each (every 30th a signal), as a writer serving W
streaming workers stores them, fresh then replayed; CPU ms (this process) and wall ms per group.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path


from signalgen.storage.duckdb import DuckDBStore
from signalgen.signals.types import SIGNAL_SCHEMA
from tests.unit.outputs.factories import rejection_frame, signal_frame


def main(rows: int = 1_000_000, batch: int = 250_000) -> None:
    # four symbols take turns bar by bar, as a worker's batches would arrive per symbol
    df = rejection_frame(rows, symbols=("AAPL", "MSFT", "GOOG", "AMZN"), step=timedelta(minutes=5))
    batches = [df.slice(i, batch) for i in range(0, rows, batch)]
    none = SIGNAL_SCHEMA.to_frame()
    with tempfile.TemporaryDirectory() as tmp, DuckDBStore(Path(tmp) / "bench.duckdb") as store:
        for label in ("fresh", "replayed"):
            c0, t0 = time.process_time(), time.perf_counter()
            for b in batches:
                store.write_decisions(none, b)
            store.con.execute("CHECKPOINT")
            cpu, elapsed = time.process_time() - c0, time.perf_counter() - t0
            print(f"{label:9s} {rows:,} rows in {elapsed:.2f} s ({cpu:.2f} s CPU): {rows / elapsed:,.0f} rows/s")
        assert store.count("rejections") == rows


def groups(workers: int = 500, count: int = 60) -> None:
    symbols = tuple(f"S{i:04d}" for i in range(workers))
    n = workers * count
    rej = rejection_frame(n, symbols=symbols, mode="mock").with_row_index("i")
    sig = signal_frame(n, symbols=symbols, mode="mock").with_row_index("i")
    # row i is worker i % W's bar i // W: every 30th decision a signal, the others rejections
    is_sig = rej["i"] % 30 == 0
    rej, sig = rej.filter(~is_sig).drop("i"), sig.filter(is_sig).drop("i")
    per = lambda df, g: df.filter((df["bar_time"] == df["bar_time"].unique().sort()[g]))  # noqa: E731
    cut = [(per(sig, g), per(rej, g)) for g in range(count)]
    with tempfile.TemporaryDirectory() as tmp, DuckDBStore(Path(tmp) / "bench.duckdb") as store:
        for label in ("fresh", "replayed"):
            c0, t0 = time.process_time(), time.perf_counter()
            for s, r in cut:
                store.write_decisions(s, r)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            print(f"{label:9s} {count} groups of {workers} workers x 1 bar: {1e3 * cpu / count:.1f} ms CPU, "
                  f"{1e3 * wall / count:.1f} ms wall per group")
        assert store.count("rejections") + store.count("signals") == n


if __name__ == "__main__":
    if sys.argv[1:2] == ["--groups"]:
        groups(*map(int, sys.argv[2:]))
    else:
        main(*map(int, sys.argv[1:]))
