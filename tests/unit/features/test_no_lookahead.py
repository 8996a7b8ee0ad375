"""A batch feature at bar t depends on bars <= t only."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.data.synthetic import synthetic_bars
from signalgen.features.batch import compute_features
from signalgen.features.spec import FEATURE_NAMES

from .helpers import T0, with_flat_stretches

END = T0 + timedelta(minutes=1_500)
BARS = with_flat_stretches(synthetic_bars(["BTCUSD"], "1m", T0, END, seed=9), every=400)
OTHER = synthetic_bars(["BTCUSD"], "1m", T0, END, seed=10)
FULL = compute_features(BARS).select(FEATURE_NAMES).to_numpy()
VALUES = ["open", "high", "low", "close", "volume"]


def features(bars: pl.DataFrame) -> np.ndarray:
    return compute_features(bars).select(FEATURE_NAMES).to_numpy()


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, BARS.height - 2), seed=st.integers(0, 2**32 - 1),
       how=st.sampled_from(["other_series", "scaled", "shuffled"]))
def test_changing_the_future_leaves_the_past_unchanged(t, seed, how):
    rng = np.random.default_rng(seed)
    future = BARS.slice(t + 1)
    if how == "other_series":
        future = OTHER.slice(t + 1).with_columns(bar_time=future["bar_time"])
    elif how == "scaled":
        k = rng.uniform(0.5, 2.0)
        future = future.with_columns(pl.col("open", "high", "low", "close") * k,
                                     pl.col("volume") * rng.uniform(0, 3))
    else:
        future = future.with_columns(future.select(VALUES).sample(fraction=1.0, shuffle=True, seed=seed))
    changed = features(pl.concat([BARS.head(t + 1), future]))
    assert np.array_equal(changed[: t + 1], FULL[: t + 1], equal_nan=True)


def test_value_at_t_equals_the_value_computed_on_the_prefix():
    # Every bar of the first blocks (block edges at multiples of 64) and a spread after.
    ts = list(range(0, 200)) + list(range(200, BARS.height, 37)) + [BARS.height - 1]
    for t in ts:
        prefix = features(BARS.head(t + 1))
        assert np.array_equal(prefix[-1], FULL[t], equal_nan=True), t
