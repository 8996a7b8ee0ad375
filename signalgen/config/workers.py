"""Worker specs: the config of one worker (client x strategy x symbol x timeframe), and nothing else.

A spec is the unit the mode runners and the process manager hand around: picklable data, no
connections. It holds only what its worker runs — the client's settings with this one strategy,
narrowed to this symbol and timeframe — so its `config_hash` changes exactly when that worker's
decisions may change; hot reload restarts a worker when its hash differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

from signalgen.config.models import ClientConfig, Routing, RunConfig, StrategyConfig
from signalgen.features.spec import WARMUP_BARS


@dataclass(frozen=True)
class WorkerSpec:
    """One worker. `client.strategies` is `[strategy]`; `strategy` lists only `symbol` and `timeframe`.

    `run` holds the run-level settings that change this worker's decisions (mode, data source,
    inference, backend, seed, registry and data folders) — see `run_settings`.
    """

    client: ClientConfig
    strategy: StrategyConfig
    symbol: str
    timeframe: str
    exposure_budget: float  # this worker's share of the client's max gross exposure
    run: dict = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        return f"{self.client.id}.{self.strategy.id}.{self.symbol}.{self.timeframe}"

    @property
    def client_id(self) -> str:
        return self.client.id

    @property
    def routing(self) -> Routing:
        return self.client.routing_for(self.strategy)

    @cached_property
    def config_hash(self) -> str:
        """sha256 of the canonical JSON of exactly what this worker runs. The strategy's `recovery`
        policy is the manager's, not the worker's: changing it restarts nothing."""
        client = self.client.model_dump(mode="json", exclude={"strategies": {"__all__": {"recovery"}}})
        body = {"client": client, "symbol": self.symbol,
                "timeframe": self.timeframe, "exposure_budget": self.exposure_budget, "run": self.run}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_settings(cfg: RunConfig) -> dict:
    """The run-level settings that change a worker's decisions. The date range is not one: a bar's
    decision does not depend on where the run started. Storage, messaging, output folders, log
    level, chunk size and replay speed change where or how fast decisions go, not what they are."""
    return {"mode": cfg.mode.name.value, "data_source": cfg.data_source, "inference": cfg.inference,
            "backend": cfg.backend, "seed": cfg.seed, "registry_dir": cfg.environment.paths.registry_dir,
            "data_dir": cfg.environment.paths.data_dir}


def worker_specs(cfg: RunConfig) -> list[WorkerSpec]:
    """Every enabled worker of the config, in a stable order.

    A client's max gross exposure is split evenly across its workers, so each worker can cap its
    own weight without talking to the others (one process per worker shares nothing).
    """
    run = run_settings(cfg)
    specs: list[WorkerSpec] = []
    for client in cfg.clients:
        combos = [(s, sym, tf) for s in client.strategies if s.enabled for sym in s.symbols for tf in s.timeframes]
        budget = client.max_gross_exposure / max(len(combos), 1)
        for s, sym, tf in combos:
            # model_copy skips validation: the narrowed configs are parts of already validated ones
            strategy = s.model_copy(update={"symbols": [sym], "timeframes": [tf]})
            own = client.model_copy(update={"strategies": [strategy]})
            specs.append(WorkerSpec(own, strategy, sym, tf, budget, run))
    return specs

def history_bars(spec: WorkerSpec) -> int:
    """Bars of history a batch needs before its first candidate: features' warm-up + the lookback window."""
    return WARMUP_BARS + max(m.lookback_window for m in spec.strategy.models)
