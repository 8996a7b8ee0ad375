from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from signalgen.data.synthetic import synthetic_bars
from signalgen.features.spec import FEATURE_NAMES, WARMUP_BARS
from signalgen.models.catalog import DEMO_MODELS, DEMO_START, DEMO_SYMBOLS, ModelSpec, spec
from signalgen.models.registry import ModelRegistry, sha256
from signalgen.models.train import (
    _float32_at_most, auc, float32_thresholds, labels, log_loss, split, to_onnx, train_demo_models, training_frame,
)

from .conftest import DAYS, NOW, SEED


def test_registry_layout_and_cards(trained):
    reg = ModelRegistry(trained.registry_dir)
    assert reg.ids() == sorted(s.model_id for s in DEMO_MODELS)
    for s in DEMO_MODELS:
        card = reg.card(s.model_id)
        assert card == trained.cards[s.model_id]
        assert (card.direction, card.horizon_bars) == (s.direction, s.horizon_bars)
        assert card.feature_names == FEATURE_NAMES and card.timeframe == "5m"
        assert card.created_at == NOW
        w = card.training_window
        assert w.symbols == DEMO_SYMBOLS and w.seed == SEED
        assert w.start < w.valid_start < w.end <= DEMO_START + timedelta(days=DAYS)
        assert w.rows_train > 3 * w.rows_valid > 0
        folder = reg.path(s.model_id, card.version)
        size = 0
        for name in ("model.txt", "model.onnx"):
            data = (folder / name).read_bytes()
            assert sha256(data) == card.files[name]
            size += len(data)
        assert card.content_hash == card.files["model.txt"]
        assert size < 500_000


def test_target_return_gives_positive_rate_near_27_percent(trained):
    for s in DEMO_MODELS:
        card = trained.cards[s.model_id]
        assert 0.2 <= card.metrics.positive_rate <= 0.35, card.model_id
    # up and down models of one horizon share x
    assert trained.cards["swing_high"].target_return == trained.cards["swing_low"].target_return
    assert trained.cards["swing_high_short"].target_return < trained.cards["swing_high"].target_return


def test_models_learn_something(trained):
    for model_id in ("swing_high", "swing_low"):
        m = trained.cards[model_id].metrics
        assert m.auc > 0.55, model_id
        assert m.auc_train > m.auc - 0.02  # validation is out of sample
        assert 0 < m.log_loss < np.log(2)


def test_training_is_reproducible(trained, tmp_path):
    # one model per horizon keeps this fast; each model is trained independently of the others
    specs = [spec("swing_high"), spec("swing_low_short")]
    again = train_demo_models(tmp_path, seed=SEED, days=DAYS, specs=specs, now=NOW + timedelta(days=1))
    for card in again:
        first = trained.cards[card.model_id]
        assert card.content_hash == first.content_hash
        assert card.files == first.files  # ONNX bytes too
        assert card.metrics == first.metrics


def test_split_purges_the_label_window(trained):
    for h in (4, 12):
        train, valid = split(trained.frame, h, trained.valid_start, "5m")
        assert train["bar_time"].max() + timedelta(minutes=5 * h) < trained.valid_start
        assert valid["bar_time"].min() == trained.valid_start
        assert train[f"fwd_{h}"].null_count() == valid[f"fwd_{h}"].null_count() == 0


def test_forward_returns_are_looked_up_by_time():
    bars = synthetic_bars(["BTCUSD"], "5m", DEMO_START, DEMO_START + timedelta(minutes=5 * 100), 3)
    gap_time = bars["bar_time"][80]
    frame = training_frame(bars.filter(pl.col("bar_time") != gap_time), [4], "5m")
    assert frame.height == 99 - (WARMUP_BARS - 1)  # warm-up rows dropped
    close = dict(zip(bars["bar_time"], bars["close"]))
    for t, c, fwd in frame.select("bar_time", "close", "fwd_4").iter_rows():
        ahead = t + timedelta(minutes=20)
        if ahead == gap_time or ahead not in close:
            assert fwd is None  # across the gap or past the end: no label
        else:
            assert abs(fwd - np.log(close[ahead] / c)) < 1e-12
    assert frame["fwd_4"].null_count() == 1 + 4


def test_labels():
    fwd = np.array([-0.02, -0.01, 0.0, 0.01, 0.02])
    assert labels(fwd, 1, 0.01).tolist() == [0, 0, 0, 0, 1]
    assert labels(fwd, -1, 0.01).tolist() == [1, 0, 0, 0, 0]


@given(arrays(np.int8, st.integers(2, 40), elements=st.integers(0, 1)),
       st.data())
def test_auc_is_the_probability_a_positive_outranks_a_negative(y, data):
    p = data.draw(arrays(np.float64, len(y), elements=st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.9])))
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        assert np.isnan(auc(y, p))
        return
    pairs = [(a > b) + 0.5 * (a == b) for a in pos for b in neg]
    assert abs(auc(y, p) - np.mean(pairs)) < 1e-12


