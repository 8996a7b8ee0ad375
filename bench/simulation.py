"""Benchmark: simulation replay speed per worker, beside the raw single-row inference floor.

(a) floor: the strategy's two demo models called one feature row at a time (ONNX Runtime, one
    thread), as simulation and live call them — the least a per-bar worker can cost;
(b) replay: one worker (`run_worker`, the loop every mode shares) replaying synthetic 5m bars one at
    a time — per-bar validation, incremental features, single-row inference, decide — into an
    in-memory sink, so the figure is the worker's own compute, no I/O. The per-bar compute time
    (bar in -> decision out) comes from each decision's `latency_us`.
Prints the figures; `--write` also puts them and the command into docs/benchmarks.md (between markers).

    python bench/simulation.py --write       # 3 replays of 20,000 bars, documented
    python bench/simulation.py --bars 3000 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from historical import machine, write_section  # noqa: E402  (same machine line as the historical benchmark)

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
MODELS = ("swing_high", "swing_low")
MARK_BEGIN, MARK_END = "<!-- bench/simulation.py:begin -->", "<!-- bench/simulation.py:end -->"


def setup(root: Path, bars: int) -> None:
    """One client, one strategy with two models, one symbol: one worker."""
    for d in ("environments", "modes", "clients"):
        (root / d).mkdir(parents=True)
    (root / "registry").symlink_to(ROOT / "registry")
    (root / "environments" / "bench.yaml").write_text(
        "name: local-dev\nstorage: {type: duckdb, path: var/bench.duckdb}\nmessaging: {type: local, path: var/stream}\n"
        "paths: {registry_dir: registry, data_dir: var/data, output_dir: var/out}\n")
    end = START + timedelta(minutes=5 * bars)
    (root / "modes" / "bench.yaml").write_text(
        f"name: simulation\ndata_source: synthetic\nstart: {START.isoformat()}\nend: {end.isoformat()}\nseed: 7\n")
    models = "\n".join(f"      - {{model_id: {m}, confidence_threshold: 0.6, lookback_window: 60}}" for m in MODELS)
    (root / "clients" / "bench.yaml").write_text(
        "id: bench\nrouting: internal\nstrategies:\n  - id: swing_both_v1\n    symbols: [BTCUSD]\n"
        f"    timeframes: [5m]\n    aggregation: weighted\n    models:\n{models}\n")


def floor(rows: np.ndarray) -> dict[str, float]:
    """Seconds per bar of the two models called one row at a time (median of the per-row times):
    through `predict` (ONNX Runtime's `run`: input dict, output allocation) and through
    `predict_one` (buffers bound once with IOBinding: what the per-bar worker calls)."""
    from signalgen.models.backends import load_predictor
    from signalgen.models.registry import ModelRegistry

    reg = ModelRegistry(ROOT / "registry")
    predictors = [load_predictor(reg, m, "onnx", threads=1) for m in MODELS]
    out = {}
    for name, call in (("run", lambda p, i: p.predict(rows[i:i + 1])), ("bound", lambda p, i: p.predict_one(rows[i]))):
        for p in predictors:
            call(p, 0)  # warm-up
        times = []
        for i in range(len(rows)):
            t0 = time.perf_counter()
            for p in predictors:
                call(p, i)
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    return out


def call_variants(rows: np.ndarray) -> dict[str, float]:
    """Median seconds per bar (both models, one row each) of the ways to make a single-row ONNX
    Runtime call, each on sessions with the pipeline's options (1 intra-op thread, 1 inter-op
    thread, sequential); all give the same outputs."""
    import onnxruntime as ort

    from signalgen.models.backends import load_predictor
    from signalgen.models.registry import ModelRegistry

    reg = ModelRegistry(ROOT / "registry")
    paths = [reg.path(m, reg.card(m).version) / "model.onnx" for m in MODELS]

    def sessions(**entries: str) -> list:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for key, value in entries.items():
            opts.add_session_config_entry(key, value)
        return [ort.InferenceSession(str(p), sess_options=opts, providers=["CPUExecutionProvider"]) for p in paths]

    plain, no_spin = sessions(), sessions(**{"session.intra_op.allow_spinning": "0"})
    names = [(s.get_inputs()[0].name, next(o.name for o in s.get_outputs() if o.shape[1:] == [2]))
             for s in plain]  # (input, the (n, 2) probabilities)
    buffer = np.empty((1, rows.shape[1]), dtype=np.float32)
    value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares `buffer`'s memory
    bound = [load_predictor(reg, m, "onnx", threads=1) for m in MODELS]

    def run(group):
        return lambda i: [s.run([o], {n: rows[i:i + 1]}) for s, (n, o) in zip(group, names)]

    def with_ort_values(i):
        buffer[0] = rows[i]
        return [s.run_with_ort_values([o], {n: value}) for s, (n, o) in zip(plain, names)]

    variants = {"`run`, input dict, new output": run(plain),
                "`run`, `session.intra_op.allow_spinning` = 0": run(no_spin),
                "`run_with_ort_values`, input OrtValue reused": with_ort_values,
                "IOBinding, input and output bound once (`predict_one`)": lambda i: [p.predict_one(rows[i]) for p in bound]}
    out = {}
    for name, call in variants.items():
        call(0)  # warm-up
        times = []
        for i in range(len(rows)):
            t0 = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    return out


def stages(root: Path) -> dict[str, float]:
    """Median microseconds per bar of each step of the per-bar path, timed one by one over the same
    replay (validation and the sink are outside the worker's compute figure)."""
    from signalgen.config.loader import load_config
    from signalgen.config.workers import worker_specs
    from signalgen.data.validation import BarValidator
    from signalgen.modes.engine import BarPreparer, WorkerEngine
    from signalgen.config.workers import history_bars
    from signalgen.modes.sources import bar_chunks
    from signalgen.models.registry import ModelRegistry
    from signalgen.modes.worker import bar_feed

    cfg = load_config(root / "environments/bench.yaml", root / "modes/bench.yaml", root=root)
    [spec] = worker_specs(cfg)
    engine = WorkerEngine(spec, ModelRegistry(root / "registry"), backend="onnx", now=datetime.now(timezone.utc),
                          mode="simulation", run_id="bench")
    validator, preparer = BarValidator(spec.timeframe), BarPreparer(engine.params)
    steps: dict[str, list[int]] = {"validate": [], "features": [], "decide": []}
    clock = time.perf_counter_ns
    for bar in bar_feed(bar_chunks(cfg, spec.symbol, spec.timeframe, 50_000, history=history_bars(spec))):
        t0 = clock()
        validator.push(bar)
        t1 = clock()
        prepared = preparer.push(bar)
        t2 = clock()
        engine.decide(prepared, prepared.bar_time_us)
        t3 = clock()
        for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2)):
            steps[name].append(dt)
    return {name: float(np.median(v)) / 1000 for name, v in steps.items()}


