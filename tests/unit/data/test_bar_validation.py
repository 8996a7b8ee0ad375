from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from signalgen.data.schema import BAR_REJECTION_SCHEMA, BAR_SCHEMA, MAX_BAR_VALUE, BarReason
from signalgen.data.synthetic import synthetic_bars
from signalgen.data.validation import default_max_gap, in_order, validate_bars, validate_chunks
from signalgen.features.batch import compute_features
from signalgen.features.spec import FEATURE_NAMES, WARMUP_BARS

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
GOOD = (10.0, 11.0, 9.0, 10.5, 100.0)  # open, high, low, close, volume


def bars(*rows: tuple, timeframe: str = "1m") -> pl.DataFrame:
    """Rows of (minute, open, high, low, close, volume); minute None = null bar_time."""
    data = [("X", timeframe, None if m is None else T0 + timedelta(minutes=m), *values)
            for m, *values in rows]
    return pl.DataFrame(data, schema=BAR_SCHEMA, orient="row")


def second_bar(values: tuple, reason: BarReason) -> dict:
    """Validate a good bar followed by `values`; the second must be the one rejection."""
    return only(validate_bars(bars((1, *GOOD), (2, *values)), "1m"), reason)


def only(result, reason: BarReason) -> dict:
    assert result.rejections["reason"].to_list() == [reason.value], result.rejections
    assert result.counts[reason.value] == 1
    assert sum(result.counts.values()) == 1
    return result.rejections.row(0, named=True)


def test_clean_bars_pass_untouched():
    df = bars((1, *GOOD), (2, *GOOD), (3, *GOOD))
    result = validate_bars(df, "1m")
    assert_frame_equal(result.bars, df)
    assert result.rejections.height == 0 and result.rejections.schema == BAR_REJECTION_SCHEMA
    assert set(result.counts) == {r.value for r in BarReason} and not any(result.counts.values())


def test_non_finite_values_and_null_time():
    for bad in (float("nan"), float("inf"), None):
        row = second_bar((10.0, 11.0, 9.0, bad, 100.0), BarReason.NON_FINITE)
        assert row["detail"].startswith("close=")
    row = only(validate_bars(bars((1, *GOOD), (None, *GOOD)), "1m"), BarReason.NON_FINITE)
    assert row["detail"] == "bar_time=null"


def test_non_positive_price():
    row = second_bar((10.0, 11.0, 0.0, 10.5, 1.0), BarReason.NON_POSITIVE_PRICE)
    assert row["detail"] == "low=0.0"


def test_high_below_low():
    row = second_bar((10.0, 9.5, 10.0, 10.0, 1.0), BarReason.HIGH_BELOW_LOW)
    assert row["detail"] == "high=9.5 < low=10.0"
    assert row["bar_time"] == T0 + timedelta(minutes=2)


def test_close_or_open_outside_range():
    row = second_bar((10.0, 11.0, 9.0, 12.0, 1.0), BarReason.CLOSE_OUTSIDE_RANGE)
    assert row["detail"] == "close=12.0 outside [9.0, 11.0]"
    row = second_bar((8.0, 11.0, 9.0, 10.0, 1.0), BarReason.CLOSE_OUTSIDE_RANGE)
    assert row["detail"] == "open=8.0 outside [9.0, 11.0]"


def test_negative_volume():
    row = second_bar((10.0, 11.0, 9.0, 10.0, -5.0), BarReason.NEGATIVE_VOLUME)
    assert row["detail"] == "volume=-5.0 < 0"


def test_values_beyond_the_bound_are_too_large():
    row = second_bar((10.0, 1e308, 9.0, 10.5, 100.0), BarReason.TOO_LARGE)
    assert row["detail"] == "high=1e+308, above 1e+18"
    row = second_bar((10.0, 11.0, 9.0, 10.5, 3.4e38), BarReason.TOO_LARGE)
    assert row["detail"] == "volume=3.4e+38, above 1e+18"


def test_the_bound_keeps_features_finite_and_1e308_does_not():
    """Why MAX_BAR_VALUE: a spike at the bound still gives finite features; 1e308 gives NaN/inf."""
    base = synthetic_bars(["X"], "1m", T0, T0 + timedelta(minutes=200), seed=5)
    spike = pl.int_range(pl.len()) == 100

    def features(value: float) -> pl.DataFrame:
        bars = base.with_columns(*(pl.when(spike).then(value).otherwise(c).alias(c)
                                   for c in ("high", "close", "volume")))
        return compute_features(bars).slice(WARMUP_BARS).select(FEATURE_NAMES)

    at_bound = features(MAX_BAR_VALUE)
    at_bound_bars = base.with_columns(pl.when(spike).then(MAX_BAR_VALUE).otherwise(c).alias(c)
                                      for c in ("high", "volume"))
    assert validate_bars(at_bound_bars, "1m").removed == 0
    assert at_bound.select(pl.all().is_finite().all()).row(0) == (True,) * len(FEATURE_NAMES)
    with np.errstate(over="ignore", invalid="ignore"):
        assert not all(features(1e308).select(pl.all().is_finite().all()).row(0))