def test_log_loss():
    assert abs(log_loss(np.array([1, 0]), np.array([0.5, 0.5])) - np.log(2)) < 1e-12
    assert log_loss(np.array([1]), np.array([0.0])) < 40  # clipped, finite


def test_single_class_labels_are_a_clear_error(tmp_path):
    never = ModelSpec("never", 1, 12, 1.0, "a 100% rise within an hour")
    with pytest.raises(ValueError, match="both classes"):
        train_demo_models(tmp_path, days=2, specs=[never])
    assert ModelRegistry(tmp_path).ids() == []


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-3e38, max_value=3e38))
def test_float32_at_most_is_the_largest_float32_not_above(t):
    f = _float32_at_most(t)
    assert float(np.float32(f)) == f <= t
    assert float(np.nextafter(np.float32(f), np.float32(np.inf))) > t


def test_float32_thresholds_keep_lightgbm_decisions_and_match_onnx():
    import lightgbm as lgb
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    # Values a few ulps apart make split midpoints that float32 cannot hold.
    base = rng.normal(0, 0.002, size=(3000, 15)).astype(np.float32)
    x = np.where(rng.random(base.shape) < 0.5, base, np.nextafter(base, np.float32(1)))
    y = (x[:, 4] + rng.normal(0, 0.001, len(x)) > 0).astype(int)
    raw = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 15, "min_data_in_leaf": 5,
                     "num_threads": 1}, lgb.Dataset(x, y), num_boost_round=30)
    text = float32_thresholds(raw.model_to_string())
    assert float32_thresholds(text) == text  # idempotent: thresholds already float32
    fixed = lgb.Booster(model_str=text)
    # probe exactly at every threshold's float32 neighbours, where a flip would show
    dump = raw.dump_model()["tree_info"]
    probes = []

    def walk(node):
        if "split_index" in node:
            t32 = np.float32(node["threshold"])
            for v in (np.nextafter(t32, np.float32(-1)), t32, np.nextafter(t32, np.float32(1))):
                row = x[len(probes) % len(x)].copy()
                row[node["split_feature"]] = v
                probes.append(row)
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in dump:
        walk(tree["tree_structure"])
    probes = np.vstack([x, np.array(probes, dtype=np.float32)])
    assert np.array_equal(raw.predict(probes), fixed.predict(probes))

    def onnx_predict(booster):
        session = ort.InferenceSession(to_onnx(booster, "probe"), providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], {"input": probes})[0][:, 1]

    assert np.abs(onnx_predict(raw) - raw.predict(probes)).max() > 1e-3  # the problem is real
    assert np.abs(onnx_predict(fixed) - fixed.predict(probes)).max() < 1e-6  # and gone


def daily(days: list[int]) -> pl.DataFrame:
    """Daily bars (16:00 New York, so the UTC hour moves with daylight saving) on the given day numbers."""
    from signalgen.data.schema import BAR_SCHEMA

    t0 = datetime(2008, 12, 1)  # a Monday; US daylight saving starts on 2009-03-08
    times = pl.Series([t0 + timedelta(days=d, hours=16) for d in days]).dt.replace_time_zone(
        "America/New_York").dt.convert_time_zone("UTC")
    closes = [100.0 + i for i in range(len(days))]
    return pl.DataFrame({"symbol": "AAPL", "timeframe": "1d", "bar_time": times, "open": closes,
                         "high": [c + 1 for c in closes], "low": [c - 1 for c in closes], "close": closes,
                         "volume": 1e6}).cast(dict(BAR_SCHEMA))


def test_daily_forward_returns_follow_the_exchange_calendar():
    """Before: looked up at bar_time + 5 days, so every label across a holiday or a daylight-saving
    change was null (here: the week before 2009-03-08, whose +5 days lands on another UTC hour)."""
    weekdays = [d for d in range(300) if d % 7 < 5]
    weekdays.remove(weekdays[150])  # one holiday: a 1-day hole is no gap on daily bars
    del weekdays[170:173]  # a 5-day hole: a gap (default_max_gap 4 days), no label across it
    bars = daily(weekdays)
    frame = training_frame(bars, [5], "1d")
    close = bars["close"].to_list()
    first = bars.height - frame.height  # warm-up rows dropped
    expected = []
    for i in range(first, bars.height):
        across_gap = any(weekdays[j + 1] - weekdays[j] > 4 for j in range(i, min(i + 5, len(weekdays) - 1)))
        expected.append(None if i + 5 >= bars.height or across_gap else np.log(close[i + 5] / close[i]))
    got = frame["fwd_5"].to_list()
    assert [g is None for g in got] == [e is None for e in expected]
    assert all(abs(g - e) < 1e-12 for g, e in zip(got, expected) if e is not None)
    before_dst = frame.filter(pl.col("bar_time").dt.date().is_between(datetime(2009, 3, 2).date(),
                                                                      datetime(2009, 3, 6).date()))
    assert before_dst.height == 5 and before_dst["fwd_5"].null_count() == 0


