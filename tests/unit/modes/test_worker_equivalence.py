"""Simulation == historical: the same bars replayed one at a time through `run_worker` (incremental
features, single-row inference, replay clock) and decided in chunks by the batch path give the
same decision rows: ids, directions, reasons, and bit-identical floats."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from signalgen.config.loader import Overrides, load_config
from signalgen.data.sample import import_sample
from signalgen.data.synthetic import synthetic_bars
from signalgen.config.workers import history_bars
from signalgen.modes.sources import bar_chunks, chunk_feed
from signalgen.modes.worker import MemorySink, ReplayClock, WorkerContext, bar_feed, run_worker
from signalgen.config.workers import worker_specs

STARTED = datetime.now(timezone.utc) + timedelta(days=1)  # after the session's models are trained
START = datetime(2025, 1, 2, tzinfo=timezone.utc)
END = datetime(2025, 1, 8, tzinfo=timezone.utc)
CHUNK = 100  # small, so the batch path crosses many chunk boundaries


def config(root: Path, source: str, start=START, end=END, mode: str = "historical"):
    return load_config("local-dev", mode, root=root, overrides=Overrides(start=start, end=end, data_source=source))


def context(cfg) -> WorkerContext:
    return WorkerContext(str(Path(cfg.root) / cfg.environment.paths.registry_dir), "onnx", STARTED,
                         "historical", "run-1", cfg.start)


def raw(cfg, spec):
    return bar_chunks(cfg, spec.symbol, spec.timeframe, CHUNK, history=history_bars(spec))


def historical(cfg, spec) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The batch runner's path: validated chunks (`chunk_feed`) through run_worker, minus the writer."""
    sink = MemorySink()
    run_worker(spec, chunk_feed(cfg, spec, CHUNK), sink, ReplayClock(), context(cfg))
    return *sink.frames(), pl.concat(sink.bar_rejections) if sink.bar_rejections else None


def replay(cfg, spec, feed=None) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    sink = MemorySink()
    outcome = run_worker(spec, feed if feed is not None else bar_feed(raw(cfg, spec)), sink, ReplayClock(),
                         context(cfg))
    rejected = pl.concat(sink.bar_rejections) if sink.bar_rejections else None
    sig, rej = sink.frames()
    assert outcome.checkpoint == sink.checkpoints[spec.id] == max(sig["bar_time"].max(), rej["bar_time"].max())
    return sig, rej, rejected


def assert_same_decisions(a: tuple, b: tuple) -> None:
    (sig_a, rej_a, bars_a), (sig_b, rej_b, bars_b) = a, b
    assert sig_a.height > 0 and rej_a.height > 0
    # latency is a measurement, not a decision; everything else must be identical
    for x, y in ((sig_a, sig_b), (rej_a, rej_b)):
        assert_frame_equal(x.drop("latency_us", strict=False), y.drop("latency_us", strict=False), check_exact=True)
        for column in {"confidence", "strength", "weight", "magnitude"} & set(x.columns):
            assert np.array_equal(x[column].to_numpy().view(np.int64), y[column].to_numpy().view(np.int64))
    if bars_a is None or bars_b is None:
        assert (bars_a is None or bars_a.height == 0) and (bars_b is None or bars_b.height == 0)
    else:
        assert_frame_equal(bars_a, bars_b)


def spec_named(cfg, worker_id: str):
    """A demo worker: momentum on SOLUSD signals often and trips the trend filter, consensus on
    ETHUSD aggregates two models."""
    return next(s for s in worker_specs(cfg) if s.id == worker_id)


def test_synthetic_bars(root):
    cfg = config(root, "synthetic")
    spec = spec_named(cfg, "odum.momentum_v1.SOLUSD.5m")
    batch = historical(cfg, spec)
    assert_same_decisions(batch, replay(cfg, spec))
    assert_same_decisions(batch, replay(cfg, spec, feed=raw(cfg, spec)))  # run_worker on chunks too


def write_spoiled(root: Path, spec) -> None:
    """The spec's symbol as a file with gaps, bad values, a repeated and a late bar."""
    bars = synthetic_bars([spec.symbol], "5m", START - timedelta(days=2), END, seed=11)
    rows = bars.to_dicts()
    rows[700]["close"] = float("nan")
    rows[720]["high"] = rows[720]["low"] * 0.5
    rows[760]["volume"] = -1.0
    rows.insert(800, dict(rows[799]))                                # a repeat
    rows.insert(820, dict(rows[810]))                                # a late bar
    spoiled = pl.DataFrame(rows, schema=bars.schema)
    spoiled = spoiled.filter(~pl.int_range(pl.len()).is_between(900, 930))  # a gap of 31 bars
    folder = root / "var/data/5m"
    folder.mkdir(parents=True, exist_ok=True)
    spoiled.write_parquet(folder / f"{spec.symbol}.parquet")


def test_files_with_gaps_and_bad_bars(root):
    cfg = config(root, "files")
    spec = spec_named(cfg, "christian.consensus_v1.ETHUSD.5m")
    write_spoiled(root, spec)
    batch = historical(cfg, spec)
    assert set(batch[2]["reason"]) >= {"non_finite", "high_below_low", "negative_volume", "duplicate_time", "gap"}
    assert_same_decisions(batch, replay(cfg, spec))


def test_real_daily_sample(root):
    cfg = config(root, "files", start=datetime(2012, 1, 1, tzinfo=timezone.utc),
                 end=datetime(2013, 12, 31, tzinfo=timezone.utc), mode="simulation")
    import_sample(Path(cfg.root) / cfg.environment.paths.data_dir)
    spec = next(s for s in worker_specs(cfg) if s.timeframe == "1d")
    assert_same_decisions(historical(cfg, spec), replay(cfg, spec))


def test_bars_after_t_cannot_change_a_decision_at_or_before_t(root):
    cfg = config(root, "files")
    spec = spec_named(cfg, "christian.consensus_v1.ETHUSD.5m")
    write_spoiled(root, spec)
    t = datetime(2025, 1, 2, 20, tzinfo=timezone.utc)
    sig, rej, _ = replay(cfg, spec)

    def later_changed(frames):
        for frame in frames:
            after = pl.col("bar_time") > t
            yield frame.with_columns(
                close=pl.when(after).then(pl.col("close") * 1.07).otherwise("close"),
                high=pl.when(after).then(pl.col("high") * 1.2).otherwise("high"),
                volume=pl.when(after).then(pl.col("volume") * 3).otherwise("volume"),
            ).filter(~(after & (pl.int_range(pl.len()) % 7 == 0)))

    sig2, rej2, _ = replay(cfg, spec, feed=bar_feed(later_changed(raw(cfg, spec))))
    before = pl.col("bar_time") <= t
    for x, y in ((sig, sig2), (rej, rej2)):
        assert x.filter(before).height > 0
        assert_frame_equal(x.filter(before).drop("latency_us", strict=False),
                           y.filter(before).drop("latency_us", strict=False), check_exact=True)
    assert not sig.filter(~before).drop("latency_us").equals(sig2.filter(~before).drop("latency_us"))