class HeldWriter:
    """The writer's interface for `BatchingSink`, keeping the joined batches (no store)."""

    def __init__(self) -> None:
        self.batches: list = []
        self.checkpoints: dict = {}

    def record(self, spec, decisions) -> None:
        self.batches.append(decisions)


def replay(root: Path, batching: bool = False) -> dict:
    """One replay into an in-memory sink, or (`batching`) into the simulation mode's `BatchingSink`
    (per-bar decisions joined into 4,096-bar batches for the writer) over a writer that only holds them."""
    from signalgen.config.loader import load_config
    from signalgen.config.workers import worker_specs
    from signalgen.config.workers import history_bars
    from signalgen.modes.simulation import BatchingSink
    from signalgen.modes.sources import bar_chunks
    from signalgen.modes.worker import MemorySink, ReplayClock, WorkerContext, bar_feed, run_worker

    cfg = load_config(root / "environments/bench.yaml", root / "modes/bench.yaml", root=root)
    [spec] = worker_specs(cfg)
    frames = list(bar_chunks(cfg, spec.symbol, spec.timeframe, 50_000, history=history_bars(spec)))
    ctx = WorkerContext(str(root / "registry"), "onnx", datetime.now(timezone.utc), "simulation", "bench",
                        emit_from=cfg.start)
    memory, held = MemorySink(), HeldWriter()
    sink = BatchingSink(held) if batching else memory
    t0, cpu0 = time.perf_counter(), time.thread_time()
    outcome = run_worker(spec, bar_feed(frames), sink, ReplayClock(0), ctx)
    if batching:
        sink.drain()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0  # one thread: ORT runs on the caller's
    decisions = held.batches if batching else memory.decisions
    latency = np.concatenate([np.asarray(d.latency_us).ravel() for d in decisions if d.bars])
    return {"bars": outcome.bars, "signals": outcome.signals, "wall_s": wall, "cpu_s": cpu,
            "mean_us": float(latency.mean()),
            "p50_us": float(np.percentile(latency, 50)), "p99_us": float(np.percentile(latency, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bars", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3, help="replays; the median is reported, with the range")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md with these figures (default: print only)")
    args = ap.parse_args()

    from signalgen.data.synthetic import synthetic_bars
    from signalgen.features.batch import feature_array

    x = feature_array(synthetic_bars(["BTCUSD"], "5m", START, START + timedelta(minutes=5 * 3000), seed=11))
    x = np.ascontiguousarray(x[np.isfinite(x).all(axis=1)][:2000])
    runs, floors, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        setup(Path(tmp), args.bars)
        floors.append(floor(x))
        for i in range(args.repeat):
            runs.append(replay(Path(tmp)))
            floors.append(floor(x))
            loads.append(os.getloadavg()[0])
            print(f"replay {i + 1}: {runs[-1]}, floor {floors[-1]}, load {loads[-1]:.1f}", flush=True)
        batched = replay(Path(tmp), batching=True)
        step = stages(Path(tmp))
        variants = call_variants(x)
    # like the replays, the floor is taken as the fastest of its measurements around them
    run_floor = min(f["run"] for f in floors)
    bound = min(f["bound"] for f in floors)
    rates = sorted(r["bars"] / r["wall_s"] for r in runs)
    cpu_rates = sorted(r["bars"] / r["cpu_s"] for r in runs)
    means = sorted(r["mean_us"] for r in runs)
    p50s, p99s = sorted(r["p50_us"] for r in runs), sorted(r["p99_us"] for r in runs)
    mid = len(runs) // 2
    rate, r = rates[mid], runs[0]

    def spread(values: list[float], fmt: str) -> str:
        return f"{format(values[mid], fmt)} ({format(values[0], fmt)}-{format(values[-1], fmt)})"

    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    command = "python bench/simulation.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "write" and v != ap.get_default(k)) + (" --write" if args.write else "")
    text = "\n".join([
        MARK_BEGIN,
        "## Simulation replay per worker vs the single-row inference floor",
        "",
        f"Command: `{command}` — run on {datetime.now(timezone.utc):%Y-%m-%d}, {machine()}. "
        f"Median of {args.repeat} replays of {r['bars']:,} bars (range in brackets); the 1-minute load average "
        f"after each replay was {', '.join(f'{x:.1f}' for x in loads)} on this shared 2-core machine.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| (a) floor: both models, one row at a time via `predict` (ONNX Runtime `run`), median per bar | "
        f"{run_floor * 1e6:.1f} µs = {1 / run_floor:,.0f} bars/s |",
        f"| (a') floor: both models via `predict_one` (IOBinding, buffers bound once; the worker's call) | "
        f"**{bound * 1e6:.1f} µs** = {1 / bound:,.0f} bars/s |",
        f"| (b) replay of one worker, one bar at a time, in-memory sink | **{spread(rates, ',.0f')} bars/s** "
        f"({r['signals']:,} signals) |",
        f"| (b') the same replays per CPU-second of the worker's thread (a core of its own, no preemption) | "
        f"{spread(cpu_rates, ',.0f')} bars/s |",
        f"| (b'') one replay into the simulation mode's `BatchingSink` (4,096-bar batches joined; writer "
        f"holding them, no store) | {batched['bars'] / batched['wall_s']:,.0f} bars/s |",
        f"| worker compute per bar (bar in -> decision out, no I/O), p50 | **{spread(p50s, ',.0f')} µs** |",
        f"| worker compute per bar, p99 | {spread(p99s, ',.0f')} µs |",
        f"| worker compute per bar, mean | {spread(means, ',.0f')} µs |",
        f"| ratio (b) / (a') | {rate * bound:.2f} |",
        f"| per bar, p50 of each step (one more pass): bar validation / incremental features + window / "
        f"decide (both models + signal pipeline) | {step['validate']:.1f} / {step['features']:.1f} / "
        f"{step['decide']:.1f} µs |",
        "",
        "Single-row ONNX Runtime calls, both models, median per bar (same outputs every way):",
        "",
        "| call | µs per bar |",
        "| --- | --- |",
        *(f"| {name} | {v * 1e6:.1f} |" for name, v in variants.items()),
        "",
        f"Targets (issue 7): p50 <= 100 µs: {met(p50s[mid] <= 100)}; >= 20,000 bars/s per worker: "
        f"{met(rate >= 20_000)} (per CPU-second: {met(cpu_rates[mid] >= 20_000)}).",
        MARK_END,
    ])
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