def test_first_failing_check_names_the_reason():
    result = validate_bars(bars((1, *GOOD), (2, float("nan"), 9.0, 10.0, -1.0, -1.0)), "1m")
    only(result, BarReason.NON_FINITE)


def test_duplicate_keeps_the_first():
    result = validate_bars(bars((1, *GOOD), (2, *GOOD), (2, 10.0, 11.0, 9.0, 10.9, 7.0)), "1m")
    row = only(result, BarReason.DUPLICATE_TIME)
    assert row["bar_time"] == T0 + timedelta(minutes=2)
    assert result.bars["close"].to_list() == [10.5, 10.5]


def test_out_of_order_is_removed():
    df = bars((1, *GOOD), (3, *GOOD), (2, *GOOD), (4, *GOOD))
    result = validate_bars(df, "1m", max_gap=timedelta(hours=1))
    row = only(result, BarReason.OUT_OF_ORDER)
    assert row["bar_time"] == T0 + timedelta(minutes=2)
    assert "before latest accepted 2025-01-01T00:03:00Z" in row["detail"]
    assert result.bars["bar_time"].is_sorted()


def test_out_of_order_after_the_next_accepted_bar():
    df = bars((1, *GOOD), (5, *GOOD), (2, *GOOD), (3, *GOOD), (4, *GOOD))
    row = only(validate_bars(df, "1m"), BarReason.OUT_OF_ORDER)
    assert row["detail"] == "bar_time=2025-01-01T00:05:00Z after the next accepted 2025-01-01T00:02:00Z"


@pytest.mark.parametrize("shift", [-100, 100, -2, 2])
def test_one_displaced_row_costs_only_itself(shift):
    """Before: a row moved 100 places earlier got the 100 good bars after it rejected (101 in all)."""
    df = synthetic_bars(["X"], "1m", T0, T0 + timedelta(minutes=1000), seed=2)
    order = list(range(df.height))
    order.insert(500 + shift, order.pop(500))
    result = validate_bars(df[order], "1m", max_gap=timedelta(minutes=2))  # the hole it leaves
    row = only(result, BarReason.OUT_OF_ORDER)
    assert row["bar_time"] == df["bar_time"][500] and result.bars.height == df.height - 1


def test_a_duplicate_that_arrives_early_loses_to_the_one_in_place():
    df = bars((1, *GOOD), (4, 1.0, 1.0, 1.0, 1.0, 1.0), (2, *GOOD), (3, *GOOD), (4, *GOOD))
    row = only(validate_bars(df, "1m"), BarReason.DUPLICATE_TIME)
    assert row["bar_time"] == T0 + timedelta(minutes=4)
    assert validate_bars(df, "1m").bars["close"].to_list() == [10.5, 10.5, 10.5, 10.5]


def test_a_bad_bar_does_not_block_a_good_one_at_the_same_time():
    result = validate_bars(bars((1, *GOOD), (2, float("nan"), 1, 1, 1, 1), (2, *GOOD)), "1m")
    only(result, BarReason.NON_FINITE)
    assert result.bars.height == 2


def test_gap_is_recorded_and_the_bar_kept():
    result = validate_bars(bars((1, *GOOD), (2, *GOOD), (6, *GOOD)), "1m")
    row = only(result, BarReason.GAP)
    assert row["bar_time"] == T0 + timedelta(minutes=6)
    assert row["detail"] == "gap of 240s after 2025-01-01T00:02:00Z (max 60s)"
    assert result.bars.height == 3 and result.removed == 0


def test_default_max_gap_allows_weekends_on_daily_bars():
    assert default_max_gap("5m") == timedelta(minutes=5)
    assert default_max_gap("1d") == timedelta(days=4)
    days = [0, 1, 4, 5, 10]  # Fri -> Mon is 3 days (fine); 5 -> 10 is 5 days (a gap)
    daily = bars(*((d * 24 * 60, *GOOD) for d in days), timeframe="1d")
    result = validate_bars(daily, "1d")
    assert result.counts["gap"] == 1 and result.rejections["bar_time"][0] == T0 + timedelta(days=10)
    assert validate_bars(daily, "1d", max_gap=timedelta(days=6)).counts["gap"] == 0


def test_empty_frame():
    result = validate_bars(pl.DataFrame(schema=BAR_SCHEMA), "1m")
    assert result.bars.height == 0 and result.rejections.height == 0 and result.removed == 0
    assert result.last_time is None


