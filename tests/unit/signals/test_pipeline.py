"""The pipeline end to end on hand-made arrays: each reason code, ids, records."""

import uuid

import numpy as np
import pytest

from signalgen.config.models import Aggregation, FiltersConfig, SizingConfig
from signalgen.features.spec import FEATURE_NAMES
from signalgen.signals.ids import id_key, signal_ids
from signalgen.signals.pipeline import ModelParams, StrategyParams, evaluate, reason_codes, to_frames
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA

FIVE_MIN = 300_000_000
VOL, TREND = FEATURE_NAMES.index("vol_20"), FEATURE_NAMES.index("sma_ratio_10_50")


def params(aggregation=Aggregation.WEIGHTED, filters=FiltersConfig(), budget=1.0, versions=("a1", "b1")):
    models = (ModelParams("up", versions[0], 1, 12, 0.01, 1.0, 0.6, 3),
              ModelParams("down", versions[1], -1, 6, 0.02, 1.0, 0.6, 3))
    return StrategyParams("c1", "s1", "BTCUSD", "5m", aggregation, filters, SizingConfig(fraction=0.5), budget,
                          2.0, models)


def features(n, vol=0.01, trend=0.001):
    f = np.full((n, len(FEATURE_NAMES)), 0.1)
    f[:, VOL], f[:, TREND] = vol, trend
    return f


def run(p, preds, feats=None, now=None, ok=None, model_ok=(True, True)):
    n = len(preds)
    t = (np.arange(n) + 1) * FIVE_MIN
    ev = evaluate(p, t, t if now is None else now, features(n) if feats is None else feats, np.array(preds, float),
                  np.array(model_ok), np.ones(n, bool) if ok is None else ok)
    return t, ev


def test_each_reason_code():
    p = params(filters=FiltersConfig(volatility={"enabled": True, "min": 0.0, "max": 0.02},
                                     trend_confirmation={"enabled": True}))
    f = features(8)
    f[2, 0] = np.nan        # nan_feature
    f[5, VOL] = 0.05        # volatility_filter
    f[6, TREND] = -0.001    # trend_unconfirmed (up signal against a down trend)
    preds = [[0.9, 0.1], [0.5, 0.5], [0.9, 0.1], [0.9, 0.9], [1.7, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]
    ok = np.ones(8, bool)
    ok[7] = False           # incomplete_window
    t, ev = run(p, preds, f, ok=ok)
    assert reason_codes(ev.reasons) == [
        [], ["below_confidence"], ["nan_feature"], ["no_consensus"], ["model_unhealthy"],
        ["volatility_filter"], ["trend_unconfirmed"], ["incomplete_window"]]
    assert ev.direction[0] == 1 and ev.weight[0] == pytest.approx(0.5 * 0.9 / 2)
    assert ev.period[0] == 12 and ev.magnitude[0] == pytest.approx(0.01 * 0.9)


def test_stale_and_unhealthy_model():
    p = params()
    t, ev = run(p, [[0.9, 0.1], [0.9, 0.1]], now=np.array([FIVE_MIN * 5, FIVE_MIN * 2]))
    assert reason_codes(ev.reasons) == [["stale_data"], []]
    _, ev = run(p, [[0.9, 0.1]], model_ok=(True, False))
    assert reason_codes(ev.reasons) == [["model_unhealthy"]]


def test_zero_budget_gives_zero_size():
    _, ev = run(params(budget=1e-300), [[0.9, 0.1]])
    assert ev.weight[0] > 0
    p = params()
    _, ev = run(p, [[0.9, 0.1]], feats=features(1, vol=0.0))
    assert reason_codes(ev.reasons) == [[]]  # fixed fraction does not need volatility


def test_records_match_schemas_and_split_by_acceptance():
    p = params()
    preds = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.95]])
    t, ev = run(p, preds)
    signals, rejections = to_frames(p, ev, t, t, preds, mode="historical", run_id="r")
    assert signals.schema == SIGNAL_SCHEMA and rejections.schema == REJECTION_SCHEMA
    assert signals["direction"].to_list() == [1, -1]
    assert rejections["reasons"].to_list() == [["below_confidence"]]
    assert signals["models"][0].to_list()[0] == {"model_id": "up", "version": "a1", "output": 0.9}
    ids = signal_ids(p.key, t).to_list()
    assert signals["signal_id"].to_list() == [ids[0], ids[2]] and rejections["rejection_id"].to_list() == [ids[1]]


def test_one_bar_alone_equals_the_same_bar_in_a_batch():
    """The live path (one bar) and the historical path (many) give the same decision."""
    p = params()
    preds = np.random.default_rng(1).uniform(size=(50, 2))
    t, ev = run(p, preds)
    for i in range(50):
        _, one = run(p, preds[i:i + 1])
        assert one.reasons[0] == ev.reasons[i] and one.direction[0] == ev.direction[i]
        assert one.weight[0] == ev.weight[i]
        assert signal_ids(p.key, t[i:i + 1])[0] == signal_ids(p.key, t)[i]


def test_ids_are_deterministic_and_depend_on_every_key_part():
    t = np.array([1_700_000_000_000_000])
    base = signal_ids(id_key("c", "s", "X", "5m", [("m", "v1")]), t)[0]
    assert base == signal_ids(id_key("c", "s", "X", "5m", [("m", "v1")]), t)[0]
    parsed = uuid.UUID(base)
    assert str(parsed) == base and parsed.version == 8 and parsed.variant == uuid.RFC_4122
    others = {signal_ids(id_key(*k), t)[0] for k in [("d", "s", "X", "5m", [("m", "v1")]),
                                                     ("c", "t", "X", "5m", [("m", "v1")]),
                                                     ("c", "s", "Y", "5m", [("m", "v1")]),
                                                     ("c", "s", "X", "1m", [("m", "v1")]),
                                                     ("c", "s", "X", "5m", [("m", "v2")])]}
    assert base not in others and len(others) == 5
    assert signal_ids(id_key("c", "s", "X", "5m", [("m", "v1")]), t + 1)[0] != base


def test_ids_unique_over_many_bars():
    t = np.arange(1_000_000, dtype=np.int64) * FIVE_MIN
    ids = signal_ids(id_key("c", "s", "X", "5m", [("m", "v1")]), t)
    assert ids.n_unique() == t.size
