"""Store write throughput: N rejection rows upserted through write_decisions in batches, fresh then replayed.

    PYTHONPATH=. python bench/store_write.py [rows] [batch]

Prints rows/s for the fresh pass (empty store) and the replay pass (every row already there).
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path


from signalgen.storage.duckdb import DuckDBStore
from signalgen.signals.types import SIGNAL_SCHEMA
from tests.unit.outputs.factories import rejection_frame


def main(rows: int = 1_000_000, batch: int = 250_000) -> None:
    # four symbols take turns bar by bar, as a worker's batches would arrive per symbol
    df = rejection_frame(rows, symbols=("AAPL", "MSFT", "GOOG", "AMZN"), step=timedelta(minutes=5))
    batches = [df.slice(i, batch) for i in range(0, rows, batch)]
    none = SIGNAL_SCHEMA.to_frame()
    with tempfile.TemporaryDirectory() as tmp, DuckDBStore(Path(tmp) / "bench.duckdb") as store:
        for label in ("fresh", "replayed"):
            t0 = time.perf_counter()
            for b in batches:
                store.write_decisions(none, b)
            store.con.execute("CHECKPOINT")
            elapsed = time.perf_counter() - t0
            print(f"{label:9s} {rows:,} rows in {elapsed:.2f} s: {rows / elapsed:,.0f} rows/s")
        assert store.count("rejections") == rows


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
