import numpy as np
import pytest

from signalgen.models.catalog import DEMO_MODELS, ModelSpec, derive_target_return, spec


def test_demo_models():
    assert [(s.model_id, s.direction, s.horizon_bars) for s in DEMO_MODELS] == [
        ("swing_high", 1, 12), ("swing_low", -1, 12), ("swing_high_short", 1, 4), ("swing_low_short", -1, 4)]
    assert spec("swing_low").direction == -1
    with pytest.raises(KeyError):
        spec("unknown")


def test_spec_rejects_bad_direction():
    with pytest.raises(ValueError, match="direction"):
        ModelSpec("m", 0, 12, None, "")


def test_derived_target_gives_the_wanted_rate_each_side():
    r = np.random.default_rng(1).standard_t(4, size=200_000) * 0.004
    x = derive_target_return(r)
    assert x == float(f"{x:.2g}")  # rounded to 2 significant digits
    assert 0.25 < (r > x).mean() < 0.30 and 0.25 < (r < -x).mean() < 0.30


def test_derived_target_needs_nonzero_returns():
    with pytest.raises(ValueError):
        derive_target_return(np.zeros(10))
    with pytest.raises(ValueError):
        derive_target_return(np.array([np.nan]))
