"""BarValidator (one bar at a time) keeps the bars validate_chunks keeps with one-bar chunks on any
sequence, and equals validate_bars over the whole sequence (bars and rejection rows) when no bar
arrives ahead of older ones."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from signalgen.data.schema import BAR_REJECTION_SCHEMA
from signalgen.data.synthetic import synthetic_bars
from signalgen.data.validation import BarValidator, validate_bars, validate_chunks

from ..features.helpers import T0

BAD = ["nan", "inf", "huge", "negative", "high_below_low", "close_outside", "neg_volume", "none",
       "duplicate", "earlier", "gap", "problem"]


def spoiled(seed: int, n: int = 400) -> pl.DataFrame:
    """Synthetic 1m bars with a random bad bar every ~10: bad values, repeats, late bars, gaps."""
    rng = np.random.default_rng(seed)
    rows = synthetic_bars(["BTCUSD"], "1m", T0, T0 + n * timedelta(minutes=1), seed=seed).to_dicts()
    for row in rows:
        row["problem"] = row["problem_detail"] = None
    out = []
    kinds = BAD
    for i, row in enumerate(rows):
        if i and rng.random() < 0.1:
            kind = kinds[rng.integers(len(kinds))]
            row = dict(row)
            if kind == "nan":
                row["close"] = float("nan")
            elif kind == "inf":
                row["high"] = float("inf")
            elif kind == "huge":
                row["volume"] = 1e308
            elif kind == "negative":
                row["low"] = -1.0
            elif kind == "high_below_low":
                row["high"], row["low"] = row["low"] - 1.0, row["high"]
            elif kind == "close_outside":
                row["close"] = row["high"] * 1.01
            elif kind == "neg_volume":
                row["volume"] = -5.0
            elif kind == "none":
                row["open"] = None
            elif kind == "duplicate":
                out.append(dict(out[-1]))
                continue
            elif kind == "earlier":
                # late: on an accepted bar's time (a duplicate) or between two (out of order)
                row["bar_time"] -= timedelta(minutes=int(rng.integers(2, 30)), seconds=int(rng.integers(2)) * 30)
            elif kind == "gap":
                for r in rows[i:]:
                    r["bar_time"] += timedelta(minutes=7)
                row["bar_time"] = rows[i]["bar_time"]
            elif kind == "problem":
                row["problem"], row["problem_detail"] = "unparsable", "close='x'"
        out.append(row)
    return pl.DataFrame(out, schema=synthetic_bars(["BTCUSD"], "1m", T0, T0 + timedelta(minutes=1), seed=0).schema
                        | {"problem": pl.String, "problem_detail": pl.String})


def per_bar(bars: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    validator, kept, rejected = BarValidator("1m"), [], []
    for row in bars.iter_rows(named=True):
        ok, rejections = validator.push(row)
        if ok:
            kept.append({k: row[k] for k in bars.columns if not k.startswith("problem")})
        if rejections is not None:
            rejected.append(rejections)
    good = pl.DataFrame(kept, schema=bars.drop("problem", "problem_detail").schema)
    return good, pl.concat(rejected) if rejected else pl.DataFrame(schema=BAR_REJECTION_SCHEMA)


@pytest.mark.parametrize("seed", range(6))
def test_equals_one_bar_chunks_on_any_sequence(seed):
    bars = spoiled(seed)
    results = list(validate_chunks((bars.slice(i, 1) for i in range(bars.height)), "1m"))
    good, rejected = per_bar(bars)
    assert good.equals(pl.concat([r.bars for r in results]))
    chunked = pl.concat([r.rejections for r in results])
    # the rows differ only where a late bar repeats an accepted time: a duplicate, not out of order
    relabelled = chunked["reason"] != rejected["reason"]
    assert chunked.drop("reason", "detail").equals(rejected.drop("reason", "detail"))
    assert set(chunked.filter(relabelled)["reason"]) <= {"out_of_order"}
    assert set(rejected.filter(relabelled)["reason"]) <= {"duplicate_time"}
    assert set(rejected["reason"]) >= {"non_finite", "duplicate_time", "out_of_order", "gap"}


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_whole_sequence_rule_when_no_bar_arrives_early(seed):
    bars = spoiled(seed)
    whole = validate_bars(bars, "1m")
    good, rejected = per_bar(bars)
    assert good.equals(whole.bars) and rejected.equals(whole.rejections)
    assert whole.removed > 10 and min(whole.counts[k] for k in ("gap", "duplicate_time", "out_of_order")) > 0


def test_a_bar_ahead_of_its_time_is_where_the_rules_differ():
    """A bar arriving 4 places early: the whole-sequence rule drops it alone (leaving a gap where it
    was); on arrival it is kept (after a gap) and the 4 older bars that follow are out of order."""
    bars = synthetic_bars(["BTCUSD"], "1m", T0, T0 + 10 * timedelta(minutes=1), seed=1)
    moved = pl.concat([bars.slice(0, 3), bars.slice(7, 1), bars.slice(3, 4), bars.slice(8)])
    assert validate_bars(moved, "1m").rejections["reason"].to_list() == ["out_of_order", "gap"]
    good, rejected = per_bar(moved.with_columns(problem=pl.lit(None, pl.String),
                                                problem_detail=pl.lit(None, pl.String)))
    assert rejected["reason"].to_list() == ["gap"] + ["out_of_order"] * 4 and good.height == 6
