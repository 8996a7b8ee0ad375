"""Aggregation of a strategy's model outputs into one direction, confidence and strength.

Each model i has a direction d_i (+1 for an up-move model, -1 for a down-move model), a weight w_i,
a threshold t_i and an output p_i = P(its event). It votes d_i when p_i >= t_i and abstains otherwise.

- weighted:  score = sum(w_i * vote_i * p_i) / sum(w_i); direction = sign(score), strength = |score|
             (opposite votes subtract: a disputed signal is weaker than an undisputed one)
- majority:  direction = d if the models voting d hold more of the weight than those voting -d,
             i.e. more than half of the weight that votes (abstaining models do not count; ties are flat)
- unanimous: direction = d if every model votes d (one abstention breaks unanimity)
For majority and unanimous, strength = sum over agreeing models of w_i * p_i / sum(w_i).
Confidence is the weighted mean output of the models that agree with the direction.

Every sum over models is accumulated model by model in index order with elementwise numpy
operations, never a matrix product: each element is then rounded the same way whatever the number
of bars, so a bar gets bit-identical results alone (live) or inside a batch (historical). A BLAS
product picks its summation order from the array's size.
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


def _weighted_sum(coefs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """sum_i coefs[i] * rows[i] for rows (k, n), added in model order (batch-size independent)."""
    total = np.zeros(rows.shape[1])
    for c, row in zip(coefs, rows, strict=True):
        total += c * row
    return total


def aggregate(p: np.ndarray, directions: np.ndarray, weights: np.ndarray, thresholds: np.ndarray,
              rule: Aggregation) -> Aggregated:
    """Aggregate outputs `p` (n, k) of k models for n bars."""
    # Work model by model on (k, n) rows: k is small, so a few weighted sums replace many (n, k)
    # temporaries.
    w = weights / weights.sum()
    cols = np.ascontiguousarray(p.T)
    with np.errstate(invalid="ignore"):
        active = cols >= thresholds[:, None]  # NaN never passes
    voted = np.where(active, cols, 0.0)       # outputs of the models that vote, else 0
    up, down = directions > 0, directions < 0
    score = None
    if rule is Aggregation.WEIGHTED:
        score = _weighted_sum(w * directions, voted)
        direction = np.sign(score).astype(np.int8)
    else:
        up_w, down_w = _weighted_sum(w[up], active[up]), _weighted_sum(w[down], active[down])
        if rule is Aggregation.MAJORITY:
            # ties do not win: 1e-12 absorbs float noise of weights that sum to one
            direction = np.where(up_w > down_w + 1e-12, 1, np.where(down_w > up_w + 1e-12, -1, 0))
        else:
            direction = np.where(up_w >= 1 - 1e-12, 1, np.where(down_w >= 1 - 1e-12, -1, 0))
        direction = direction.astype(np.int8)
    agree = active & (directions[:, None] == direction[None, :])  # flat (0) never equals +-1
    agree_w = _weighted_sum(w, agree)
    agree_wp = _weighted_sum(w, np.where(agree, voted, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(agree_w > 0, agree_wp / agree_w, 0.0)
    strength = agree_wp if score is None else np.abs(score)
    return Aggregated(direction, np.clip(confidence, 0.0, 1.0), np.clip(strength, 0.0, 1.0), agree.T,
                      active.any(axis=0))


def expected_move(p: np.ndarray, agree: np.ndarray, weights: np.ndarray, target_returns: np.ndarray,
                  direction: np.ndarray) -> np.ndarray:
    """Signed magnitude: weighted mean of p_i * target_return_i over agreeing models (0 if none)."""
    rows = agree.T
    num = _weighted_sum(weights * target_returns, np.where(rows, np.nan_to_num(p.T), 0.0))
    den = _weighted_sum(weights, rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, direction * num / den, 0.0)


def holding_period(agree: np.ndarray, horizons: np.ndarray) -> np.ndarray:
    """Longest horizon among agreeing models (0 if none)."""
    return np.where(agree.T, horizons[:, None], 0).max(axis=0, initial=0).astype(np.int32)
