from __future__ import annotations

from datetime import datetime, timedelta, timezone

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata

from signalgen.data.schema import BAR_SCHEMA
from signalgen.data.synthetic import EPOCH, BLOCK_BARS, _walks, iter_synthetic_chunks, synthetic_bars
from signalgen.data.validation import validate_bars
from signalgen.features.batch import compute_features, feature_matrix

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
# Just over one internal block of 1m bars, so block boundaries are crossed.
END = START + timedelta(minutes=BLOCK_BARS + 5_000)


def test_same_inputs_give_identical_bars():
    a = synthetic_bars(["BTCUSD", "ETHUSD"], "1m", START, END, seed=7)
    b = synthetic_bars(["BTCUSD", "ETHUSD"], "1m", START, END, seed=7)
    assert_frame_equal(a, b)
    assert a.schema == BAR_SCHEMA


def test_seed_and_symbol_change_the_series():
    base = synthetic_bars(["BTCUSD"], "5m", START, START + timedelta(days=2), seed=7)
    other_seed = synthetic_bars(["BTCUSD"], "5m", START, START + timedelta(days=2), seed=8)
    other_symbol = synthetic_bars(["ETHUSD"], "5m", START, START + timedelta(days=2), seed=7)
    assert not np.array_equal(base["close"].to_numpy(), other_seed["close"].to_numpy())
    assert base["open"][0] != other_symbol["open"][0]  # different start prices


def test_longer_range_only_extends_the_series():
    short = synthetic_bars(["BTCUSD"], "1m", START, START + timedelta(minutes=1234), seed=3)
    long = synthetic_bars(["BTCUSD"], "1m", START, END, seed=3)
    assert_frame_equal(long.head(short.height), short)


@pytest.mark.parametrize("chunk_bars", [1_000, 4_097, BLOCK_BARS, BLOCK_BARS + 1, 100_000])
def test_chunks_concatenate_to_the_one_shot_series(chunk_bars):
    whole = synthetic_bars(["SOLUSD"], "1m", START, END, seed=11)
    chunks = list(iter_synthetic_chunks("SOLUSD", "1m", START, END, 11, chunk_bars))
    assert all(c.height == chunk_bars for c in chunks[:-1])
    assert 0 < chunks[-1].height <= chunk_bars
    assert_frame_equal(pl.concat(chunks), whole)


MINUTE = timedelta(minutes=1)
# bar indices from the epoch: two backward blocks, the epoch, two forward blocks
INDEX = st.integers(-2 * BLOCK_BARS - 50, 2 * BLOCK_BARS + 50)


@settings(max_examples=25, deadline=None)
@given(INDEX, INDEX, INDEX, INDEX)
def test_any_range_gives_the_same_bars(a, b, c, d):
    """Before: bar k of a range was the k-th bar of a series anchored at the range's start, so two
    ranges (a worker's history start, another client's run) shared no closes at the same time."""
    first = synthetic_bars(["ETHUSD"], "1m", EPOCH + min(a, b) * MINUTE, EPOCH + max(a, b) * MINUTE, seed=7)
    second = synthetic_bars(["ETHUSD"], "1m", EPOCH + min(c, d) * MINUTE, EPOCH + max(c, d) * MINUTE, seed=7)
    shared = first.join(second, on="bar_time", how="inner", suffix="_2")
    lo, hi = max(min(a, b), min(c, d)), min(max(a, b), max(c, d))
    assert shared.height == max(0, hi - lo)
    for col in ("open", "high", "low", "close", "volume"):
        assert shared[col].equals(shared[f"{col}_2"].alias(col)), col


@settings(max_examples=25, deadline=None)
@given(st.integers(-BLOCK_BARS - 9, -BLOCK_BARS + 9), st.integers(0, 2 * BLOCK_BARS + 40),
       st.sampled_from(["1m", "5m", "1h"]))
def test_any_split_of_a_range_gives_the_same_bars(start, split, timeframe):
    tf = timedelta(minutes={"1m": 1, "5m": 5, "1h": 60}[timeframe])
    a, m, b = EPOCH + start * tf, EPOCH + (start + split) * tf, EPOCH + (start + 2 * BLOCK_BARS + 40) * tf
    whole = synthetic_bars(["SOLUSD"], timeframe, a, b, seed=3)
    parts = pl.concat([synthetic_bars(["SOLUSD"], timeframe, a, m, seed=3),
                       synthetic_bars(["SOLUSD"], timeframe, m, b, seed=3)])
    assert parts.equals(whole)


def test_a_far_date_reached_at_once_equals_the_continuation():
    """Bars of 2030 reached at once (a fresh process: no carries kept) equal the same bars reached
    through the whole series from the epoch."""
    start, end = datetime(2030, 6, 1, tzinfo=timezone.utc), datetime(2030, 6, 8, tzinfo=timezone.utc)
    _walks.cache_clear()
    far = synthetic_bars(["BTCUSD"], "1h", start, end, seed=5)
    _walks.cache_clear()
    through = pl.concat(iter_synthetic_chunks("BTCUSD", "1h", EPOCH, end, 5, 7_000))
    assert through.height == (end - EPOCH) // timedelta(hours=1)
    assert far.equals(through.filter(pl.col("bar_time") > start))


