"""signals/ and features/ stay pure and at the bottom: every import they make is on an allow-list.

The allow-list (not a deny-list) is the point: a new import of I/O, of models/, data/ or modes/, or
of any library that touches files, the network or the clock fails here until someone decides it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import signalgen

ROOT = Path(signalgen.__file__).parent
PURE_PACKAGES = ("signals", "features")
# Computation only: no module here reads files, sockets, the clock or the environment.
ALLOWED = {"__future__", "math", "bisect", "collections", "collections.abc", "dataclasses", "enum",
           "typing", "hashlib", "itertools", "functools", "numpy", "polars", "pyarrow",
           "signalgen.signals", "signalgen.features", "signalgen.config.models"}
# datetime is allowed for durations/types; "now" must come in as an argument (checked below).
ALLOWED_NAMES = {"datetime": {"timedelta", "datetime", "timezone"}}
CLOCK_CALLS = {"now", "utcnow", "today", "time", "perf_counter", "perf_counter_ns", "time_ns", "monotonic"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PURE_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _allowed(module: str) -> bool:
    return any(module == ok or module.startswith(ok + ".") for ok in ALLOWED)


def forbidden_imports(source: str) -> list[str]:
    """The imports of `source` outside the allow-list, and any call of a clock."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if not _allowed(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.level:
                found.append(module)  # relative imports hide where they point: use absolute ones
            elif module in ALLOWED_NAMES:
                found += [f"{module}.{a.name}" for a in node.names if a.name not in ALLOWED_NAMES[module]]
            elif not _allowed(module):
                found.append(module)
        elif isinstance(node, ast.Attribute) and node.attr in CLOCK_CALLS and isinstance(node.ctx, ast.Load):
            found.append(f"clock call .{node.attr}")
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_package_imports_only_pure_modules(path):
    assert forbidden_imports(path.read_text()) == []


@pytest.mark.parametrize("source, bad", [
    ("from signalgen.models.health import bad_outputs", ["signalgen.models.health"]),
    ("from signalgen.data.validation import default_max_gap", ["signalgen.data.validation"]),
    ("import signalgen.modes.engine", ["signalgen.modes.engine"]),
    ("import duckdb", ["duckdb"]),
    ("import os.path", ["os.path"]),
    ("from ..models import health", ["..models"]),
    ("from datetime import date\nx = datetime.now()", ["datetime.date", "clock call .now"]),
])
def test_checker_catches_forbidden_imports(source, bad):
    assert forbidden_imports(source) == bad


def test_checker_sees_every_pure_module():
    names = {p.name for p in _modules()}
    assert {"pipeline.py", "validate.py", "batch.py", "incremental.py", "spec.py"} <= names
