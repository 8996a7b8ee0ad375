"""Train the demo models and register LightGBM text + ONNX: the intraday ones on seeded synthetic
5m bars, the daily ones on the real daily bars bundled with bokeh_sampledata (see `catalog`).

Reproducible: the same seed and window give byte-identical model.txt, hence the same version.
Split by time, never at random: the first 80% of the range trains, the last 20% validates,
and train rows whose label window reaches into validation are purged. Split thresholds are
rounded to float32 so the ONNX export takes exactly LightGBM's branches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

from signalgen.config.models import default_max_gap, timeframe_delta
from signalgen.data.synthetic import synthetic_bars
from signalgen.features.batch import compute_features, feature_matrix
from signalgen.features.spec import FEATURE_NAMES
from signalgen.models.catalog import (
    DAILY_MODELS, DAILY_PARAMS, DAILY_SYMBOLS, DAILY_TIMEFRAME, DAILY_TRAIN_END, DEMO_DAYS, DEMO_MODELS,
    DEMO_START, DEMO_SYMBOLS, DEMO_TIMEFRAME, VALID_FRACTION, ModelSpec, derive_target_return,
)
from signalgen.models.registry import ModelCard, ModelMetrics, ModelRegistry, TrainingWindow

# Small on purpose: ~150 trees of 15 leaves keep each registered model well under 500 KB.
LGB_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 200,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "deterministic": True,
    "force_col_wise": True,  # no timing-based choice between row/col-wise histograms
    "num_threads": 2,
    "verbose": -1,
}
NUM_ROUNDS = 150


def fwd_column(horizon_bars: int) -> str:
    return f"fwd_{horizon_bars}"


def training_frame(bars: pl.DataFrame, horizons: Sequence[int], timeframe: str) -> pl.DataFrame:
    """Features plus forward log returns `fwd_<h>` per symbol; warm-up rows dropped.

    Intraday, the forward close is looked up by time (bar_time + h bars), so a gap in the bars
    gives a null label instead of a return over the wrong span. Daily and longer bars follow the
    exchange calendar (no bars on weekends and holidays, and a session close whose UTC hour moves
    with daylight saving): the forward close is the h-th next bar, null if a gap longer than
    `default_max_gap` lies between. Rows without a full forward window keep a null `fwd_<h>`; each
    model drops its own.
    """
    delta = timeframe_delta(timeframe)
    bars = bars.sort("symbol", "bar_time")
    df = complete_rows(compute_features(bars))
    for h in sorted(set(horizons)):
        if delta >= timedelta(days=1):
            gaps = (pl.col("bar_time").diff() > default_max_gap(timeframe)).fill_null(False).cum_sum()
            ahead = bars.select("symbol", "bar_time", pl.when(gaps.shift(-h) == gaps)
                                .then(pl.col("close").shift(-h)).over("symbol").alias("_ahead"))
        else:
            ahead = bars.select("symbol", (pl.col("bar_time") - h * delta).alias("bar_time"),
                                pl.col("close").alias("_ahead"))
        df = (df.join(ahead, on=["symbol", "bar_time"], how="left", maintain_order="left")
                .with_columns((pl.col("_ahead") / pl.col("close")).log().alias(fwd_column(h)))
                .drop("_ahead"))
    return df


def complete_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Rows whose every feature is defined: drops the warm-up (NaN) rows."""
    defined = [pl.col(n).is_not_null() & pl.col(n).is_not_nan() for n in FEATURE_NAMES]
    return df.filter(pl.all_horizontal(defined))


def valid_start(frame: pl.DataFrame, timeframe: str, fraction: float = VALID_FRACTION) -> datetime:
    """First bar time of the validation part: the last `fraction` of the time range, on a bar boundary."""
    t0, t1 = frame["bar_time"].min(), frame["bar_time"].max()
    delta = timeframe_delta(timeframe)
    bars = int((t1 - t0) / delta)
    return t0 + delta * round(bars * (1.0 - fraction))


