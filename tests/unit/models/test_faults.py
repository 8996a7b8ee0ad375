"""The catalogue of registry faults: for each, `run` completes with only the faulty model's workers
rejecting bars as model_unhealthy, and `config validate` reports the same fault and exits 2.

The faulty model is swing_high_short: only christian.consensus_v1 (ETHUSD, XRPUSD) uses it, so seven
of the nine workers of the 5m demo clients must run untouched. The daily demo client (ada) is left out:
its 1d bars do not cover this test's 12-hour range, so it would only add "no bars" warnings. Before these fixes an ONNX model of another width
crashed the run with an ONNX Runtime traceback, and `config validate` approved 14 of these faults.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import onnx
import pytest

from signalgen.cli import main
from signalgen.config.loader import Overrides, load_config
from signalgen.errors import ConfigError
from signalgen.models.registry import sha256
from signalgen.modes import run_mode

from tests.roots import copy_config

from .helpers import fresh_registry

REPO = Path(__file__).resolve().parents[3]
MODEL = "swing_high_short"
FAULTY = ("christian", "consensus_v1")  # the only strategy using MODEL
START = datetime(2025, 1, 1, tzinfo=timezone.utc)
CLIENTS = ("christian", "ikenna", "odum")  # the 5m demo clients


def _card(folder: Path, **changes) -> None:
    card = json.loads((folder / "card.json").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = card
        for p in parents:
            target = target[p]
        target[leaf] = value
    (folder / "card.json").write_text(json.dumps(card))  # allow_nan: NaN metrics are written as NaN


def _swap_onnx(folder: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Replace model.onnx by an edited model and record its sha256 in the card: a consistent but wrong model."""
    model = onnx.load(folder / "model.onnx")
    edit(model)
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    files = json.loads((folder / "card.json").read_text())["files"]
    _card(folder, files={**files, "model.onnx": sha256(data)})


def _width(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 14


def _no_probabilities(model: onnx.ModelProto) -> None:
    keep = [o for o in model.graph.output if o.type.tensor_type.elem_type != onnx.TensorProto.FLOAT]
    del model.graph.output[:]
    model.graph.output.extend(keep)


def _garbage_onnx(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"not an onnx model")
    files = json.loads((folder / "card.json").read_text())["files"]
    _card(folder, files={**files, "model.onnx": sha256(b"not an onnx model")})


def _swap_features(folder: Path) -> None:
    names = json.loads((folder / "card.json").read_text())["feature_names"]
    names[0], names[1] = names[1], names[0]
    _card(folder, feature_names=names)


def _rename_feature(folder: Path) -> None:
    names = json.loads((folder / "card.json").read_text())["feature_names"]
    _card(folder, feature_names=[*names[:-1], "ret_9999"])


def _append(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes() + b"\n")


_now = datetime.now(timezone.utc)
# fault -> edit of the model's version folder. Faults listed in REFUSED stop the config at load.
FAULTS: dict[str, Callable[[Path], None]] = {
    "missing_card": lambda f: (f / "card.json").unlink(),
    "unparsable_card": lambda f: (f / "card.json").write_text("{not json"),
    "card_schema_error": lambda f: _card(f, horizon_bars=0),
    "version_dir_mismatch": lambda f: f.rename(f.with_name("000000000000")),
    "missing_onnx": lambda f: (f / "model.onnx").unlink(),
    "missing_txt": lambda f: (f / "model.txt").unlink(),
    "onnx_sha_mismatch": _append("model.onnx"),
    "txt_edited_under_onnx": _append("model.txt"),
    "onnx_width_mismatch": lambda f: _swap_onnx(f, _width),
    "onnx_no_probability_output": lambda f: _swap_onnx(f, _no_probabilities),
    "onnx_unloadable": _garbage_onnx,
    "feature_name_mismatch": _rename_feature,
    "feature_order_mismatch": _swap_features,
    "timeframe_mismatch": lambda f: _card(f, timeframe="1h"),
    "older_than_max_age": lambda f: _card(f, created_at=(_now - timedelta(days=400)).isoformat()),
    "created_in_the_future": lambda f: _card(f, created_at=(_now + timedelta(days=2)).isoformat()),
    "auc_below_chance": lambda f: _card(f, metrics__auc=0.4),
    "non_finite_metrics": lambda f: _card(f, metrics__log_loss=float("nan")),
}
REFUSED = {"missing_card"}  # no card: the model id is unknown, load_config refuses (exit 2)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return fresh_registry(tmp_path_factory.mktemp("fresh") / "registry")


@pytest.fixture
def root(tmp_path: Path, registry: Path) -> Path:
    copy_config(tmp_path, CLIENTS)
    shutil.copytree(registry, tmp_path / "registry")
    return tmp_path


def _validate(root: Path, capsys) -> tuple[int, dict]:
    """`config validate --output json` in this process: (exit code, parsed output)."""
    capsys.readouterr()
    try:
        code = main(["config", "validate", "--root", str(root), "--mode", "mock", "--output", "json"])
    except SystemExit as done:  # typer exits; main() returns the code of our own errors
        code = done.code
    return code, json.loads(capsys.readouterr().out)


def test_the_healthy_registry_validates_and_runs_clean(root: Path, capsys) -> None:
    code, out = _validate(root, capsys)
    assert (code, out["ok"], out["problems"]) == (0, True, [])


@pytest.mark.parametrize("fault", FAULTS)
def test_registry_fault_degrades_only_its_workers_and_validate_reports_it(root: Path, fault: str, capsys) -> None:
    [folder] = (root / "registry" / MODEL).iterdir()
    FAULTS[fault](folder)

    code, out = _validate(root, capsys)
    assert code == 2 and out["ok"] is False
    mine = [p for p in out["problems"] if MODEL in p]
    assert len(mine) == 1, out["problems"]
    assert mine == out["problems"]  # the other models are fine

    overrides = Overrides(start=START, end=START + timedelta(hours=12))
    if fault in REFUSED:
        with pytest.raises(ConfigError, match=MODEL):
            load_config("local-dev", "mock", root=root, overrides=overrides)
        return
    report = run_mode(load_config("local-dev", "mock", root=root, overrides=overrides))
    assert report.problems == mine  # the same words, once, although two workers met the fault
    assert set(report.stats) == {("christian", "consensus_v1"), ("christian", "reversal_v1"),
                                 ("ikenna", "swing_high_v1"), ("ikenna", "swing_low_v1"), ("odum", "momentum_v1")}
    for key, stats in report.stats.items():
        assert stats.bars > 0, key
        unhealthy = stats.rejections.get("model_unhealthy", 0)
        if key == FAULTY:
            assert (unhealthy, stats.signals) == (stats.bars, 0)
        else:
            assert unhealthy == 0, key
    assert sum(s.signals for s in report.stats.values()) > 0
