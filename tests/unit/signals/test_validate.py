import numpy as np

from signalgen.signals.validate import bad_model_rows, duplicate_rows, non_finite_rows, stale, window_complete

M = 60_000_000  # one minute in us


def test_window_complete_needs_lookback_bars_without_gaps():
    t = np.array([1, 2, 3, 4, 6, 7, 8, 9]) * M  # a missing bar before 6
    ok = window_complete(t, lookback=3, max_gap_us=M)
    assert ok.tolist() == [False, False, True, True, False, False, True, True]


def test_window_complete_longer_than_data():
    assert not window_complete(np.arange(1, 4) * M, lookback=5, max_gap_us=M).any()


def test_stale_against_injected_time():
    t = np.array([10, 20]) * M
    assert stale(t, 22 * M, 2 * M).tolist() == [True, False]


def test_non_finite_and_bad_models():
    f = np.array([[1.0, 2.0], [np.nan, 1.0], [np.inf, 0.0]])
    assert non_finite_rows(f).tolist() == [False, True, True]
    p = np.array([[0.5, 0.5], [1.5, 0.5], [0.5, np.nan], [0.2, 0.3]])
    assert bad_model_rows(p, np.array([True, True])).tolist() == [False, True, True, False]
    assert bad_model_rows(p, np.array([True, False])).all()


def test_duplicates_keep_first():
    assert duplicate_rows(np.array([1, 2, 2, 3, 1])).tolist() == [False, False, True, False, True]
