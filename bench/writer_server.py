"""Benchmark: the writer of a fleet (WriterServer) fed by worker processes through RemoteSink.

Each worker process (forkserver, as the manager starts them) first computes the real decisions of
its worker over `--bars` synthetic 5m bars (not timed), cut into one-bar batches as a streaming
worker records them; then all workers start together and send:

  flood:  as fast as the writer takes them (the writer's group-commit throughput: decisions/s);
  paced:  `--rate` bars per second per worker (a streaming fleet; ack latency p50/p99 = the time
          from a batch's send to its ack: group wait + store transaction + output flush + checkpoint).

The writer runs in this process with the demo clients' real outputs (QuantConnect CSV + local stream)
and the DuckDB store.

    python bench/writer_server.py                       # 8 workers, 2,000 bars each, paced at 20 bars/s
    python bench/writer_server.py --workers 4 --bars 500 --rate 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START = datetime(2025, 1, 1, tzinfo=timezone.utc)


def sender(cfg, spec, address: str, authkey: bytes, rate: float, go, results) -> None:
    """One worker process: compute its decisions, wait for `go`, send them (paced if rate > 0)."""
    from signalgen.config.workers import history_bars
    from signalgen.modes.sources import bar_chunks
    from signalgen.modes.worker import MemorySink, ReplayClock, WorkerContext, bar_feed, run_worker
    from signalgen.transports.local import RemoteSink

    sink = RemoteSink(address, authkey, spec)
    # the one-bar batches a streaming worker records: the per-bar path into memory, sent later
    frames = bar_chunks(cfg, spec.symbol, spec.timeframe, 1 << 20, history=history_bars(spec))
    ctx = WorkerContext(str(Path(cfg.root) / "registry"), "onnx", datetime.now(timezone.utc), cfg.mode.name.value,
                        sink.run_id, emit_from=cfg.start)
    memory = MemorySink()
    run_worker(spec, bar_feed(frames), memory, ReplayClock(0), ctx)
    batches = [d for d in memory.decisions if d.bars]
    go.wait()
    t0 = time.perf_counter()
    for i, d in enumerate(batches):
        if rate > 0:  # wait for the bar's time reading acks as they come (else they wait for the next bar)
            while (wait := t0 + i / rate - time.perf_counter()) > 0:
                sink.read_answers(wait)
        sink.record(spec, d)
    sink.flush()
    t1 = time.perf_counter()
    sink.close()
    results.put((len(batches), t0, t1, sink.ack_latencies))


def run(workers: int, bars: int, rate: float, base: Path) -> dict:
    from signalgen.config.loader import Overrides, load_config
    from signalgen.config.workers import worker_specs
    from signalgen.transports.local import WriterServer
    from signalgen.storage import open_store

    root = base / f"root-{rate}"
    for folder in ("environments", "modes", "clients"):
        shutil.copytree(ROOT / folder, root / folder)
    (root / "clients" / "ada.yaml").unlink()  # daily bars: the 5m clients have 9 workers
    (root / "registry").symlink_to(ROOT / "registry")
    cfg = load_config("local-dev", "simulation", root=root, overrides=Overrides(
        start=START, end=START + timedelta(minutes=5 * bars), data_source="synthetic"))
    specs = worker_specs(cfg)[:workers]
    store = open_store(cfg)
    key = secrets.token_bytes(32)
    address = str(Path(tempfile.mkdtemp(prefix="sgb-", dir="/tmp")) / "w.sock")
    server = WriterServer(cfg, store, run_id="bench", address=address, authkey=key).start()
    groups: list[tuple[int, int, float]] = []
    server.on_commit = lambda n, b, s: groups.append((n, b, s))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["signalgen.process.preload"])
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=sender, args=(cfg, s, address, key, rate, go, results)) for s in specs]
    for p in procs:
        p.start()
    while len(server.connected()) < len(specs):
        time.sleep(0.05)
    time.sleep(2.0 + 0.02 * bars)  # let every worker compute its decisions first
    groups.clear()
    go.set()
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    server.close()
    store.close()
    total = sum(n for n, *_ in out)
    span = max(t1 for _, _, t1, _ in out) - min(t0 for _, t0, _, _ in out)
    lat = sorted(x for *_, ls in out for x in ls)
    return {"workers": len(specs), "bars": total, "seconds": span, "decisions_per_s": total / span,
            "acks": len(lat), "ack_p50_ms": 1e3 * lat[len(lat) // 2], "ack_p99_ms": 1e3 * lat[int(len(lat) * 0.99)],
            "groups": len(groups), "batches_per_group": statistics.mean(n for n, _, _ in groups),
            "commit_p50_ms": 1e3 * sorted(s for *_, s in groups)[len(groups) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--bars", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=20.0, help="bars/s per worker in the paced run")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    try:
        for name, rate in (("flood", 0.0), ("paced", a.rate)):
            r = run(a.workers, a.bars, rate, base)
            print(f"{name:5s} {r['workers']} workers x {a.bars} one-bar batches"
                  + (f" at {rate:g} bars/s each" if rate else "") +
                  f": {r['decisions_per_s']:,.0f} decisions/s; ack p50 {r['ack_p50_ms']:.1f} ms, "
                  f"p99 {r['ack_p99_ms']:.1f} ms over {r['acks']:,} acks; {r['groups']} group commits "
                  f"({r['batches_per_group']:.1f} batches each, commit p50 {r['commit_p50_ms']:.1f} ms)", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
