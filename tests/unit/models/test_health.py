from datetime import timedelta

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from signalgen.features.spec import FEATURE_NAMES
from signalgen.models.health import check_card
from signalgen.models.registry import ModelRegistry
from signalgen.signals.validate import bad_outputs

from .helpers import T0, register_fake


def _card(tmp_path, **kw):
    return register_fake(ModelRegistry(tmp_path), **kw)


def test_healthy_card_has_no_problems(tmp_path):
    card = _card(tmp_path)
    assert check_card(card, now=T0 + timedelta(days=30), max_age_days=365, feature_names=FEATURE_NAMES,
                      timeframe="5m") == []


def test_wrong_feature_order(tmp_path):
    card = _card(tmp_path)
    swapped = (FEATURE_NAMES[1], FEATURE_NAMES[0], *FEATURE_NAMES[2:])
    [problem] = check_card(card, now=T0, max_age_days=365, feature_names=swapped)
    assert "order mismatch at position 0" in problem


def test_missing_and_extra_features(tmp_path):
    card = _card(tmp_path, feature_names=(*FEATURE_NAMES[:-1], "mystery"))
    [problem] = check_card(card, now=T0, max_age_days=365, feature_names=FEATURE_NAMES)
    assert "schema mismatch" in problem and FEATURE_NAMES[-1] in problem and "mystery" in problem


def test_too_old_boundary(tmp_path):
    card = _card(tmp_path)
    assert check_card(card, now=T0 + timedelta(days=10), max_age_days=10, feature_names=FEATURE_NAMES) == []
    [problem] = check_card(card, now=T0 + timedelta(days=10, seconds=1), max_age_days=10,
                           feature_names=FEATURE_NAMES)
    assert "older than max_age_days=10" in problem


def test_future_card_and_wrong_timeframe(tmp_path):
    card = _card(tmp_path)
    problems = check_card(card, now=T0 - timedelta(hours=1), max_age_days=10, feature_names=FEATURE_NAMES,
                          timeframe="1h")
    assert len(problems) == 2
    assert "in the future" in problems[0] and "serve 1h" in problems[1]


def test_bad_outputs_flags_nan_inf_and_out_of_range():
    p = np.array([0.0, 0.5, 1.0, np.nan, np.inf, -np.inf, -1e-9, 1.0000001])
    assert bad_outputs(p).tolist() == [False, False, False, True, True, True, True, True]


@given(arrays(np.float64, st.integers(0, 50)))
def test_bad_outputs_is_exactly_not_a_probability(p):
    ok = np.array([np.isfinite(v) and 0.0 <= v <= 1.0 for v in p], dtype=bool)
    assert np.array_equal(bad_outputs(p), ~ok)
