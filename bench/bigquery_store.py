"""Load + MERGE throughput of the BigQuery store on the emulator: N decisions written in batches of B
(a fresh range, then the same range replayed), decisions per second.

    scripts/bqemulator-venv && .venv/bin/python bench/bigquery_store.py [--endpoint http://127.0.0.1:P]

Without --endpoint it starts its own emulator (tests/integration/bigquery/servers.py)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from signalgen.signals.types import SIGNAL_SCHEMA  # noqa: E402
from signalgen.storage.bigquery import BigQueryStore  # noqa: E402
from tests.unit.outputs.factories import rejection_frame, signal_frame  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint")
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=4_096)
    args = parser.parse_args()
    server = None
    if args.endpoint is None:
        from tests.integration.bigquery.servers import BigQueryEmulator

        server = BigQueryEmulator(Path(tempfile.mkdtemp(prefix="bqbench-"))).start()
        args.endpoint = server.endpoint
    try:
        half = args.decisions // 2  # signals and rejections of distinct bars, 8 symbols
        symbols = tuple(f"S{i}" for i in range(8))
        sig = signal_frame(half, symbols=symbols)
        rej = rejection_frame(args.decisions - half, symbols=symbols, start=sig["bar_time"].max())
        rej = rej.filter(pl.col("bar_time") > sig["bar_time"].max())
        both = pl.concat([sig.with_columns(kind=pl.lit("s")), rej.with_columns(kind=pl.lit("r"))], how="diagonal")
        with BigQueryStore("signalgen-dev", f"bench{uuid.uuid4().hex[:8]}", api_endpoint=args.endpoint) as store:
            for label in ("fresh", "replayed"):
                t0, n = time.perf_counter(), 0
                for i in range(0, both.height, args.batch):
                    part = both.slice(i, args.batch)
                    s = part.filter(kind="s").select(SIGNAL_SCHEMA.names())
                    r = part.filter(kind="r").select(rej.columns)
                    n += store.write_decisions(s, r).rows
                elapsed = time.perf_counter() - t0
                print(f"{label}: {n} decisions in batches of {args.batch}: {elapsed:.1f} s, {n / elapsed:,.0f} decisions/s")
            assert store.count("signals") + store.count("rejections") == n
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
