"""Position sizing: strength -> weight, the target fraction of capital (always >= 0)."""

from __future__ import annotations

import numpy as np

from signalgen.config.models import SizingConfig


def size(strength: np.ndarray, volatility: np.ndarray, sizing: SizingConfig, budget: float) -> np.ndarray:
    """Weight per bar, capped by the per-symbol max position and this worker's exposure budget.

    fixed_fraction:    fraction * strength
    volatility_target: strength * target_volatility / realized volatility (0 when volatility is 0 or NaN)
    """
    if sizing.method == "fixed_fraction":
        raw = sizing.fraction * strength
    else:
        vol = np.nan_to_num(volatility, nan=0.0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            raw = np.where(vol > 0, strength * sizing.target_volatility / vol, 0.0)
    return np.clip(raw, 0.0, min(sizing.max_position, budget))
