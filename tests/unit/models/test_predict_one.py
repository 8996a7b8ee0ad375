"""`predict_one` (the per-bar call) gives the bits of `predict` on the same row, for every backend."""

import numpy as np
import pytest

from signalgen.features.batch import feature_matrix
from signalgen.models.backends import load_predictor
from signalgen.models.registry import ModelRegistry


@pytest.mark.parametrize("backend", ["onnx", "lightgbm", "mock"])
def test_predict_one_equals_predict(trained, backend):
    x = feature_matrix(trained.frame)[:400]
    x[5, 3] = np.nan  # a NaN feature still gives a probability, the same one
    p = load_predictor(ModelRegistry(trained.registry_dir), "swing_high", backend)
    batch = p.predict(x)
    # interleaved with batch calls: the bound buffers carry nothing from one call to the next
    one = np.array([p.predict_one(x[i]) for i in range(len(x))])
    p.predict(x[:7])
    again = np.array([p.predict_one(np.ascontiguousarray(x[i])) for i in range(len(x) - 1, -1, -1)])[::-1]
    assert one.dtype == batch.dtype == np.float64
    assert one.tobytes() == batch.tobytes() == again.tobytes()