def split(frame: pl.DataFrame, horizon_bars: int, start_valid: datetime,
          timeframe: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, valid) rows with a label for `horizon_bars`.

    Train rows end `horizon_bars` (times the longest normal gap, for daily bars' holidays) before
    validation starts, so no train label uses a validation-period close.
    """
    labelled = frame.filter(pl.col(fwd_column(horizon_bars)).is_not_null())
    purge = default_max_gap(timeframe) * horizon_bars  # intraday: h bars; daily: h bars with holidays
    train = labelled.filter(pl.col("bar_time") + purge < start_valid)
    valid = labelled.filter(pl.col("bar_time") >= start_valid)
    return train, valid


def labels(fwd: np.ndarray, direction: int, target_return: float) -> np.ndarray:
    """1 where the forward return passes +x (direction +1) or -x (direction -1), else 0."""
    fwd = np.asarray(fwd, dtype=np.float64)
    hit = fwd > target_return if direction > 0 else fwd < -target_return
    return hit.astype(np.int8)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum identity (ties count half); NaN with a single class."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(p, dtype=np.float64), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average rank of each tie group
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-15) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass(frozen=True)
class TrainedModel:
    """One trained model, before registration."""

    spec: ModelSpec
    target_return: float
    model_txt: bytes
    model_onnx: bytes
    metrics: ModelMetrics
    rows_train: int
    rows_valid: int


def train_model(spec: ModelSpec, frame: pl.DataFrame, start_valid: datetime, timeframe: str,
                seed: int, params: dict | None = None) -> TrainedModel:
    """Fit one LightGBM model on `frame` (from `training_frame`) and export it to ONNX.

    `params` override LGB_PARAMS.
    """
    import lightgbm as lgb

    train, valid = split(frame, spec.horizon_bars, start_valid, timeframe)
    fwd = fwd_column(spec.horizon_bars)
    x_target = (spec.target_return if spec.target_return is not None
                else derive_target_return(train[fwd].to_numpy()))
    x_train, x_valid = feature_matrix(train), feature_matrix(valid)
    y_train = labels(train[fwd].to_numpy(), spec.direction, x_target)
    y_valid = labels(valid[fwd].to_numpy(), spec.direction, x_target)
    for part, y in (("train", y_train), ("validation", y_valid)):
        if len(y) == 0 or y.min() == y.max():
            raise ValueError(f"{spec.model_id}: {part} rows ({len(y)}) do not hold both classes; "
                             "train on a longer window")
    fitted = lgb.train({**LGB_PARAMS, **(params or {}), "seed": seed},
                       lgb.Dataset(x_train, y_train, feature_name=list(FEATURE_NAMES)),
                       num_boost_round=NUM_ROUNDS)
    model_txt = float32_thresholds(fitted.model_to_string())
    booster = lgb.Booster(model_str=model_txt)
    p_valid = booster.predict(x_valid)
    metrics = ModelMetrics(auc=auc(y_valid, p_valid), log_loss=log_loss(y_valid, p_valid),
                           positive_rate=float(y_valid.mean()),
                           auc_train=auc(y_train, booster.predict(x_train)))
    return TrainedModel(spec=spec, target_return=x_target,
                        model_txt=model_txt.encode(),
                        model_onnx=to_onnx(booster, spec.model_id), metrics=metrics,
                        rows_train=len(train), rows_valid=len(valid))


def float32_thresholds(model_txt: str) -> str:
    """The same LightGBM model with every numerical split threshold rounded down to a float32.

    ONNX tree ensembles store thresholds as float32. A double threshold t that rounds *up* to
    t32 sends a row whose value is exactly t32 left in ONNX but right in LightGBM: a different
    leaf, a jump of ~1e-3 in probability. With t replaced by the largest float32 <= t, LightGBM's
    decision is unchanged for every float32 input (no float32 lies in (t', t]) and ONNX stores t'
    exactly, so both backends take the same branches. The header's `tree_sizes` (byte length
    of each tree block, which LightGBM's loader relies on) is recomputed.
    """
    out, thresholds = [], None
    for line in model_txt.split("\n"):
        if line.startswith("threshold="):
            thresholds = len(out)  # rewritten once the decision types (next lines) are known
        elif line.startswith("decision_type=") and thresholds is not None:
            values = out[thresholds][len("threshold="):].split(" ")
            categorical = [int(d) & 1 for d in line[len("decision_type="):].split(" ")]
            out[thresholds] = "threshold=" + " ".join(
                v if cat else repr(_float32_at_most(float(v))) for v, cat in zip(values, categorical))
            thresholds = None
        out.append(line)
    text = "\n".join(out)
    bounds = [m.start() for m in re.finditer(r"^Tree=", text, re.M)] + [text.index("\nend of trees") + 1]
    sizes = " ".join(str(b - a) for a, b in zip(bounds, bounds[1:]))
    return re.sub(r"^tree_sizes=.*$", f"tree_sizes={sizes}", text, count=1, flags=re.M)


def _float32_at_most(t: float) -> float:
    """The largest float32 <= t, as a float."""
    with np.errstate(over="ignore"):
        f = np.float32(t)
    if float(f) > t:  # compare as doubles: numpy would cast t to float32 first
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def to_onnx(booster, name: str) -> bytes:
    """ONNX bytes of a binary LightGBM booster: input `input` float32 (N, 15), output `probabilities` (N, 2).

    The converter names the graph with a random uuid, declares `label` as shape [1] and lists its
    opsets in no fixed order; all three are fixed so the same booster always gives the same bytes
    and ORT does not warn.
    """
    import onnx
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    inputs = [("input", FloatTensorType([None, len(FEATURE_NAMES)]))]
    model = onnxmltools.convert_lightgbm(booster, name=name, initial_types=inputs, zipmap=False)
    model.graph.name = name
    for out in model.graph.output:
        for dim in out.type.tensor_type.shape.dim[:1]:
            dim.Clear()
            dim.dim_param = "N"
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets)
    return model.SerializeToString()


def demo_bars(seed: int, days: int = DEMO_DAYS, symbols: Sequence[str] = DEMO_SYMBOLS,
              start: datetime = DEMO_START, timeframe: str = DEMO_TIMEFRAME) -> pl.DataFrame:
    """The synthetic bars the demo models train on."""
    return synthetic_bars(list(symbols), timeframe, start, start + timedelta(days=days), seed)


def train_demo_models(registry_dir: Path, seed: int = 7, *, days: int = DEMO_DAYS,
                      symbols: Sequence[str] = DEMO_SYMBOLS, specs: Sequence[ModelSpec] = DEMO_MODELS,
                      timeframe: str = DEMO_TIMEFRAME, now: datetime | None = None) -> list[ModelCard]:
    """Train the demo models on `days` of seeded synthetic bars (5m unless told) and register them.

    Args:
        registry_dir: registry folder (created if missing).
        seed: seeds both the synthetic bars and LightGBM.
        days: length of the synthetic history per symbol.
        symbols: symbols whose bars are pooled into one training set.
        specs: the models to train.
        timeframe: bar timeframe of the training data; a model serves only this timeframe.
        now: created_at of new cards (defaults to the current UTC time).

    Returns:
        The registered cards, in `specs` order. A version already in the registry keeps its card.
    """
    bars = demo_bars(seed, days, symbols, DEMO_START, timeframe)
    return train_and_register(registry_dir, bars, tuple(symbols), specs, timeframe, seed, now=now)


def daily_bars(symbols: Sequence[str] = DAILY_SYMBOLS, end: datetime = DAILY_TRAIN_END) -> pl.DataFrame:
    """The real daily bars the daily demo models train on: the sample's bars before `end`, validated."""
    from signalgen.data.sample import sample_bars
    from signalgen.data.validation import validate_bars

    bars = sample_bars().filter(pl.col("symbol").is_in(list(symbols)) & (pl.col("bar_time") < end))
    return pl.concat([validate_bars(group, DAILY_TIMEFRAME).bars
                      for _, group in bars.group_by("symbol", maintain_order=True)])


def train_daily_models(registry_dir: Path, seed: int = 7, *, specs: Sequence[ModelSpec] = DAILY_MODELS,
                       now: datetime | None = None) -> list[ModelCard]:
    """Train the daily demo models on the sample's real daily bars before DAILY_TRAIN_END and
    register them (reproducible: same seed, same versions). Arguments as `train_demo_models`."""
    return train_and_register(registry_dir, daily_bars(), DAILY_SYMBOLS, specs, DAILY_TIMEFRAME, seed,
                              now=now, params=DAILY_PARAMS)


def train_and_register(registry_dir: Path, bars: pl.DataFrame, symbols: tuple[str, ...],
                       specs: Sequence[ModelSpec], timeframe: str, seed: int, *, now: datetime | None = None,
                       params: dict | None = None) -> list[ModelCard]:
    """Train `specs` on `bars` (validation: the last VALID_FRACTION of their time range) and register
    them; returns the cards in `specs` order. A version already in the registry keeps its card."""
    frame = training_frame(bars, [s.horizon_bars for s in specs], timeframe)
    start_valid = valid_start(frame, timeframe)
    registry = ModelRegistry(registry_dir)
    created_at = now or datetime.now(timezone.utc)
    cards = []
    for spec in specs:
        m = train_model(spec, frame, start_valid, timeframe, seed, params)
        window = TrainingWindow(start=frame["bar_time"].min(), end=frame["bar_time"].max(),
                                valid_start=start_valid, symbols=symbols, rows_train=m.rows_train,
                                rows_valid=m.rows_valid, seed=seed)
        cards.append(registry.register(
            model_id=spec.model_id, description=spec.description, direction=spec.direction,
            horizon_bars=spec.horizon_bars, target_return=m.target_return, feature_names=FEATURE_NAMES,
            timeframe=timeframe, training_window=window, metrics=m.metrics, model_txt=m.model_txt,
            model_onnx=m.model_onnx, created_at=created_at))
    return cards
