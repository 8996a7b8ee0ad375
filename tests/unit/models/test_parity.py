from datetime import timedelta

import numpy as np

from signalgen.config.models import (
    ClientConfig, DuckDBStorageConfig, EnvironmentConfig, LocalMessagingConfig, ModePreset, ModelRefConfig,
    PathsConfig, RunConfig, StrategyConfig,
)
from signalgen.data.synthetic import synthetic_bars
from signalgen.features.batch import compute_features, feature_matrix
from signalgen.features.spec import WARMUP_BARS
from signalgen.models.backends import load_predictor
from signalgen.models.parity import parity_report
from signalgen.models.registry import ModelRegistry

from .conftest import NOW

BARS = 400


def _cfg(root, thresholds):
    def strategy(sid, symbols, models, enabled=True):
        refs = [ModelRefConfig(model_id=m, confidence_threshold=thresholds[m]) for m in models]
        return StrategyConfig(id=sid, symbols=symbols, timeframes=["5m"], enabled=enabled, models=refs)

    clients = [
        ClientConfig(id="alpha", routing="internal", strategies=[
            strategy("both_ways", ["BTCUSD", "ETHUSD"], ["swing_high", "swing_low"]),
            strategy("paused", ["BTCUSD"], ["swing_high_short"], enabled=False)]),
        ClientConfig(id="beta", routing="internal", strategies=[strategy("up", ["SOLUSD"], ["swing_high"])]),
    ]
    env = EnvironmentConfig(name="local-dev", storage=DuckDBStorageConfig(type="duckdb", path="x.duckdb"),
                            messaging=LocalMessagingConfig(type="local", path="var/stream"),
                            paths=PathsConfig(registry_dir="models/reg"))
    return RunConfig(environment=env, mode=ModePreset(name="historical"), clients=clients,
                     data_source="synthetic", inference="local", start=NOW, end=NOW, seed=1, root=str(root))


def _predictions(registry, model_id, symbols, seed):
    bars = synthetic_bars(symbols, "5m", NOW, NOW + timedelta(minutes=5 * BARS), seed)
    df = compute_features(bars.sort("symbol", "bar_time")).drop_nans()
    x = feature_matrix(df)
    return (df["symbol"].to_numpy(), load_predictor(registry, model_id, "onnx").predict(x),
            load_predictor(registry, model_id, "lightgbm").predict(x))


def test_parity_rows_per_model_client_strategy(trained, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "reg").symlink_to(trained.registry_dir)
    registry = ModelRegistry(trained.registry_dir)
    # Put one threshold exactly between the two backends' outputs on a row, so it must flip.
    symbols, p_onnx, p_lgb = _predictions(registry, "swing_high", ["BTCUSD", "ETHUSD", "SOLUSD"], seed=5)
    i = int(np.argmax(np.abs(p_onnx - p_lgb)))
    assert p_onnx[i] != p_lgb[i]
    t_high = max(p_onnx[i], p_lgb[i])
    report = parity_report(_cfg(tmp_path, {"swing_high": t_high, "swing_low": 0.6, "swing_high_short": 0.6}),
                           bars_per_symbol=BARS, seed=5)

    rows = {(r.model_id, r.client_id, r.strategy_id): r for r in report.rows}
    assert sorted(rows) == [("swing_high", "alpha", "both_ways"), ("swing_high", "beta", "up"),
                            ("swing_low", "alpha", "both_ways")]  # disabled strategy left out
    high = rows["swing_high", "alpha", "both_ways"]
    assert high.version == trained.cards["swing_high"].version
    assert high.rows == 3 * (BARS - WARMUP_BARS + 1)  # every symbol the model serves, after warm-up
    assert high.max_abs_diff == np.abs(p_onnx - p_lgb).max() < 1e-4
    assert high.mean_abs_diff == np.abs(p_onnx - p_lgb).mean()
    assert high.threshold == t_high
    for key, strategy_symbols in ((("swing_high", "alpha", "both_ways"), ["BTCUSD", "ETHUSD"]),
                                  (("swing_high", "beta", "up"), ["SOLUSD"])):
        mine = np.isin(symbols, strategy_symbols)
        expected = int(((p_onnx[mine] >= t_high) != (p_lgb[mine] >= t_high)).sum())
        assert rows[key].flips == expected
    assert rows["swing_high", "alpha", "both_ways"].flips + rows["swing_high", "beta", "up"].flips >= 1
    low = rows["swing_low", "alpha", "both_ways"]
    assert low.rows == 2 * (BARS - WARMUP_BARS + 1) and low.threshold == 0.6 and low.max_abs_diff < 1e-4
