"""ONNX Runtime vs LightGBM on the same rows: how far apart, and which decisions flip.

ONNX tree ensembles hold split thresholds as float32 and sum leaves in float32; LightGBM uses
doubles. Training rounds every threshold to a float32 (`train.float32_thresholds`) so both take
the same branches; what remains is summation rounding (~1e-7), which can still flip a decision
sitting that close to a threshold. Every difference is reported, none is rounded away.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from signalgen.config.models import RunConfig, timeframe_delta
from signalgen.data.synthetic import synthetic_bars
from signalgen.features.batch import compute_features, feature_matrix
from signalgen.models.backends import load_predictor
from signalgen.models.registry import ModelRegistry
from signalgen.models.train import complete_rows


@dataclass(frozen=True)
class ParityRow:
    """One (model, client, strategy): model-wide differences and this strategy's decision flips.

    `rows`, `max_abs_diff` and `mean_abs_diff` cover every symbol the model serves; `flips`
    counts rows of this strategy's symbols where (p >= threshold) differs between backends.
    """

    model_id: str
    version: str
    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    client_id: str
    strategy_id: str
    threshold: float
    flips: int


@dataclass(frozen=True)
class ParityReport:
    rows: list[ParityRow]


def parity_report(cfg: RunConfig, bars_per_symbol: int, seed: int) -> ParityReport:
    """Compare the ONNX and LightGBM backends of every model the config's enabled strategies use.

    Args:
        cfg: the resolved run config (clients and the registry path).
        bars_per_symbol: synthetic bars generated per symbol, from cfg.start (warm-up rows are dropped).
        seed: seed of the synthetic bars.
    """
    registry = ModelRegistry(Path(cfg.root) / cfg.environment.paths.registry_dir)
    users: dict[str, list] = {}  # model_id -> [(client, strategy, model ref)]
    for client in cfg.clients:
        for strategy in client.strategies:
            if strategy.enabled:
                for ref in strategy.models:
                    users.setdefault(ref.model_id, []).append((client, strategy, ref))
    cards = {m: registry.card(m) for m in users}
    features: dict[tuple[str, tuple[str, ...]], pl.DataFrame] = {}
    out: list[ParityRow] = []
    for model_id, uses in users.items():
        card = cards[model_id]
        symbols = tuple(sorted({s for _, strategy, _ in uses for s in strategy.symbols}))
        key = (card.timeframe, symbols)
        if key not in features:
            features[key] = _features(symbols, card.timeframe, cfg, bars_per_symbol, seed)
        df = features[key]
        x = feature_matrix(df)
        p_onnx = load_predictor(registry, model_id, "onnx", version=card.version).predict(x)
        p_lgb = load_predictor(registry, model_id, "lightgbm", version=card.version).predict(x)
        diff = np.abs(p_onnx - p_lgb)
        max_diff = float(diff.max()) if len(diff) else 0.0
        mean_diff = float(diff.mean()) if len(diff) else 0.0
        row_symbols = df["symbol"].to_numpy()
        for client, strategy, ref in uses:
            mine = np.isin(row_symbols, strategy.symbols)
            t = ref.confidence_threshold
            flips = int(((p_onnx[mine] >= t) != (p_lgb[mine] >= t)).sum())
            out.append(ParityRow(model_id=model_id, version=card.version, rows=len(df), max_abs_diff=max_diff,
                                 mean_abs_diff=mean_diff, client_id=client.id, strategy_id=strategy.id,
                                 threshold=t, flips=flips))
    return ParityReport(rows=out)


def _features(symbols: tuple[str, ...], timeframe: str, cfg: RunConfig, bars_per_symbol: int,
              seed: int) -> pl.DataFrame:
    end = cfg.start + timeframe_delta(timeframe) * bars_per_symbol  # bars end in (start, end]
    bars = synthetic_bars(list(symbols), timeframe, cfg.start, end, seed).sort("symbol", "bar_time")
    return complete_rows(compute_features(bars))
