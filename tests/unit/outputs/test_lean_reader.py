"""The LEAN algorithm's CSV reader on files the QuantConnect output really wrote.

LEAN itself (a .NET runtime) cannot run here, so `AlgorithmImports` is a minimal stand-in with
the few names the module touches; the parsing and the mode rule under test are the algorithm's own.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from signalgen.outputs.quantconnect import QuantConnectCsvOutput
from tests.unit.outputs.factories import signal_frame

ALGORITHM = Path(__file__).resolve().parents[3] / "deploy/quantconnect/signal_algorithm.py"


class _Data(dict):
    """PythonData stand-in: attributes plus LEAN's string-keyed dynamic members."""


def _source(key, medium, fmt):
    return key


@pytest.fixture
def algorithm(monkeypatch):
    lean = types.ModuleType("AlgorithmImports")
    names = ("InsightDirection", "SubscriptionDataConfig", "BaseData", "Slice", "Insight",
             "Resolution", "TimeZones", "FileFormat", "SubscriptionTransportMedium", "Globals")
    for name in names:
        setattr(lean, name, types.SimpleNamespace(UP=1, FLAT=0, DOWN=-1, data_folder="/data", CSV="csv",
                                                  LOCAL_FILE="file", OBJECT_STORE="store"))
    lean.PythonData, lean.QCAlgorithm, lean.SubscriptionDataSource = _Data, object, _source
    monkeypatch.setitem(sys.modules, "AlgorithmImports", lean)
    spec = importlib.util.spec_from_file_location("signal_algorithm", ALGORITHM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(tmp_path, mode: str) -> tuple[Path, list[str]]:
    out = QuantConnectCsvOutput(tmp_path, "ikenna", mode)
    out.open()
    out.write(signal_frame(8, mode=mode))
    out.close()
    path = out.path_for("swing_high_v1", "20240102")
    return path, path.read_text().splitlines(keepends=True)


def test_reader_takes_its_mode_and_skips_every_other(algorithm, tmp_path):
    signal = algorithm.SignalgenSignal
    config = types.SimpleNamespace(symbol=types.SimpleNamespace(value="AAPL"))
    path, hist = _lines(tmp_path, "historical")
    _, mock = _lines(tmp_path, "mock")
    legacy = ",".join(hist[1].split(",")[:8]) + "\n"  # a row from before the mode column
    read = [signal().reader(config, line, None, False) for line in [*hist, *mock[1:], legacy]]
    got = [r for r in read if r is not None]
    want = signal_frame(8).filter(pl.col("symbol") == "AAPL")
    assert [r["signal_id"] for r in got] == want["signal_id"].to_list()
    assert {r["mode"] for r in got} == {"historical"}
    assert [r["direction"] for r in got] == want["direction"].to_list()
    signal.MODE = "mock"
    assert [r["signal_id"] for r in (signal().reader(config, line, None, False) for line in [*hist, *mock])
            if r is not None] == want["signal_id"].to_list()
    # the key LEAN asks for is the file's path under output_dir
    signal.MODE, signal.CLIENT, signal.STRATEGY = "historical", "ikenna", "swing_high_v1"
    assert signal().get_source(config, date(2024, 1, 2), False) == f"/data/{path.relative_to(tmp_path)}"


def _reader_body(text: str) -> list[str]:
    """The statements of the first `def reader` in `text`, without comments, type-checker notes or
    blank lines."""
    import re

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("def reader("))
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        code = re.sub(r"\s+#.*$", "", line).strip()
        if code and not code.startswith("#"):
            body.append(code)
    return body


def test_the_reader_in_docs_outputs_is_the_algorithm_s():
    """Before: the page's snippet lacked `signal["mode"] = ...`, which the algorithm sets."""
    doc = (ALGORITHM.parents[2] / "docs/outputs.md").read_text()
    assert _reader_body(doc) == _reader_body(ALGORITHM.read_text())
