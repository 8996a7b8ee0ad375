"""Every field `evaluate` returns is bit-identical whatever the batch a bar is evaluated in.

Live and simulation evaluate one bar at a time, historical a chunk at a time: the same bar must
give the same bits either way (a matrix product sums in an order that depends on the batch size).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.config.models import Aggregation, FiltersConfig, SizingConfig
from signalgen.features.spec import FEATURE_NAMES
from signalgen.signals.pipeline import ModelParams, StrategyParams, evaluate

FIVE_MIN = 300_000_000
VOL = FEATURE_NAMES.index("vol_20")
N = 200
FIELDS = ("direction", "confidence", "strength", "magnitude", "weight", "period", "reasons")


# uneven weights and target returns, so the order of the sums over models matters
MODELS = (ModelParams("up_a", "1", 1, 12, 0.0123, 1.7, 0.55, 3),
          ModelParams("down_a", "1", -1, 6, 0.0271, 0.3, 0.52, 3),
          ModelParams("up_b", "1", 1, 24, 0.0057, 2.9, 0.6, 5),
          ModelParams("down_b", "1", -1, 12, 0.0113, 1.1, 0.5, 4),
          ModelParams("up_c", "1", 1, 6, 0.0311, 0.7, 0.58, 3))


def params(aggregation: Aggregation, sizing: SizingConfig, k: int) -> StrategyParams:
    return StrategyParams("c", "s", "X", "5m", aggregation, FiltersConfig(), sizing, 1.0, 2.0, MODELS[:k])


def rows(seed: int, k: int):
    rng = np.random.default_rng(seed)
    t = (np.arange(N) + 1) * FIVE_MIN
    x = rng.normal(size=(N, len(FEATURE_NAMES))).astype(np.float32)
    x[:, VOL] = rng.uniform(0.0005, 0.004, N)
    x[rng.random(N) < 0.02, 3] = np.nan
    preds = rng.uniform(0.3, 0.9, size=(N, k))
    preds[rng.random((N, k)) < 0.02] = np.nan
    window_ok = rng.random(N) > 0.03
    return t, x, preds, window_ok


def bits(ev, name: str) -> bytes:
    return np.ascontiguousarray(getattr(ev, name)).tobytes()  # NaN-aware: compares the bit patterns


def split_points(rng: np.random.Generator, n: int) -> list[int]:
    """Random batch boundaries: sizes from 1 to n."""
    cuts, at = [0], 0
    while at < n:
        at = min(n, at + int(rng.integers(1, max(2, n // 3))))
        cuts.append(at)
    return cuts


SIZINGS = [SizingConfig(fraction=0.37), SizingConfig(method="volatility_target", target_volatility=0.0031)]


@pytest.mark.parametrize("sizing", SIZINGS, ids=["fixed_fraction", "volatility_target"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rule=st.sampled_from(list(Aggregation)), k=st.integers(1, len(MODELS)))
def test_any_batch_split_gives_the_same_bits(sizing, seed, rule, k):
    p = params(rule, sizing, k)
    t, x, preds, window_ok = rows(seed, k)
    model_ok = np.ones(k, bool)
    whole = evaluate(p, t, t, x, preds, model_ok, window_ok)
    rng = np.random.default_rng(seed)
    for cuts in (list(range(N + 1)), split_points(rng, N), split_points(rng, N)):  # one bar at a time first
        parts = [evaluate(p, t[a:b], t[a:b], x[a:b], preds[a:b], model_ok, window_ok[a:b])
                 for a, b in zip(cuts, cuts[1:])]
        for name in FIELDS:
            joined = np.concatenate([getattr(e, name) for e in parts])
            assert joined.dtype == getattr(whole, name).dtype
            assert joined.tobytes() == bits(whole, name), f"{name} depends on the batch split"
