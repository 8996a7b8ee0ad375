"""Signal filters: volatility band and trend confirmation (the confidence threshold lives in voting)."""

from __future__ import annotations

import numpy as np


def outside_band(volatility: np.ndarray, low: float, high: float) -> np.ndarray:
    """True where realized volatility is outside [low, high] (NaN counts as outside)."""
    with np.errstate(invalid="ignore"):
        return ~((volatility >= low) & (volatility <= high))


def trend_disagrees(direction: np.ndarray, trend: np.ndarray) -> np.ndarray:
    """True where a non-flat direction does not match the sign of the trend feature (flat trend included)."""
    return (direction != 0) & (np.sign(np.nan_to_num(trend)) != direction)
