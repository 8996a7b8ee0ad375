"""Inference backends: ONNX Runtime (default), LightGBM (the reference) and a seeded mock.

All take float32 (n, 15) feature rows in FEATURE_NAMES order and return float64 (n,)
probabilities of the card's event. lightgbm and onnxruntime are imported only by the
backend that needs them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from signalgen.errors import ConfigError
from signalgen.features.spec import FEATURE_NAMES
from signalgen.models.health import check_card
from signalgen.models.registry import LIGHTGBM_FILE, ONNX_FILE, ModelCard, ModelRegistry, sha256

Backend = Literal["onnx", "lightgbm", "mock"]
N_FEATURES = len(FEATURE_NAMES)


class Predictor(Protocol):
    """One loaded model. `predict` is pure: the same rows give the same outputs."""

    card: ModelCard

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, 15) rows -> float64 (n,) probabilities of the event."""
        ...

    def predict_one(self, row: np.ndarray) -> float:
        """One float32 (15,) row -> its probability: `predict(row[None])[0]`, bit for bit, at the
        per-bar path's cost."""
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
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for every kind of bad file
            raise ConfigError(f"ONNX Runtime cannot load the model: {str(exc)[:200]}", file=str(path)) from None
        self._input = _feature_input(self._session, path)
        self._output = _probability_output(self._session, path)
        # predict_one: a row buffer and an output buffer bound once, so a single-row call skips the
        # input dict, name lookups and output allocation of `run` (~6 of ~10 us per call).
        self._row = np.empty((1, N_FEATURES), dtype=np.float32)
        self._probs = np.empty((1, 2), dtype=np.float32)
        self._binding = self._session.io_binding()
        self._binding.bind_input(self._input, "cpu", 0, np.float32, [1, N_FEATURES], self._row.ctypes.data)
        self._binding.bind_output(self._output, "cpu", 0, np.float32, [1, 2], self._probs.ctypes.data)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x)
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        out = np.empty(len(x), dtype=np.float64)
        for i in range(0, len(x), self.CHUNK_ROWS):
            probs = self._session.run([self._output], {self._input: x[i:i + self.CHUNK_ROWS]})[0]
            out[i:i + self.CHUNK_ROWS] = probs[:, 1]  # column 1: P(class 1), the event
        return out

    def predict_one(self, row: np.ndarray) -> float:
        """Not reentrant: the bound buffers are the predictor's own (one worker, one thread)."""
        self._row[0] = row
        self._session.run_with_iobinding(self._binding)
        return float(self._probs[0, 1])