def test_chunk_boundaries_carry_the_last_accepted_time():
    df = bars((1, *GOOD), (2, *GOOD), (2, *GOOD), (1, *GOOD), (5, *GOOD))
    results = list(validate_chunks([df[:2], df[2:3], df[3:]], "1m"))
    reasons = [r.rejections["reason"].to_list() for r in results]
    assert reasons == [[], ["duplicate_time"], ["out_of_order", "gap"]]
    assert [r.bars.height for r in results] == [2, 0, 1]


def test_chunked_validation_equals_whole():
    df = synthetic_bars(["BTCUSD"], "1m", T0, T0 + timedelta(days=2), seed=3)
    idx = pl.int_range(pl.len())
    df = df.with_columns(
        pl.when(idx % 97 == 0).then(float("nan")).otherwise(pl.col("close")).alias("close"),
        pl.when(idx % 131 == 0).then(pl.col("bar_time").shift(1)).otherwise("bar_time").alias("bar_time"),
    )
    whole = validate_bars(df, "1m")
    parts = list(validate_chunks((df.slice(i, 500) for i in range(0, df.height, 500)), "1m"))
    assert_frame_equal(pl.concat([p.bars for p in parts]), whole.bars)
    assert_frame_equal(pl.concat([p.rejections for p in parts]), whole.rejections)
    assert whole.counts["non_finite"] > 0 and whole.counts["duplicate_time"] > 0 and whole.counts["gap"] > 0


def test_half_a_million_bars_validate_quickly():
    df = synthetic_bars(["BTCUSD"], "1m", T0, T0 + timedelta(minutes=500_000), seed=1)
    every_1000th = pl.int_range(pl.len()) % 1000 == 0
    df = df.with_columns(pl.when(every_1000th).then(-1.0).otherwise("volume").alias("volume"))
    order = list(range(df.height))
    for k in range(5007, df.height - 200, 10_000):  # 50 rows, each moved 100 places earlier
        order.insert(k - 100, order.pop(k))
    df = df[order]
    started = time.perf_counter()
    result = validate_bars(df, "1m")
    elapsed = time.perf_counter() - started
    assert result.counts["negative_volume"] == 500 and result.counts["out_of_order"] == 50
    assert elapsed < 2.0, elapsed  # ~0.3 s here; generous for a loaded 2-core machine


def longest_increasing_length(times: list[int]) -> int:
    """O(n^2) reference."""
    best = [1] * len(times)
    for i in range(len(times)):
        for j in range(i):
            if times[j] < times[i]:
                best[i] = max(best[i], best[j] + 1)
    return max(best, default=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=60), st.one_of(st.none(), st.integers(0, 10)))
def test_in_order_keeps_a_longest_increasing_subsequence(times, last):
    keep = in_order(np.asarray(times, dtype=np.int64), last)
    kept = [t for t, k in zip(times, keep) if k]
    assert all(a < b for a, b in zip(kept, kept[1:]))
    eligible = [t for t in times if last is None or t > last]
    assert len(kept) == longest_increasing_length(eligible)


values = st.one_of(st.floats(-5, 50, allow_nan=False), st.sampled_from([float("nan"), float("inf"), 0.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 40)), values, values, values, values,
                          st.floats(-10, 1000)), max_size=40))
def test_invariants_on_arbitrary_bars(rows):
    df = bars(*rows)
    result = validate_bars(df, "1m")
    kept, rej = result.bars, result.rejections
    assert kept.height + result.removed == df.height  # nothing lost
    assert rej.height == sum(result.counts.values())
    assert (rej["reason"] == "gap").sum() == result.counts["gap"]
    assert kept["bar_time"].is_sorted() and kept["bar_time"].n_unique() == kept.height
    for o, h, lo, c, v in kept.select("open", "high", "low", "close", "volume").iter_rows():
        assert all(math.isfinite(x) for x in (o, h, lo, c, v))
        assert 0 < lo <= min(o, c) and max(o, c) <= h and v >= 0
    gap_times = set(rej.filter(pl.col("reason") == "gap")["bar_time"].to_list())
    assert gap_times <= set(kept["bar_time"].to_list())


def test_disorder_at_the_edges_of_a_chunk():
    """No kept bar before (or after) a left-out one: its detail must still be written."""
    three = "2025-01-01T00:03:00Z"
    result = validate_bars(bars((5, *GOOD), (1, *GOOD), (2, *GOOD), (3, *GOOD)), "1m")
    row = only(result, BarReason.OUT_OF_ORDER)
    assert row["detail"] == "bar_time=2025-01-01T00:05:00Z after the next accepted 2025-01-01T00:01:00Z"
    result = validate_bars(bars((2, *GOOD), (3, *GOOD), (1, *GOOD)), "1m")
    assert only(result, BarReason.OUT_OF_ORDER)["detail"].endswith("before latest accepted " + three)
    result = validate_bars(bars((1, *GOOD)), "1m", last_time=T0 + timedelta(minutes=3))
    assert only(result, BarReason.OUT_OF_ORDER)["detail"].endswith("before latest accepted " + three)
