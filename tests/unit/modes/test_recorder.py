"""The recorder's writer thread: failures surface, a slow store applies backpressure, routing by client."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from signalgen.config.loader import Overrides, load_config
from signalgen.errors import SignalgenError
from signalgen.modes.engine import Decisions, strategy_params
from signalgen.models.registry import ModelRegistry
from signalgen.modes.recorder import Recorder
from signalgen.process.specs import worker_specs
from signalgen.signals.pipeline import evaluate

START = datetime(2025, 1, 1, tzinfo=timezone.utc)


class SlowOrFailingStore:
    """Test double of the store: records calls; can block until released, or fail on a given call."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls, self.fail_on = 0, fail_on
        self.release = threading.Event()
        self.release.set()

    def write_decisions(self, signals, rejections) -> None:
        self.release.wait()
        self.calls += 1
        if self.calls == self.fail_on:
            raise OSError("disk full")


def decisions(spec, registry_dir, n: int = 4) -> Decisions:
    """A small batch of this worker, every bar a signal."""
    cards = [ModelRegistry(registry_dir).card(m.model_id) for m in spec.strategy.models]
    params = strategy_params(spec, cards)
    t = np.arange(1, n + 1, dtype=np.int64) * 300_000_000
    preds = np.full((n, len(cards)), 0.9)
    ev = evaluate(params, t, t, np.full((n, 15), 0.001), preds, np.ones(len(cards), bool), np.ones(n, bool))
    return Decisions(params, ev, t, t, preds, "historical", "r", 0)


@pytest.fixture
def recorder_for(root):
    cfg = load_config("local-dev", "historical", root=root, overrides=Overrides(start=START))
    made = []

    def make(store):
        rec = Recorder(cfg, store, queue_batches=2)
        made.append(rec)
        return rec, worker_specs(cfg), root / "registry"

    yield make
    for rec in made:
        rec._queue.put(None)  # stop writer threads the test left running


def test_failed_store_write_is_raised_not_dropped(recorder_for):
    store = SlowOrFailingStore(fail_on=1)
    rec, specs, registry = recorder_for(store)
    rec.record(specs[0], decisions(specs[0], registry))
    with pytest.raises(SignalgenError, match="disk full"):
        rec.flush()
    with pytest.raises(SignalgenError, match="disk full"):
        rec.record(specs[0], decisions(specs[0], registry))


def test_slow_store_blocks_the_producer(recorder_for):
    store = SlowOrFailingStore()
    store.release.clear()
    rec, specs, registry = recorder_for(store)
    batch = decisions(specs[0], registry)
    done = []

    def produce():
        for _ in range(5):
            rec.record(specs[0], batch)
            done.append(1)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    deadline = time.monotonic() + 2
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # one batch held by the writer + two queued: the fourth record() waits for the store
    assert len(done) == 3 and producer.is_alive()
    store.release.set()
    producer.join(timeout=5)
    rec.flush()
    assert len(done) == 5 and store.calls == 5
