"""Preflight: what `run` would refuse or degrade, found before any work, so `config validate` can say it.

Where each fault is caught:

* Refused at config load (`load_config`, exit 2): every YAML and schema fault, unknown clients or
  strategies, and a model id with no `card.json` in the registry (a model folder without a card, or
  a version folder whose card is missing, is no model at all: "not in the model registry").
* Refused at run start (`run_refusals`, exit 2; today `run_mode`, `storage.open_store`,
  `outputs.build_output` and `bar_chunks` each refuse one of these): a mode this release cannot run
  (only `signalgen.modes.RUN_MODES`), a data source the batch runner cannot read (`stream`), a
  storage type without a backend in `signalgen.storage.STORES`, and a messaging type without one in
  `signalgen.outputs.OUTPUTS` while a strategy routes to the internal stream.
* Degraded at run (the run completes; only the workers of the faulty model reject every bar as
  `model_unhealthy`; the run's problems list names the fault once) — every registry fault of a model
  that has a card: unparsable card, card schema error, card in a folder of another version or model,
  a file the card lists missing or with another sha256 (model.onnx and model.txt, whatever the
  backend), ONNX input not (n, 15) float, ONNX without an (n, 2) probability output, LightGBM feature
  count, feature names or order that differ, another timeframe, older than `max_age_days`,
  `created_at` in the future, validation AUC below 0.5, non-finite metrics. The mock backend needs
  only the card, so under `--inference mock` only card faults count.
* Failed per worker at run: data_source `files` without a file for a worker's symbol and timeframe.
* Failing at the first write: a store, output or stream folder that cannot be created or written.

`preflight` returns all of them as one-line problems (file and field named where known).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from signalgen.config.models import Mode, Routing, RunConfig
from signalgen.errors import ConfigError


def _where(cfg: RunConfig, layer: str, field: str | None, message: str) -> str:
    return str(ConfigError(message, file=cfg.files.get(layer), field=field))


def run_refusals(cfg: RunConfig) -> list[str]:
    """Problems that make `run` refuse the whole config before any work (see the module docstring)."""
    from signalgen.modes import RUN_MODES
    from signalgen.outputs import OUTPUTS
    from signalgen.storage import STORES

    env, out = cfg.environment, []
    if cfg.mode.name is Mode.LIVE:  # live workers are long-lived: the manager runs them
        out.append(_where(cfg, "mode", "name", "live mode runs under the process manager, not `run`: "
                          "`start --mode live --env local-integration` (Redis); `run` takes "
                          f"{', '.join(m.value for m in RUN_MODES)}"))
    elif cfg.mode.name not in RUN_MODES:
        out.append(_where(cfg, "mode", "name", f"mode {cfg.mode.name.value!r} is not available in this release; "
                          f"use {' or '.join(m.value for m in RUN_MODES)}"))
    elif cfg.data_source not in ("synthetic", "files"):
        out.append(_where(cfg, "mode", "data_source", f"data source {cfg.data_source!r} cannot feed mode "
                          f"{cfg.mode.name.value!r} in this release; use synthetic or files"))
    if env.storage.type not in STORES:
        out.append(_where(cfg, "environment", "storage.type", f"storage type {env.storage.type!r} is not "
                          f"available in this release; use {', '.join(sorted(STORES))}"))
    internal = [f"{c.id}.{s.id}" for c in cfg.clients for s in c.strategies
                if c.routing_for(s) in (Routing.INTERNAL, Routing.BOTH)]
    if env.messaging.type not in OUTPUTS and internal:
        out.append(_where(cfg, "environment", "messaging.type", f"messaging type {env.messaging.type!r} is not "
                          f"available in this release; use {' or '.join(sorted(set(OUTPUTS) - {'quantconnect', 'memory'}))} "
                          f"(routed to the internal stream: "
                          f"{', '.join(internal[:3])}{' ...' if len(internal) > 3 else ''})"))
    return out


def model_problems(cfg: RunConfig, now: datetime | None = None) -> list[str]:
    """Faults of every model an enabled strategy uses, in the words a run reports them."""
    from signalgen.models.backends import load_checked
    from signalgen.models.registry import ModelRegistry

    registry = ModelRegistry(Path(cfg.root) / cfg.environment.paths.registry_dir)
    backend = "mock" if cfg.inference == "mock" else cfg.backend
    now = now or datetime.now(timezone.utc)
    seen: set[tuple[str, int, str]] = set()
    out: list[str] = []
    for client in cfg.clients:
        for strategy in (s for s in client.strategies if s.enabled):
            for ref in strategy.models:
                for timeframe in strategy.timeframes:
                    if (ref.model_id, ref.max_age_days, timeframe) in seen:
                        continue
                    seen.add((ref.model_id, ref.max_age_days, timeframe))
                    checked = load_checked(registry, ref.model_id, backend, now=now,
                                           max_age_days=ref.max_age_days, timeframe=timeframe)
                    out += checked.problems
    return out


def data_problems(cfg: RunConfig) -> list[str]:
    """Workers whose bars the `files` source has no file for."""
    if cfg.data_source != "files":
        return []
    from signalgen.data.files import FilesSource
    from signalgen.config.workers import worker_specs

    data_dir = Path(cfg.root) / cfg.environment.paths.data_dir
    source = FilesSource(data_dir)
    found: dict[str, set[str]] = {}
    out = []
    for spec in worker_specs(cfg):
        symbols = found.setdefault(spec.timeframe, set(source.symbols(spec.timeframe)))
        if spec.symbol not in symbols:
            out.append(f"worker {spec.id}: no bar file for {spec.symbol} {spec.timeframe} under "
                       f"{data_dir / spec.timeframe} ({spec.symbol}.parquet, {spec.symbol}.csv or "
                       f"symbol={spec.symbol}/); run `data import-sample` or add it")
    return out


def _unwritable(path: Path) -> Path | None:
    """The folder that stops `path` from being created or written, or None when it can be."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return probe
    return None


def path_problems(cfg: RunConfig) -> list[str]:
    """Store, output and stream folders this run would have to create or write but cannot."""
    env, root = cfg.environment, Path(cfg.root)
    targets = [("storage.path", (root / env.storage.path).parent) if getattr(env.storage, "path", None) else None,
               ("paths.output_dir", root / env.paths.output_dir),
               ("messaging.path", root / env.messaging.path) if getattr(env.messaging, "path", None) else None]
    out = []
    for field, path in filter(None, targets):
        blocker = _unwritable(path)
        if blocker is not None:
            out.append(_where(cfg, "environment", field, f"cannot write {path}: {blocker} is not a writable folder"))
    return out


def option_problems(cfg: RunConfig) -> list[str]:
    """Options a client asks for that this release does not carry out."""
    return [_where(cfg, f"client:{c.id}", "quantconnect.upload", "upload to QuantConnect is not available in "
                   "this release; the CSV files are written, never uploaded (set upload: false)")
            for c in cfg.clients if c.quantconnect.upload]


def preflight(cfg: RunConfig, *, now: datetime | None = None) -> list[str]:
    """Every problem `run` would meet with this config, one line each, duplicates dropped; empty when none.

    Args:
        cfg: the loaded config (load_config has already refused what it can).
        now: the time model ages are judged at (default: now, UTC).
    """
    problems = (run_refusals(cfg) + model_problems(cfg, now) + data_problems(cfg) + path_problems(cfg)
                + option_problems(cfg))
    return list(dict.fromkeys(problems))
