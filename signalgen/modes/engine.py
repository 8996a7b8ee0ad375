"""One worker's pipeline over bars, shared by every mode: features -> models -> signals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

from signalgen.features.batch import compute_features, feature_matrix
from signalgen.features.spec import FEATURE_NAMES, WARMUP_BARS
from signalgen.models.backends import Predictor, load_predictor
from signalgen.models.health import check_card
from signalgen.models.registry import ModelCard, ModelRegistry
from signalgen.process.specs import WorkerSpec
from signalgen.signals.pipeline import ModelParams, StrategyParams, count_reasons, evaluate, to_frames
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA
from signalgen.signals.validate import window_complete


def strategy_params(spec: WorkerSpec, cards: Sequence[ModelCard]) -> StrategyParams:
    """Plain parameters of a worker: its strategy config joined with its models' cards."""
    s = spec.strategy
    models = tuple(
        ModelParams(ref.model_id, card.version, card.direction, card.horizon_bars, card.target_return,
                    ref.weight, ref.confidence_threshold, ref.lookback_window)
        for ref, card in zip(s.models, cards, strict=True))
    return StrategyParams(spec.client.id, s.id, spec.symbol, spec.timeframe, s.aggregation, s.filters, s.sizing,
                          spec.exposure_budget, s.max_staleness_bars, models)


@dataclass
class Batch:
    signals: pl.DataFrame
    rejections: pl.DataFrame
    bars: int          # candidate bars evaluated
    reasons: dict[str, int]  # rejections per reason code
    last_bar_us: int   # newest bar end evaluated (the checkpoint candidate)


class WorkerEngine:
    """Holds a worker's models and turns (history + new bars) into signals and rejections."""

    def __init__(self, spec: WorkerSpec, registry: ModelRegistry, *, backend: str, now: datetime,
                 mode: str, run_id: str, seed: int = 0) -> None:
        self.spec = spec
        self.mode, self.run_id = mode, run_id
        refs = spec.strategy.models
        self.predictors: list[Predictor] = [load_predictor(registry, r.model_id, backend, seed=seed) for r in refs]
        cards = [p.card for p in self.predictors]
        health = [check_card(c, now=now, max_age_days=r.max_age_days, feature_names=FEATURE_NAMES,
                             timeframe=spec.timeframe) for r, c in zip(refs, cards)]
        self.problems = [msg for h in health for msg in h]  # reported once per run, per worker
        self.model_ok = np.array([not h for h in health])
        self.params = strategy_params(spec, cards)
        # bars of history a batch needs before its first candidate: features' warm-up + the lookback window
        self.history = WARMUP_BARS + self.params.lookback

    def process(self, bars: pl.DataFrame, emit_from_us: int, now_us: np.ndarray | None = None,
                latency_us: int | np.ndarray = 0) -> Batch:
        """Evaluate the bars with bar_time > emit_from_us; earlier rows are history only.

        `bars` are validated bars of this worker's symbol in ascending time; `now_us` is the evaluation
        time of each new bar (default: its own end time, as in historical replay).
        """
        times = bars["bar_time"].dt.epoch("us").to_numpy()
        new = times > emit_from_us
        if not new.any():
            return Batch(pl.DataFrame(schema=SIGNAL_SCHEMA), pl.DataFrame(schema=REJECTION_SCHEMA), 0, {}, emit_from_us)
        features = feature_matrix(compute_features(bars))
        window_ok = window_complete(times, self.params.lookback, self.params.max_gap_us)[new]
        x, t = features[new], times[new]
        preds = np.full((t.size, len(self.predictors)), np.nan)
        finite = np.isfinite(x).all(axis=1)
        if finite.any():
            xf = np.ascontiguousarray(x[finite])
            for j, predictor in enumerate(self.predictors):
                preds[finite, j] = predictor.predict(xf)
        now = t if now_us is None else now_us
        ev = evaluate(self.params, t, now, x, preds, self.model_ok, window_ok)
        signals, rejections = to_frames(self.params, ev, t, now, preds, mode=self.mode, run_id=self.run_id,
                                        latency_us=latency_us)
        return Batch(signals, rejections, int(t.size), count_reasons(ev.reasons), int(t[-1]))