def _feature_input(session, path: str | Path) -> str:
    """The name of the one (n, N_FEATURES) float input; a model of another width would make ORT fail on
    every batch, so it is refused here, at load."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(f"ONNX model has {len(inputs)} inputs; expected one (n, {N_FEATURES}) float input",
                          file=str(path))
    shape = inputs[0].shape
    if inputs[0].type != "tensor(float)" or len(shape) != 2 or shape[1] != N_FEATURES:
        raise ConfigError(f"ONNX model input is {inputs[0].type} {shape}; the feature set needs (n, {N_FEATURES}) "
                          "float rows", file=str(path))
    return inputs[0].name


def _probability_output(session, path: str | Path) -> str:
    for out in session.get_outputs():
        if out.type == "tensor(float)" and len(out.shape) == 2 and out.shape[1] == 2:
            return out.name
    names = [o.name for o in session.get_outputs()][:5]
    raise ConfigError(f"ONNX model has no (n, 2) float probability output among {names}", file=str(path))


class LightGBMPredictor:
    """LightGBM Booster over `model.txt`, single-threaded: the reference the ONNX model is checked against."""

    def __init__(self, card: ModelCard, path: str | Path) -> None:
        import lightgbm as lgb

        self.card = card
        try:
            self._booster = lgb.Booster(model_file=str(path))
        except lgb.basic.LightGBMError as exc:
            raise ConfigError(f"LightGBM cannot load the model: {str(exc)[:200]}", file=str(path)) from None
        if self._booster.num_feature() != N_FEATURES:
            raise ConfigError(f"LightGBM model takes {self._booster.num_feature()} features; the feature set "
                              f"has {N_FEATURES}", file=str(path))

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x)
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        return np.asarray(self._booster.predict(x, num_threads=1), dtype=np.float64)

    def predict_one(self, row: np.ndarray) -> float:
        return float(self.predict(row[None, :])[0])


_MOMENTUM = FEATURE_NAMES.index("ret_15")
_VOLATILITY = FEATURE_NAMES.index("vol_20")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


_SQRT15 = float(np.sqrt(15.0))
_MASK64 = (1 << 64) - 1


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
        self._key_int = int(self._key)

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

    def predict_one(self, row: np.ndarray) -> float:
        """`predict` of one row, bit for bit, in Python scalars: the hash in ints and the arithmetic in
        floats (both exact IEEE / integer operations), only log, exp and tanh through numpy: ~7 µs
        instead of ~94 µs of ~100 one-element ufunc calls (a mock fleet's workers spent most of
        their CPU here)."""
        if row.dtype != np.float32 or row.shape != (N_FEATURES,) or not row.flags.c_contiguous:
            row = _rows(np.asarray(row)[None, :])[0]
        h = self._key_int
        for word in row.view(np.uint32).tolist():  # the row's float32 bit patterns, column by column
            h ^= word  # then `_mix` in Python ints: the same wrapping arithmetic, masked to 64 bits
            h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
            h ^= h >> 31
        u = (float(h >> 11) + 0.5) / 2.0**53
        momentum, volatility = row[_MOMENTUM].item(), row[_VOLATILITY].item()
        spread = volatility * _SQRT15
        momentum = momentum / spread if spread else math.nan  # x/0 is inf or nan in predict: no lean
        lean = float(np.tanh(momentum)) * self.card.direction * self.tilt if math.isfinite(momentum) else 0.0
        return 1.0 / (1.0 + float(np.exp(-(float(np.log(u / (1.0 - u))) + lean))))


def load_predictor(registry: ModelRegistry, model_id: str, backend: Backend, seed: int = 0,
                   version: str | None = None, threads: int = 1) -> Predictor:
    """The predictor of `model_id` (newest version unless given) for `backend`.

    Every file the card lists is checked against its sha256 before loading (the backend's own file
    first): a corrupted, edited or swapped file is a ConfigError naming it, never a silently different
    model. A loaded model must take (n, 15) float rows, so a wrong width fails here, not in every batch.
    The mock backend needs only the card.
    """
    card = registry.card(model_id, version)
    if backend == "mock":
        return MockPredictor(card, seed)
    name = {"onnx": ONNX_FILE, "lightgbm": LIGHTGBM_FILE}.get(backend)
    if name is None:
        raise ConfigError(f"unknown inference backend {backend!r}: onnx, lightgbm or mock", field="backend")
    folder = registry.path(model_id, card.version)
    if name not in card.files:
        raise ConfigError(f"the card of {model_id} {card.version} lists no {name}", file=str(folder / "card.json"))
    for file in (name, *sorted(set(card.files) - {name})):
        path = folder / file
        try:
            digest = sha256(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"model file missing or unreadable for {model_id} {card.version}: "
                              f"{exc.strerror or exc}", file=str(path)) from None
        if digest != card.files[file]:
            raise ConfigError(f"sha256 {digest[:12]} does not match the card of {model_id} {card.version}",
                              file=str(path))
    path = folder / name
    if backend == "onnx":
        return OnnxPredictor(card, path, threads=threads)
    return LightGBMPredictor(card, path)


@dataclass(frozen=True)
class CheckedModel:
    """A model as a worker gets it: its predictor, or None when it cannot be loaded, and its problems.

    A model with problems serves no predictions: its workers reject every bar as `model_unhealthy`.
    """

    model_id: str
    predictor: Predictor | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.predictor is not None and not self.problems


def load_checked(registry: ModelRegistry, model_id: str, backend: Backend, *, now: datetime,
                 max_age_days: int, timeframe: str | None, seed: int = 0, threads: int = 1) -> CheckedModel:
    """`load_predictor` + `check_card`, never raising for a faulty model: the fault becomes a problem.

    The one place both `run` (per worker) and `config validate` (via preflight) judge a model, so both
    report the same words for the same fault.
    """
    try:
        predictor = load_predictor(registry, model_id, backend, seed=seed, threads=threads)
    except ConfigError as exc:
        return CheckedModel(model_id, None, (f"model {model_id}: {exc}",))
    problems = check_card(predictor.card, now=now, max_age_days=max_age_days, feature_names=FEATURE_NAMES,
                          timeframe=timeframe)
    return CheckedModel(model_id, predictor, tuple(problems))
