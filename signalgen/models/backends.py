"""Inference backends: ONNX Runtime (default), LightGBM (the reference) and a seeded mock.

All take float32 (n, 15) feature rows in FEATURE_NAMES order and return float64 (n,)
probabilities of the card's event. lightgbm and onnxruntime are imported only by the
backend that needs them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from signalgen.errors import ConfigError
from signalgen.features.spec import FEATURE_NAMES
from signalgen.models.registry import LIGHTGBM_FILE, ONNX_FILE, ModelCard, ModelRegistry, sha256

Backend = Literal["onnx", "lightgbm", "mock"]
N_FEATURES = len(FEATURE_NAMES)


class Predictor(Protocol):
    """One loaded model. `predict` is pure: the same rows give the same outputs."""

    card: ModelCard

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, 15) rows -> float64 (n,) probabilities of the event."""
        ...


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != N_FEATURES:
        raise ValueError(f"expected feature rows of shape (n, {N_FEATURES}), got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


class OnnxPredictor:
    """ONNX Runtime session over `model.onnx`: one `run` per batch of up to CHUNK_ROWS rows.

    With threads=1 each row's output is bit-identical however rows are batched. With more
    threads ORT may sum trees in another order, which moves outputs by ~1e-8 (float32 rounding).
    """

    # Large batches run in chunks: ORT's intermediate buffers stay cache- and memory-friendly,
    # and outputs do not depend on the chunking (each row is evaluated on its own).
    CHUNK_ROWS = 65_536

    def __init__(self, card: ModelCard, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.card = card
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = _probability_output(self._session)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x)
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        out = np.empty(len(x), dtype=np.float64)
        for i in range(0, len(x), self.CHUNK_ROWS):
            probs = self._session.run([self._output], {self._input: x[i:i + self.CHUNK_ROWS]})[0]
            out[i:i + self.CHUNK_ROWS] = probs[:, 1]  # column 1: P(class 1), the event
        return out


def _probability_output(session) -> str:
    for out in session.get_outputs():
        if out.type == "tensor(float)" and len(out.shape) == 2 and out.shape[1] == 2:
            return out.name
    names = [o.name for o in session.get_outputs()]
    raise ConfigError(f"ONNX model has no (n, 2) float probability output among {names}")


class LightGBMPredictor:
    """LightGBM Booster over `model.txt`, single-threaded: the reference the ONNX model is checked against."""

    def __init__(self, card: ModelCard, path: str | Path) -> None:
        import lightgbm as lgb

        self.card = card
        self._booster = lgb.Booster(model_file=str(path))

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x)
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        return np.asarray(self._booster.predict(x, num_threads=1), dtype=np.float64)


_MOMENTUM = FEATURE_NAMES.index("ret_15")
_VOLATILITY = FEATURE_NAMES.index("vol_20")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: every input bit flips about half the output bits."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


class MockPredictor:
    """Seeded stand-in for a model: output depends only on (seed, model_id, the row's values).

    Each row's bytes are hashed to a uniform u in (0, 1); u is then tilted toward the card's
    direction by the 15-bar momentum (in units of its expected spread), so mock runs produce
    signals at 0.6-ish thresholds mostly on the "right" side. Chunking and call order do not
    change any output.
    """

    def __init__(self, card: ModelCard, seed: int = 0, tilt: float = 1.0) -> None:
        self.card = card
        self.tilt = tilt
        digest = hashlib.sha256(f"{seed}:{card.model_id}".encode()).digest()
        self._key = np.uint64(int.from_bytes(digest[:8], "little"))

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x)
        with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
            h = np.full(len(x), self._key, dtype=np.uint64)
            for column in x.view(np.uint32).T:
                h = _mix(h ^ column.astype(np.uint64))
        u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53  # open interval (0, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            momentum = x[:, _MOMENTUM].astype(np.float64) / (x[:, _VOLATILITY] * np.sqrt(15.0))
        lean = np.where(np.isfinite(momentum), np.tanh(momentum), 0.0) * self.card.direction * self.tilt
        return 1.0 / (1.0 + np.exp(-(np.log(u / (1.0 - u)) + lean)))


def load_predictor(registry: ModelRegistry, model_id: str, backend: Backend, seed: int = 0,
                   version: str | None = None, threads: int = 1) -> Predictor:
    """The predictor of `model_id` (newest version unless given) for `backend`.

    Model files are checked against the card's sha256 before loading: a corrupted or
    swapped file is a ConfigError naming it, never a silently different model.
    """
    card = registry.card(model_id, version)
    if backend == "mock":
        return MockPredictor(card, seed)
    name = {"onnx": ONNX_FILE, "lightgbm": LIGHTGBM_FILE}.get(backend)
    if name is None:
        raise ConfigError(f"unknown inference backend {backend!r}: onnx, lightgbm or mock", field="backend")
    path = registry.path(model_id, card.version) / name
    try:
        digest = sha256(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"model file missing for {model_id} {card.version}: {exc}", file=str(path)) from exc
    if digest != card.files.get(name):
        raise ConfigError(f"sha256 {digest[:12]} does not match the card of {model_id} {card.version}",
                          file=str(path))
    if backend == "onnx":
        return OnnxPredictor(card, path, threads=threads)
    return LightGBMPredictor(card, path)
