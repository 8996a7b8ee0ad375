"""`Decisions.records()` (plain rows, the streaming workers' cheap path) gives exactly the frames of
`Decisions.frames()` (polars): every column, null and NaN where they are, floats bit for bit."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import polars as pl
from polars.testing import assert_frame_equal

from signalgen.config.workers import worker_specs
from signalgen.errors import SignalgenError
from signalgen.outputs import DESTINATIONS
from signalgen.signals.records import Decisions, Records
from signalgen.modes.worker import MemorySink, ReplayClock, bar_feed, run_worker
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA
from tests.unit.modes.test_worker_equivalence import config, context, raw


def assert_bit_identical(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.schema == b.schema
    assert_frame_equal(a, b, check_exact=True)
    for column, dtype in a.schema.items():
        if dtype == pl.Float64:  # NaN and -0.0 where they were
            assert np.array_equal(a[column].to_numpy().view(np.int64), b[column].to_numpy().view(np.int64))


def per_bar_decisions(root, n_workers: int = 3) -> list[Decisions]:
    cfg = config(root, "synthetic")
    out = []
    for spec in worker_specs(cfg)[:n_workers]:
        sink = MemorySink()
        run_worker(spec, bar_feed(raw(cfg, spec)), sink, ReplayClock(), context(cfg))
        out += sink.decisions
    return out


def test_records_are_the_frames_bit_for_bit(root):
    ds = per_bar_decisions(root)
    assert sum(d.signals for d in ds) > 0 and sum(d.bars - d.signals for d in ds) > 0
    # with a NaN model output and a NaN confidence: nulls in `models`, NaN kept in `confidence`
    d = ds[-1]
    preds = d.predictions.copy()
    preds[0, 0] = np.nan
    conf = d.evaluation.confidence.astype(np.float64).copy()
    conf[0] = np.nan
    spoiled = Decisions(d.params, type(d.evaluation)(**{**vars(d.evaluation), "confidence": conf}), d.bar_time_us,
                        d.now_us, preds, d.mode, d.run_id, d.latency_us)
    for group in ([x] for x in ds + [spoiled]):
        one = Decisions.concat(group)
        for got, want in zip(one.records().frames(), one.frames()):
            assert_bit_identical(got, want)
    # one frame for many batches (of several workers), as the writer builds per group commit
    joined = Records.join([pickle.loads(pickle.dumps(x.records())) for x in ds])
    for got, want in zip(joined.frames(), (pl.concat([x.frames()[i] for x in ds]) for i in (0, 1))):
        assert_bit_identical(got, want)
    assert joined.bars == sum(x.bars for x in ds)
    assert joined.last_bar_time == max(max(f["bar_time"].max() for f in x.frames() if f.height) for x in ds)


def test_empty_records():
    empty = Records([], [])
    for got, schema in zip(empty.frames(), (SIGNAL_SCHEMA, REJECTION_SCHEMA)):
        assert_frame_equal(got, pl.DataFrame(schema=schema))
    assert empty.bars == 0 and empty.last_bar_time is None


def test_the_writer_refuses_rows_of_another_tenant(root, tmp_path):
    """Row batches are routed by their client column: a worker's rows naming another client are
    refused before the store, and nothing reaches any output."""
    from signalgen.outputs.memory import ListOutput
    from signalgen.storage.writer import SignalWriter
    from tests.unit.modes.test_recorder import SlowOrFailingStore

    cfg = config(root, "synthetic")
    specs = worker_specs(cfg)
    d = next(x for x in per_bar_decisions(root, 4) if x.signals)  # the first 5m worker has signals whatever the bars
    rec = d.records()
    other = next(s for s in specs if s.client.id != specs[0].client.id)
    forged = Records([(r[0], other.client.id, *r[2:]) for r in rec.signals], [])
    store = SlowOrFailingStore()
    outputs = {(s.client.id, dest): ListOutput(s.client.id) for s in specs for dest in DESTINATIONS[s.routing]}
    writer = SignalWriter(store, outputs, mode=d.mode)
    writer.record_group([(specs[0], forged)])
    with pytest.raises(SignalgenError, match="another client"):
        writer.flush()
    assert store.calls == 0 and all(not o.batches and not o._pending for o in outputs.values())
