"""Aggregation of a strategy's model outputs into one direction, confidence and strength.

Each model i has a direction d_i (+1 for an up-move model, -1 for a down-move model), a weight w_i,
a threshold t_i and an output p_i = P(its event). It votes d_i when p_i >= t_i and abstains otherwise.

- weighted:  score = sum(w_i * vote_i * p_i) / sum(w_i); direction = sign(score), strength = |score|
- majority:  direction = d if the models voting d hold more of the weight than those voting -d,
             i.e. more than half of the weight that votes (abstaining models do not count; ties are flat)
- unanimous: direction = d if every model votes d (one abstention breaks unanimity)
For majority and unanimous, strength = sum over agreeing models of w_i * p_i / sum(w_i).
Confidence is the weighted mean output of the models that agree with the direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from signalgen.config.models import Aggregation


@dataclass(frozen=True)
class Aggregated:
    direction: np.ndarray   # int8: +1 / 0 / -1
    confidence: np.ndarray  # [0, 1]; 0 where direction == 0
    strength: np.ndarray    # [0, 1]; 0 where direction == 0
    agree: np.ndarray       # bool (n, k): model i agrees with the direction
    any_vote: np.ndarray    # bool: at least one model passed its threshold


def votes(p: np.ndarray, directions: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """int8 (n, k): d_i where p_i >= t_i, else 0. NaN outputs abstain."""
    with np.errstate(invalid="ignore"):
        active = p >= thresholds[None, :]
    return np.where(active, directions[None, :], 0).astype(np.int8)


def aggregate(p: np.ndarray, directions: np.ndarray, weights: np.ndarray, thresholds: np.ndarray,
              rule: Aggregation) -> Aggregated:
    """Aggregate outputs `p` (n, k) of k models for n bars."""
    v = votes(p, directions, thresholds)
    w = weights / weights.sum()
    p0 = np.nan_to_num(p, nan=0.0)
    if rule is Aggregation.WEIGHTED:
        score = (w[None, :] * v * p0).sum(axis=1)
        direction = np.sign(score).astype(np.int8)
    else:
        up = (w[None, :] * (v > 0)).sum(axis=1)
        down = (w[None, :] * (v < 0)).sum(axis=1)
        if rule is Aggregation.MAJORITY:
            # ties do not win: 1e-12 absorbs float noise of weights that sum to one
            direction = np.where(up > down + 1e-12, 1, np.where(down > up + 1e-12, -1, 0)).astype(np.int8)
        else:
            direction = np.where(up >= 1 - 1e-12, 1, np.where(down >= 1 - 1e-12, -1, 0)).astype(np.int8)
    agree = (v == direction[:, None]) & (direction[:, None] != 0)
    agree_w = (w[None, :] * agree).sum(axis=1)
    agree_wp = (w[None, :] * agree * p0).sum(axis=1)
    strength = np.clip(agree_wp, 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(agree_w > 0, agree_wp / agree_w, 0.0)
    return Aggregated(direction, np.clip(confidence, 0.0, 1.0), strength, agree, (v != 0).any(axis=1))


def expected_move(p: np.ndarray, agree: np.ndarray, weights: np.ndarray, target_returns: np.ndarray,
                  direction: np.ndarray) -> np.ndarray:
    """Signed magnitude: weighted mean of p_i * target_return_i over agreeing models (0 if none)."""
    wa = weights[None, :] * agree
    num = (wa * np.nan_to_num(p) * target_returns[None, :]).sum(axis=1)
    den = wa.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, direction * num / den, 0.0)


def holding_period(agree: np.ndarray, horizons: np.ndarray) -> np.ndarray:
    """Longest horizon among agreeing models (0 if none)."""
    return (agree * horizons[None, :]).max(axis=1, initial=0).astype(np.int32)
