"""simulation mode: every worker replays its stored bars one at a time through `run_worker` — per-bar
validation, incremental features, single-row inference — on a simulated clock (`ReplayClock`: as
fast as possible, or `replay_speed` x real time).

Over the same bars it produces exactly the decisions of historical mode (same ids, reasons and
float bits): both paths share `run_worker`'s decide step, and the per-bar features equal the batch
ones bit for bit (tests/unit/modes/test_worker_equivalence.py, tests/unit/modes/test_simulation.py).
"""

from __future__ import annotations

import threading
from datetime import datetime

from signalgen.config.models import RunConfig
from signalgen.config.workers import WorkerSpec
from signalgen.modes.batch import BatchRunner
from signalgen.signals.records import Decisions
from signalgen.modes.sources import per_bar_feed
from signalgen.modes.worker import ReplayClock
from signalgen.storage.writer import SignalWriter


class BatchingSink:
    """Hands the writer one batch per `size` bars of a worker: a store transaction per bar costs
    ~40 ms, which would make the writer, not the worker, set the replay speed. The checkpoint
    therefore advances a batch at a time (a replay restarts from it, and writes are idempotent)."""

    def __init__(self, writer: SignalWriter, size: int = 4096) -> None:
        self.writer, self.size = writer, size
        self._pending: list[Decisions] = []
        self._bars = 0  # bars in _pending
        self._spec: WorkerSpec | None = None

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        if self._spec is not None and spec is not self._spec and spec.id != self._spec.id:
            self.drain()
        self._spec = spec
        self._pending.append(decisions)
        self._bars += decisions.bars
        if self._bars >= self.size:
            self.drain()

    def record_bar_rejections(self, rejections, run_id: str) -> None:
        self.writer.record_bar_rejections(rejections, run_id)

    def drain(self) -> None:
        """Hand what is pending to the writer."""
        if self._pending:
            self.writer.record(self._spec, Decisions.concat(self._pending))
            self._pending, self._bars = [], 0

    @property
    def checkpoints(self):
        return self.writer.checkpoints


class SimulationRunner(BatchRunner):
    """The serial runner with a bar-at-a-time feed (`modes.sources.per_bar_feed`) and a replay clock
    paced at `replay_speed` (0: as fast as possible); store writes are batched per worker."""

    def __init__(self, cfg: RunConfig, writer: SignalWriter, *, run_id: str, started_at: datetime,
                 stop: threading.Event | None = None) -> None:
        super().__init__(cfg, writer, run_id=run_id, started_at=started_at, stop=stop)
        self.sink = self.batching = BatchingSink(writer)

    def clock(self) -> ReplayClock:
        return ReplayClock(self.cfg.mode.replay_speed or 0)

    def feeds(self, specs: list[WorkerSpec]):
        return ((spec, per_bar_feed(self.cfg, spec)) for spec in specs)  # each read lazily, in its worker

    def worker_done(self, spec: WorkerSpec) -> None:
        self.batching.drain()