@pytest.mark.parametrize("weekday", range(5))
def test_daily_split_purges_weekends_too(weekday):
    """Before: the purge was 5 calendar days, so a train label could use validation closes."""
    frame = training_frame(daily([d for d in range(400) if d % 7 < 5]), [5], "1d")
    start_valid = frame["bar_time"][200 + weekday]
    train, _ = split(frame, 5, start_valid, "1d")
    last = train["bar_time"].max()
    bars_after = frame.filter((pl.col("bar_time") > last) & (pl.col("bar_time") < start_valid)).height
    assert bars_after >= 5  # the last train label's 5 bars all lie before validation


@pytest.mark.shipped_clients  # the committed models must serve the shipped ada.yaml
def test_daily_models_reproduce_the_registered_versions(tmp_path):
    """The committed registry/daily_* models are what `models train` builds, and they are healthy
    for the ada client's strategy (1d, features in order, AUC above chance, age within its limit)."""
    from signalgen.config.loader import load_client
    from signalgen.models.catalog import DAILY_MODELS
    from signalgen.models.health import check_card
    from signalgen.models.train import train_daily_models

    root = Path(__file__).resolve().parents[3]
    repo = ModelRegistry(root / "registry")
    strategy = load_client(root / "clients" / "ada.yaml").strategies[0]
    assert strategy.timeframes == ["1d"]
    refs = {ref.model_id: ref for ref in strategy.models}
    cards = train_daily_models(tmp_path, now=NOW)
    assert [c.model_id for c in cards] == [s.model_id for s in DAILY_MODELS]
    for card in cards:
        committed = repo.card(card.model_id, card.version)
        assert card.files == committed.files and card.metrics == committed.metrics
        assert card.timeframe == "1d" and card.horizon_bars == 5
        assert card.training_window.end < datetime(2010, 1, 1, tzinfo=timezone.utc)
        max_age = refs[card.model_id].max_age_days
        assert check_card(committed, now=datetime.now(timezone.utc), max_age_days=max_age,
                          feature_names=FEATURE_NAMES, timeframe="1d") == []


def test_onnx_bytes_do_not_depend_on_the_converters_opset_order(monkeypatch):
    """onnxmltools lists the model's opsets in an order that varies from process to process; `to_onnx`
    sorts them, so the bytes (and the registered file hash) are the same either way."""
    import lightgbm as lgb
    import onnxmltools

    root = Path(__file__).resolve().parents[3]
    booster = lgb.Booster(model_file=str(next((root / "registry" / "daily_high").glob("*/model.txt"))))
    convert = onnxmltools.convert_lightgbm

    def reversed_opsets(*args, **kwargs):
        model = convert(*args, **kwargs)
        opsets = list(model.opset_import)[::-1]
        kept = [(o.domain, o.version) for o in opsets]
        del model.opset_import[:]
        for domain, version in kept:
            model.opset_import.add(domain=domain, version=version)
        return model

    as_converted = to_onnx(booster, "daily_high")
    monkeypatch.setattr(onnxmltools, "convert_lightgbm", reversed_opsets)
    assert to_onnx(booster, "daily_high") == as_converted


def test_committed_demo_models_were_validated_on_the_synthetic_series_from_its_epoch():
    """The generator still makes the bars the committed registry/swing_* models learned from: on the
    series' first DEMO_DAYS after the epoch each model scores exactly its card's validation metrics."""
    import lightgbm as lgb

    from signalgen.data.synthetic import EPOCH
    from signalgen.models.catalog import DEMO_TIMEFRAME
    from signalgen.models.train import demo_bars, feature_matrix, fwd_column

    assert DEMO_START == EPOCH
    repo = ModelRegistry(Path(__file__).resolve().parents[3] / "registry")
    cards = [repo.card(s.model_id) for s in DEMO_MODELS]
    frame = training_frame(demo_bars(cards[0].training_window.seed), [c.horizon_bars for c in cards],
                           DEMO_TIMEFRAME)
    for card in cards:
        _, valid = split(frame, card.horizon_bars, card.training_window.valid_start, DEMO_TIMEFRAME)
        booster = lgb.Booster(model_file=str(repo.path(card.model_id, card.version) / "model.txt"))
        y = labels(valid[fwd_column(card.horizon_bars)].to_numpy(), card.direction, card.target_return)
        p = booster.predict(feature_matrix(valid))
        assert len(y) == card.training_window.rows_valid
        assert (auc(y, p), log_loss(y, p), float(y.mean())) == \
            (card.metrics.auc, card.metrics.log_loss, card.metrics.positive_rate), card.model_id
