"""What every mode runner shares: the Runner protocol and the run report."""

from __future__ import annotations

import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from signalgen.config.workers import WorkerSpec


@dataclass
class StrategyStats:
    """Counts of one client x strategy in one run."""

    client_id: str
    strategy_id: str
    workers: int = 0
    bars: int = 0
    signals: int = 0
    rejected: int = 0                                         # candidates rejected
    rejections: Counter = field(default_factory=Counter)      # reason code -> candidates (may overlap)
    bar_rejections: Counter = field(default_factory=Counter)  # bar reason -> bars
    elapsed_s: float = 0.0

    @property
    def bars_per_s(self) -> float:
        return self.bars / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class RunReport:
    run_id: str
    mode: str
    environment: str
    stats: dict[tuple[str, str], StrategyStats]
    elapsed_s: float = 0.0
    peak_rss_mb: float = 0.0
    problems: list[str] = field(default_factory=list)  # model health problems and warnings, once each
    failures: dict[str, str] = field(default_factory=dict)  # worker id -> why it failed (one line)
    status: str = "ok"  # ok | failed (a worker failed) | stopped (SIGINT / SIGTERM)
    completed: set[str] = field(default_factory=set)  # ids of the workers that finished their range
    shard: str | None = None  # "i/N" for a `run --shard`

    def stat(self, spec: WorkerSpec) -> StrategyStats:
        key = (spec.client.id, spec.strategy.id)
        if key not in self.stats:
            self.stats[key] = StrategyStats(*key)
        return self.stats[key]

    def add(self, spec: WorkerSpec, outcome) -> None:
        """Count one worker's `modes.worker.WorkerOutcome` (problems once each)."""
        stats = self.stat(spec)
        self.problems += [p for p in outcome.problems if p not in self.problems]
        stats.bars += outcome.bars
        stats.signals += outcome.signals
        stats.rejected += outcome.bars - outcome.signals
        stats.rejections.update(outcome.reasons)
        stats.bar_rejections.update(outcome.bar_rejections)

    def finished(self, specs: list[WorkerSpec]) -> list[tuple[str, str]]:
        """(client, strategy) pairs all of whose workers in `specs` finished their range."""
        pairs = {(s.client.id, s.strategy.id): True for s in specs}
        for s in specs:
            pairs[(s.client.id, s.strategy.id)] &= s.id in self.completed
        return [pair for pair, done in pairs.items() if done]

    @property
    def totals(self) -> dict[str, int]:
        s = self.stats.values()
        return {"bars": sum(x.bars for x in s), "signals": sum(x.signals for x in s),
                "rejections": sum(x.rejected for x in s),
                "bar_rejections": sum(x.bar_rejections.total() for x in s)}

    @property
    def rejections_by_reason(self) -> Counter:
        return sum((x.rejections for x in self.stats.values()), Counter())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Runner(Protocol):
    """A mode: where bars come from, how time passes, how bars are batched. Strategy logic is shared."""

    def run(self, specs: list[WorkerSpec]) -> RunReport: ...
