"""Cards and registries for tests that do not need a trained model."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from signalgen.features.spec import FEATURE_NAMES
from signalgen.models.registry import ModelCard, ModelMetrics, ModelRegistry, TrainingWindow

T0 = datetime(2024, 3, 1, tzinfo=timezone.utc)


def register_fake(registry: ModelRegistry, model_id: str = "swing_high", *, payload: bytes = b"tree 0",
                  created_at: datetime = T0, direction: int = 1,
                  feature_names: tuple[str, ...] = FEATURE_NAMES) -> ModelCard:
    """Register opaque bytes as a model: the registry never parses model files."""
    window = TrainingWindow(start=T0, end=T0, valid_start=T0, symbols=("BTCUSD",), rows_train=10,
                            rows_valid=5, seed=7)
    metrics = ModelMetrics(auc=0.6, log_loss=0.55, positive_rate=0.27, auc_train=0.7)
    return registry.register(model_id=model_id, description="test", direction=direction, horizon_bars=12,
                             target_return=0.01, feature_names=feature_names, timeframe="5m",
                             training_window=window, metrics=metrics, model_txt=payload,
                             model_onnx=b"onnx " + payload, created_at=created_at)


REPO_REGISTRY = Path(__file__).resolve().parents[3] / "registry"


def fresh_registry(dst: Path, src: Path = REPO_REGISTRY, age: timedelta = timedelta(days=1)) -> Path:
    """A copy of the trained demo registry whose cards say they were created `age` ago, so health
    checks pass whatever today's date is (card.json is not covered by any sha256)."""
    shutil.copytree(src, dst)
    for file in dst.glob("*/*/card.json"):
        card = json.loads(file.read_text())
        card["created_at"] = (datetime.now(timezone.utc) - age).isoformat()
        file.write_text(json.dumps(card, indent=2))
    return dst
