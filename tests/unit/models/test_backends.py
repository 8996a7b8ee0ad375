import shutil

import numpy as np
import pytest

from signalgen.errors import ConfigError
from signalgen.features.batch import feature_matrix
from signalgen.models.backends import LightGBMPredictor, MockPredictor, OnnxPredictor, load_predictor
from signalgen.models.registry import ModelRegistry
from signalgen.models.train import auc, labels, split


@pytest.fixture(scope="module")
def registry(trained):
    return ModelRegistry(trained.registry_dir)


def _valid(trained, card):
    _, valid = split(trained.frame, card.horizon_bars, trained.valid_start, card.timeframe)
    return valid


@pytest.mark.parametrize("model_id", ["swing_high", "swing_low", "swing_high_short", "swing_low_short"])
def test_onnx_matches_lightgbm_on_validation_rows(trained, registry, model_id):
    card = trained.cards[model_id]
    valid = _valid(trained, card)
    x = feature_matrix(valid)
    p_onnx = load_predictor(registry, model_id, "onnx").predict(x)
    p_lgb = load_predictor(registry, model_id, "lightgbm").predict(x)
    assert p_onnx.dtype == p_lgb.dtype == np.float64 and p_onnx.shape == p_lgb.shape == (len(x),)
    assert np.abs(p_onnx - p_lgb).max() < 1e-4
    # the loaded LightGBM model is the one the card's metrics describe
    y = labels(valid[f"fwd_{card.horizon_bars}"].to_numpy(), card.direction, card.target_return)
    assert auc(y, p_lgb) == pytest.approx(card.metrics.auc, abs=1e-12)


def test_single_threaded_onnx_does_not_depend_on_batching(trained, registry, monkeypatch):
    x = feature_matrix(trained.frame)[:5000]
    one = load_predictor(registry, "swing_high", "onnx")
    full = one.predict(x)
    assert np.array_equal(full[1234:1240], one.predict(x[1234:1240]))
    assert np.array_equal(full[77:78], one.predict(x[77:78]))
    monkeypatch.setattr(OnnxPredictor, "CHUNK_ROWS", 999)  # several chunks, last one partial
    assert np.array_equal(full, one.predict(x))
    # more threads sum the trees in another order: float32 rounding, not a different model
    two = load_predictor(registry, "swing_high", "onnx", threads=2).predict(x)
    assert np.abs(full - two).max() < 1e-6


@pytest.mark.parametrize("backend", ["onnx", "lightgbm"])
def test_shapes(registry, backend):
    p = load_predictor(registry, "swing_low", backend)
    assert p.card.model_id == "swing_low"
    assert p.predict(np.empty((0, 15), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match=r"\(n, 15\)"):
        p.predict(np.zeros((3, 14), np.float32))
    # float64 rows are accepted and treated as float32
    x = np.random.default_rng(0).normal(0, 0.01, (10, 15))
    assert np.array_equal(p.predict(x), p.predict(x.astype(np.float32)))


def test_nan_features_still_give_probabilities(registry):
    # LightGBM routes missing values down a learned branch; ONNX must do the same
    x = np.random.default_rng(1).normal(0, 0.01, (200, 15)).astype(np.float32)
    x[::3, 4] = np.nan
    p_onnx = load_predictor(registry, "swing_high", "onnx").predict(x)
    p_lgb = load_predictor(registry, "swing_high", "lightgbm").predict(x)
    assert np.isfinite(p_onnx).all() and np.abs(p_onnx - p_lgb).max() < 1e-4


def test_tampered_model_file_is_config_error(trained, tmp_path):
    shutil.copytree(trained.registry_dir, tmp_path / "reg")
    reg = ModelRegistry(tmp_path / "reg")
    card = reg.card("swing_high")
    onnx_file = reg.path("swing_high", card.version) / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(ConfigError) as exc:
        load_predictor(reg, "swing_high", "onnx")
    assert exc.value.file == str(onnx_file) and "sha256" in str(exc.value)
    (reg.path("swing_high", card.version) / "model.txt").unlink()
    with pytest.raises(ConfigError, match="missing"):
        load_predictor(reg, "swing_high", "lightgbm")
    assert isinstance(load_predictor(reg, "swing_high", "mock"), MockPredictor)  # needs only the card


def test_unknown_backend_and_model(registry):
    with pytest.raises(ConfigError, match="backend"):
        load_predictor(registry, "swing_high", "tensorflow")
    with pytest.raises(ConfigError, match="swing_sideways"):
        load_predictor(registry, "swing_sideways", "onnx")


def test_direct_construction(trained, registry):
    card = trained.cards["swing_high"]
    folder = registry.path("swing_high", card.version)
    x = feature_matrix(trained.frame)[:100]
    a = OnnxPredictor(card, folder / "model.onnx").predict(x)
    b = LightGBMPredictor(card, folder / "model.txt").predict(x)
    assert np.abs(a - b).max() < 1e-4