def test_bars_before_the_epoch_are_valid_and_continuous():
    """The backward walk: valid OHLC, each bar opens at the last close across the epoch and across
    its own block boundary, prices at the level of the forward walk."""
    bars = synthetic_bars(["BTCUSD"], "1m", EPOCH - (BLOCK_BARS + 3_000) * MINUTE, EPOCH + 3_000 * MINUTE, seed=5)
    o, h, lo, c = (bars[k].to_numpy() for k in ("open", "high", "low", "close"))
    assert np.array_equal(o[1:], c[:-1])
    assert (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all()
    assert 30 < c.min() and c.max() < 400
    checked = validate_bars(bars, "1m")
    assert checked.bars.height == bars.height and checked.rejections.height == 0


def test_bars_are_valid_ohlc_and_continuous():
    bars = synthetic_bars(["BTCUSD", "XRPUSD"], "1m", START, END, seed=5)
    for _, one in bars.group_by("symbol"):
        o, h, lo, c, v = (one[k].to_numpy() for k in ("open", "high", "low", "close", "volume"))
        assert np.isfinite(np.stack([o, h, lo, c, v])).all()
        assert (lo > 0).all() and (v >= 0).all()
        assert (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all()
        assert np.array_equal(o[1:], c[:-1])  # each bar opens at the last close, across blocks too
        assert 30 < c.min() and c.max() < 400  # price level ~100
        checked = validate_bars(one, "1m")
        assert checked.bars.height == one.height and checked.rejections.height == 0


def test_bar_times_are_the_grid_in_start_end():
    end = START + timedelta(hours=10, minutes=7)  # not on the 5m grid: the last bar ends at 10:05
    bars = synthetic_bars(["BTCUSD"], "5m", START, end, seed=1)
    times = bars["bar_time"]
    assert times[0] == START + timedelta(minutes=5)  # bar_time is the bar END: (start, end]
    assert times[-1] == START + timedelta(hours=10, minutes=5)
    assert (times.diff().drop_nulls() == timedelta(minutes=5)).all()
    on_grid = synthetic_bars(["BTCUSD"], "5m", START, START + timedelta(hours=1), seed=1)
    assert on_grid["bar_time"][-1] == START + timedelta(hours=1)


def test_naive_datetimes_are_utc_and_empty_ranges_are_empty():
    naive = synthetic_bars(["BTCUSD"], "1h", START.replace(tzinfo=None), datetime(2025, 1, 2), seed=1)
    aware = synthetic_bars(["BTCUSD"], "1h", START, datetime(2025, 1, 2, tzinfo=timezone.utc), seed=1)
    assert_frame_equal(naive, aware)
    empty = synthetic_bars(["BTCUSD"], "1h", START, START, seed=1)
    assert empty.height == 0 and empty.schema == BAR_SCHEMA


def test_rows_sorted_by_symbol_then_time_and_symbols_deduplicated():
    bars = synthetic_bars(["XRPUSD", "BTCUSD", "XRPUSD"], "1h", START, START + timedelta(days=3), seed=1)
    assert bars["symbol"].unique(maintain_order=True).to_list() == ["BTCUSD", "XRPUSD"]
    assert bars.height == 2 * 72
    assert bars.sort("symbol", "bar_time").equals(bars)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    ranks = rankdata(score)
    pos = y.sum()
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos)))


@pytest.mark.parametrize("start", [START, EPOCH - timedelta(days=60)], ids=["after", "before-epoch"])
def test_structure_is_learnable_by_lightgbm(start):
    """On 60 days of the four demo symbols, after the epoch and on the backward walk before it (one
    validation window of two symbols scores 0.59 to 0.71 by where it falls: too noisy a sample)."""
    bars = synthetic_bars(["BTCUSD", "ETHUSD", "SOLUSD", "XRPUSD"], "5m", start, start + timedelta(days=60), seed=7)
    df = compute_features(bars).with_columns(
        (pl.col("close").shift(-12).over("symbol") / pl.col("close")).log().alias("fwd"))
    df = df.filter(pl.col("fwd").is_not_null() & pl.col("ret_60").is_not_nan())
    y = (df["fwd"] > 0.5 * df["fwd"].std()).to_numpy()
    x = feature_matrix(df)
    train = (df["bar_time"] < start + timedelta(days=42)).to_numpy()
    model = lgb.LGBMClassifier(n_estimators=100, learning_rate=0.05, verbose=-1, n_jobs=1)
    model.fit(x[train], y[train])
    auc = _auc(y[~train], model.predict_proba(x[~train])[:, 1])
    assert auc > 0.6, auc
