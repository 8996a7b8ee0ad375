"""Stores are chosen by `storage.type` through one registry; only the DuckDB backend knows DuckDB."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from signalgen.config.models import BigQueryStorageConfig, DuckDBStorageConfig, EnvironmentConfig
from signalgen.errors import ConfigError
from signalgen.storage import STORES, open_store, store_for
from signalgen.storage.base import SignalStore
from signalgen.storage.duckdb import DuckDBStore
from signalgen.storage.reads import ReadQuery

PACKAGE = Path(__file__).resolve().parents[3] / "signalgen"


def _env(storage) -> EnvironmentConfig:
    return EnvironmentConfig(name="local-dev", storage=storage, messaging={"type": "local", "path": "s"})


def test_duckdb_is_built_from_config_unopened_and_meets_the_protocol(tmp_path):
    store = store_for(_env(DuckDBStorageConfig(type="duckdb", path="var/x.duckdb")), tmp_path)
    assert isinstance(store, DuckDBStore) and isinstance(store, SignalStore)
    assert store.path == tmp_path / "var/x.duckdb" and not store.path.parent.exists()  # no connection made
    assert set(STORES) == {"duckdb"}


def test_bigquery_is_a_clear_config_error_until_its_release(tmp_path):
    env = _env(BigQueryStorageConfig(type="bigquery", project="p"))
    with pytest.raises(ConfigError, match="storage type 'bigquery' is not available in this release; use duckdb") as e:
        store_for(env, tmp_path, file="environments/cloud-dev.yaml")
    assert "cloud-dev.yaml" in str(e.value) and "storage.type" in str(e.value)


def test_an_unopened_store_reads_the_file_and_an_opened_one_its_own_rows(tmp_path):
    from tests.unit.storage.reads_fixtures import fill_store

    path = tmp_path / "s.duckdb"
    with DuckDBStore(path) as store:
        fill_store(store)
        opened = store.read(ReadQuery(kind="signals"))
    assert DuckDBStore(path).read(ReadQuery(kind="signals")).equals(opened)
    assert opened.height > 0


def test_backends_are_imported_only_when_chosen():
    code = "import sys, signalgen.storage; print(sorted(m for m in sys.modules if m in ('duckdb', 'signalgen.storage.duckdb')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nothing_outside_the_duckdb_backend_imports_duckdb():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "duckdb" or n.startswith("duckdb.") for n in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert importers == ["storage/duckdb.py"]


def test_open_store_marks_stale_runs_abandoned(tmp_path):
    from signalgen.config.loader import load_config

    from tests.unit.config.helpers import copy_demo

    root = copy_demo(tmp_path / "demo")
    cfg = load_config("local-dev", "historical", root=root)
    store = open_store(cfg)
    try:
        assert isinstance(store, DuckDBStore) and store.path == root / cfg.environment.storage.path
    finally:
        store.close()
