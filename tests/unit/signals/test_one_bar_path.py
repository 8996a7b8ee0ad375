"""`evaluate` of one bar takes a pure-Python path; it must give the vectorized path's bits.

The batch-split test (test_batch_independence.py) covers the common case; this one pushes the
one-bar path through its edges: both filters on, outputs exactly at thresholds, 0 and 1, volatility
on the band's float32 edges, zero and signed-zero features, a tiny exposure budget, float32 and
float64 features, and an unhealthy model.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.config.models import Aggregation, FiltersConfig, SizingConfig
from signalgen.features.spec import FEATURE_NAMES
from signalgen.signals.pipeline import ModelParams, StrategyParams, _evaluate_one, evaluate

FIVE_MIN = 300_000_000
VOL, VOL60 = FEATURE_NAMES.index("vol_20"), FEATURE_NAMES.index("vol_60")
TREND, RET60 = FEATURE_NAMES.index("sma_ratio_10_50"), FEATURE_NAMES.index("ret_60")
N = 300
FIELDS = ("direction", "confidence", "strength", "magnitude", "weight", "period", "reasons")
MODELS = (ModelParams("up_a", "1", 1, 12, 0.0123, 1.7, 0.55, 3),
          ModelParams("down_a", "1", -1, 6, 0.0271, 0.3, 0.52, 3),
          ModelParams("up_b", "1", 1, 24, 0.0057, 2.9, 0.6, 5),
          ModelParams("down_b", "1", -1, 12, 0.0113, 1.1, 0.5, 4))
BAND = (0.0011, 0.0031)  # not float32-representable: the band's edges round differently in float32


def params(rule, sizing, k, vol_feature, trend_feature, budget):
    filters = FiltersConfig(volatility={"enabled": True, "feature": vol_feature, "min": BAND[0], "max": BAND[1]},
                            trend_confirmation={"enabled": True, "feature": trend_feature})
    return StrategyParams("c", "s", "X", "5m", rule, filters, sizing, budget, 2.0, MODELS[:k])


def rows(seed, k, dtype):
    rng = np.random.default_rng(seed)
    t = (np.arange(N) + 1) * FIVE_MIN
    x = rng.normal(scale=0.01, size=(N, len(FEATURE_NAMES))).astype(dtype)
    for col in (VOL, VOL60):
        x[:, col] = rng.choice([BAND[0], BAND[1], np.nextafter(BAND[0], 0), np.nextafter(BAND[1], 1), 0.0,
                                0.002, 0.0005, 0.004], N)
    for col in (TREND, RET60):
        x[rng.random(N) < 0.1, col] = 0.0
        x[rng.random(N) < 0.1, col] = -0.0
    thresholds = np.array([m.threshold for m in MODELS[:k]])
    preds = rng.uniform(0.0, 1.0, size=(N, k))
    edge = rng.random((N, k))
    preds = np.where(edge < 0.1, thresholds, np.where(edge < 0.15, 1.0, np.where(edge < 0.2, 0.0, preds)))
    window_ok = rng.random(N) > 0.05
    now = t + rng.choice([0, FIVE_MIN, 3 * FIVE_MIN], N)
    return t, now, x, preds, window_ok


SIZINGS = [SizingConfig(fraction=0.37), SizingConfig(method="volatility_target", target_volatility=0.0031),
           SizingConfig(method="volatility_target", target_volatility=0.002, max_position=0.1)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rule=st.sampled_from(list(Aggregation)), k=st.integers(1, len(MODELS)),
       sizing=st.sampled_from(SIZINGS), vol_feature=st.sampled_from(["vol_20", "vol_60"]),
       trend_feature=st.sampled_from(["sma_ratio_10_50", "ret_60"]), budget=st.sampled_from([1.0, 0.05, 1e-9]),
       dtype=st.sampled_from([np.float32, np.float64]), healthy=st.booleans())
def test_one_bar_path_gives_the_vectorized_bits(seed, rule, k, sizing, vol_feature, trend_feature, budget, dtype,
                                                healthy):
    p = params(rule, sizing, k, vol_feature, trend_feature, budget)
    t, now, x, preds, window_ok = rows(seed, k, dtype)
    model_ok = np.ones(k, bool)
    model_ok[0] = healthy
    whole = evaluate(p, t, now, x, preds, model_ok, window_ok)  # vectorized: more than one bar
    for i in range(N):
        one = _evaluate_one(p, t[i:i + 1], now[i:i + 1], x[i:i + 1], preds[i:i + 1], model_ok, window_ok[i:i + 1])
        assert one is not None, "finite rows take the one-bar path"
        for name in FIELDS:
            got, want = getattr(one, name), getattr(whole, name)[i:i + 1]
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, i, got, want)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.5, 1.5])
def test_unusual_outputs_take_the_vectorized_path(bad):
    p = params(Aggregation.WEIGHTED, SIZINGS[0], 2, "vol_20", "ret_60", 1.0)
    t, now, x, preds, window_ok = rows(1, 2, np.float32)
    preds[0, 1] = bad
    model_ok = np.ones(2, bool)
    assert _evaluate_one(p, t[:1], now[:1], x[:1], preds[:1], model_ok, window_ok[:1]) is None
    one, whole = (evaluate(p, t[:n], now[:n], x[:n], preds[:n], model_ok, window_ok[:n]) for n in (1, 2))
    for name in FIELDS:
        assert getattr(one, name).tobytes() == getattr(whole, name)[:1].tobytes()
