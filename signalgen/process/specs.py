"""Expanding clients x strategies x symbols x timeframes into worker specs."""

from __future__ import annotations

from dataclasses import dataclass

from signalgen.config.models import ClientConfig, Routing, RunConfig, StrategyConfig


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: one client x strategy x symbol x timeframe. Picklable; carries config, not connections."""

    client: ClientConfig
    strategy: StrategyConfig
    symbol: str
    timeframe: str
    exposure_budget: float  # this worker's share of the client's max gross exposure

    @property
    def id(self) -> str:
        return f"{self.client.id}.{self.strategy.id}.{self.symbol}.{self.timeframe}"

    @property
    def routing(self) -> Routing:
        return self.client.routing_for(self.strategy)


def worker_specs(cfg: RunConfig) -> list[WorkerSpec]:
    """Every enabled worker of the config, in a stable order.

    A client's max gross exposure is split evenly across its workers, so each worker can cap its
    own weight without talking to the others (one process per worker shares nothing).
    """
    specs: list[WorkerSpec] = []
    for client in cfg.clients:
        combos = [(s, sym, tf) for s in client.strategies if s.enabled for sym in s.symbols for tf in s.timeframes]
        budget = client.max_gross_exposure / max(len(combos), 1)
        specs += [WorkerSpec(client, s, sym, tf, budget) for s, sym, tf in combos]
    return specs
