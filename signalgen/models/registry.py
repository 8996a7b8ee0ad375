"""The model registry: `<registry_dir>/<model_id>/<version>/{card.json, model.txt, model.onnx}`.

A version is the first 12 hex digits of the sha256 of `model.txt`, so the same training
gives the same version and registering it again changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from signalgen.config.models import SafeId, Timeframe, UtcDatetime
from signalgen.errors import ConfigError

CARD_FILE = "card.json"
LIGHTGBM_FILE = "model.txt"
ONNX_FILE = "model.onnx"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainingWindow(_Frozen):
    """The bars a model was trained and validated on."""

    start: UtcDatetime  # first bar end time used
    end: UtcDatetime  # last bar end time used
    valid_start: UtcDatetime  # validation rows have bar_time >= this
    symbols: tuple[str, ...]
    rows_train: int = Field(ge=0)
    rows_valid: int = Field(ge=0)
    seed: int


class ModelMetrics(_Frozen):
    """Validation metrics (the time-ordered last part) and the training AUC for comparison."""

    auc: float
    log_loss: float
    positive_rate: float
    auc_train: float


class ModelCard(_Frozen):
    """What a model predicts, what it was trained on, how well it did, and its files."""

    model_id: SafeId
    version: str
    description: str = ""
    direction: int = Field(ge=-1, le=1)
    horizon_bars: int = Field(ge=1)
    target_return: float = Field(gt=0)
    feature_names: tuple[str, ...]
    timeframe: Timeframe
    training_window: TrainingWindow
    metrics: ModelMetrics
    content_hash: str  # sha256 of model.txt
    created_at: UtcDatetime
    files: dict[str, str]  # file name -> sha256

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.direction == 0:
            raise ValueError("direction must be +1 or -1")
        if self.version != self.content_hash[:12]:
            raise ValueError(f"version {self.version} is not the first 12 hex of content_hash")
        if self.files.get(LIGHTGBM_FILE) != self.content_hash:
            raise ValueError(f"content_hash does not match files[{LIGHTGBM_FILE!r}]")
        return self


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelRegistry:
    """Reads and writes model versions under one folder. Missing models are ConfigErrors."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)

    def ids(self) -> list[str]:
        """Model ids that have at least one registered version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and any(p.glob(f"*/{CARD_FILE}")))

    def versions(self, model_id: str) -> list[str]:
        """Versions of `model_id`, oldest first (by created_at). Empty if the model is unknown."""
        folder = self.root / model_id
        if not folder.is_dir():
            return []
        cards = [self._read(p / CARD_FILE) for p in folder.iterdir()
                 if not p.name.startswith(".") and (p / CARD_FILE).is_file()]
        return [c.version for c in sorted(cards, key=lambda c: (c.created_at, c.version))]

    def card(self, model_id: str, version: str | None = None) -> ModelCard:
        """The card of `model_id` at `version`, or of its newest version."""
        if version is None:
            versions = self.versions(model_id)
            if not versions:
                known = ", ".join(self.ids()) or "none"
                raise ConfigError(f"model {model_id!r} is not in the registry {self.root} "
                                  f"(models there: {known}); train it with `models train`",
                                  field="model_id")
            version = versions[-1]
        file = self.path(model_id, version) / CARD_FILE
        if not file.is_file():
            raise ConfigError(f"model {model_id!r} has no version {version!r} in the registry {self.root} "
                              f"(versions: {', '.join(self.versions(model_id)) or 'none'})", field="model_id")
        return self._read(file)

    def path(self, model_id: str, version: str) -> Path:
        """Folder holding one version's files."""
        return self.root / model_id / version

    def register(self, *, model_id: str, description: str, direction: int, horizon_bars: int,
                 target_return: float, feature_names: tuple[str, ...], timeframe: str,
                 training_window: TrainingWindow, metrics: ModelMetrics, model_txt: bytes,
                 model_onnx: bytes, created_at: datetime) -> ModelCard:
        """Store a trained model; returns its card.

        If the same version (same model.txt) is already registered, its existing card is
        returned untouched, so retraining identically does not churn the registry.
        """
        content_hash = sha256(model_txt)
        card = ModelCard(
            model_id=model_id, version=content_hash[:12], description=description, direction=direction,
            horizon_bars=horizon_bars, target_return=target_return, feature_names=tuple(feature_names),
            timeframe=timeframe, training_window=training_window, metrics=metrics,
            content_hash=content_hash, created_at=created_at,
            files={LIGHTGBM_FILE: content_hash, ONNX_FILE: sha256(model_onnx)},
        )
        final = self.path(model_id, card.version)
        if (final / CARD_FILE).is_file():
            return self._read(final / CARD_FILE)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Write into a hidden sibling, then rename: readers never see a half-written version.
        tmp = Path(tempfile.mkdtemp(prefix=f".{card.version}-", dir=final.parent))
        try:
            (tmp / LIGHTGBM_FILE).write_bytes(model_txt)
            (tmp / ONNX_FILE).write_bytes(model_onnx)
            (tmp / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / CARD_FILE).is_file():  # lost a race only if the winner finished
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._read(final / CARD_FILE)

    def _read(self, file: Path) -> ModelCard:
        """The card in `file`; it must describe the folder it is in (<model_id>/<version>/card.json)."""
        try:
            card = ModelCard.model_validate(json.loads(file.read_text()))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "card"
            raise ConfigError(f"invalid model card: {where}: {first['msg']}"
                              + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""),
                              file=str(file)) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable model card: {str(exc)[:200]}", file=str(file)) from None
        if (card.model_id, card.version) != (file.parent.parent.name, file.parent.name):
            raise ConfigError(f"card describes {card.model_id} {card.version} but lies in "
                              f"{file.parent.parent.name}/{file.parent.name}/", file=str(file))
        return card
