"""The demo models: what each one predicts, and the data they are trained on.

Two families: the intraday demo (5m, seeded synthetic crypto-like bars) and the daily demo (1d, the
real US stock bars of `data import-sample`, 2000-2009; runs from 2010 on are out of sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """One binary event model: P(forward log return over `horizon_bars` beyond `direction` x target).

    `target_return=None` means: derive it at training time from the training rows (see
    `derive_target_return`) and record the value in the model card.
    """

    model_id: str
    direction: int  # +1: event is a rise above +x; -1: a fall below -x
    horizon_bars: int
    target_return: float | None
    description: str

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise ValueError(f"{self.model_id}: direction must be +1 or -1, not {self.direction}")
        if self.horizon_bars < 1:
            raise ValueError(f"{self.model_id}: horizon_bars must be >= 1, not {self.horizon_bars}")


DEMO_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("swing_high", +1, 12, None, "P(log return over the next 12 bars > +x)"),
    ModelSpec("swing_low", -1, 12, None, "P(log return over the next 12 bars < -x)"),
    ModelSpec("swing_high_short", +1, 4, None, "P(log return over the next 4 bars > +x)"),
    ModelSpec("swing_low_short", -1, 4, None, "P(log return over the next 4 bars < -x)"),
)

DEMO_SYMBOLS: tuple[str, ...] = ("BTCUSD", "ETHUSD", "SOLUSD", "XRPUSD")
DEMO_TIMEFRAME = "5m"
DEMO_START = datetime(2024, 1, 1, tzinfo=timezone.utc)  # the synthetic series' epoch: its first 60 days
DEMO_DAYS = 60
VALID_FRACTION = 0.2  # the last 20% of the time range validates

DAILY_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("daily_high", +1, 5, None, "P(log return over the next 5 daily bars > +x)"),
    ModelSpec("daily_low", -1, 5, None, "P(log return over the next 5 daily bars < -x)"),
)
# FB starts in 2012: too late to train on bars before DAILY_TRAIN_END.
DAILY_SYMBOLS: tuple[str, ...] = ("AAPL", "GOOG", "IBM", "MSFT")
DAILY_TIMEFRAME = "1d"
DAILY_TRAIN_END = datetime(2010, 1, 1, tzinfo=timezone.utc)  # train + validate on bars before this
# ~8,500 rows (a thousandth of the intraday demo's): smaller trees and a slower rate overfit less
# (train AUC 0.74 instead of 0.84 at the same validation AUC).
DAILY_PARAMS = {"num_leaves": 7, "min_data_in_leaf": 100, "learning_rate": 0.03}

# Each side of a horizon gets about this positive rate: P(r > x) ~ P(r < -x) ~ 27.5%.
TARGET_POSITIVE_RATE = 0.275


def spec(model_id: str) -> ModelSpec:
    """The demo spec named `model_id` (intraday or daily); KeyError if there is none."""
    for s in DEMO_MODELS + DAILY_MODELS:
        if s.model_id == model_id:
            return s
    raise KeyError(model_id)


def derive_target_return(forward_returns: np.ndarray, positive_rate: float = TARGET_POSITIVE_RATE) -> float:
    """x such that about `positive_rate` of rows rise above +x (and as many fall below -x).

    Uses |r| so the up and down models of one horizon share x; rounded to 2 significant
    digits so the card shows a readable number.
    """
    r = np.abs(np.asarray(forward_returns, dtype=np.float64))
    r = r[np.isfinite(r)]
    if r.size == 0:
        raise ValueError("no finite forward returns to derive a target from")
    x = float(np.quantile(r, 1.0 - 2.0 * positive_rate))
    if x <= 0:
        raise ValueError("forward returns are mostly zero: no target return gives the wanted rate")
    return float(f"{x:.2g}")
