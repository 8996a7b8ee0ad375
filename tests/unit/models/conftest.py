"""One small training run per test session, shared by the tests that need trained models."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from signalgen.models.catalog import DEMO_MODELS, DEMO_SYMBOLS, DEMO_TIMEFRAME
from signalgen.models.registry import ModelCard
from signalgen.models.train import demo_bars, train_demo_models, training_frame, valid_start

DAYS = 20
SEED = 7
NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Trained:
    registry_dir: Path
    cards: dict[str, ModelCard]
    frame: pl.DataFrame  # features + forward returns of the training bars
    valid_start: datetime


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    registry_dir = tmp_path_factory.mktemp("registry")
    cards = train_demo_models(registry_dir, seed=SEED, days=DAYS, now=NOW)
    frame = training_frame(demo_bars(SEED, DAYS, DEMO_SYMBOLS),
                           [s.horizon_bars for s in DEMO_MODELS], DEMO_TIMEFRAME)
    return Trained(registry_dir, {c.model_id: c for c in cards}, frame, valid_start(frame, DEMO_TIMEFRAME))
