"""Stores are chosen by `storage.type` through one registry; only the DuckDB backend knows DuckDB."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from signalgen.config.models import BigQueryStorageConfig, DuckDBStorageConfig, EnvironmentConfig
from signalgen.errors import ConfigError
from signalgen.errors import storage_error
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
    assert set(STORES) == {"duckdb", "bigquery"}


def test_bigquery_is_built_from_config_unopened_without_importing_the_client_library(tmp_path):
    code = ("import sys\n"
            "from signalgen.config.models import BigQueryStorageConfig, EnvironmentConfig\n"
            "from signalgen.storage import store_for\n"
            "env = EnvironmentConfig(name='cloud-dev', messaging={'type': 'local', 'path': 's'}, storage="
            "BigQueryStorageConfig(type='bigquery', project='p', dataset_prefix='x', api_endpoint='http://h:1'))\n"
            "s = store_for(env, '.')\n"
            "print(type(s).__name__, s.project, s.prefix, s.api_endpoint, s.dataset('a-b'), s.system, "
            "'google.cloud.bigquery' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["BigQueryStore", "p", "x", "http://h:1", "x_a_b", "x_system", "False"]


def test_a_store_type_missing_from_the_registry_is_a_config_error_naming_file_and_field(tmp_path, monkeypatch):
    monkeypatch.delitem(STORES, "bigquery")
    env = _env(BigQueryStorageConfig(type="bigquery", project="p"))
    with pytest.raises(ConfigError, match="storage type 'bigquery' is not available in this release; use duckdb") as e:
        store_for(env, tmp_path, file="environments/cloud-dev.yaml")
    assert "cloud-dev.yaml" in str(e.value) and "storage.type" in str(e.value)


def test_the_bigquery_endpoint_is_the_config_then_the_emulator_variable_then_bigquery_itself():
    from signalgen.storage.bigquery import endpoint

    emulator = {"BIGQUERY_EMULATOR_HOST": "127.0.0.1:9050"}
    assert endpoint("http://10.0.0.1:9050", emulator) == "http://10.0.0.1:9050"
    assert endpoint(None, emulator) == "http://127.0.0.1:9050"
    assert endpoint(None, {"BIGQUERY_EMULATOR_HOST": "http://h:1"}) == "http://h:1"
    assert endpoint(None, {}) is None and endpoint(None, {"BIGQUERY_EMULATOR_HOST": " "}) is None


def test_the_bigquery_endpoint_can_be_set_by_a_signalgen_variable(tmp_path, monkeypatch):
    from signalgen.config.loader import load_config

    from tests.unit.config.helpers import copy_demo

    root = copy_demo(tmp_path / "demo")
    monkeypatch.setenv("SIGNALGEN_STORAGE__API_ENDPOINT", "http://127.0.0.1:9050")
    cfg = load_config("cloud-dev", "historical", root=root)
    assert cfg.environment.storage.api_endpoint == "http://127.0.0.1:9050"
    monkeypatch.delenv("SIGNALGEN_STORAGE__API_ENDPOINT")
    assert load_config("cloud-dev", "historical", root=root).environment.storage.api_endpoint is None


def test_storage_errors_name_where_and_why_whatever_the_library():
    assert str(storage_error("/x", OSError(28, "No space left on device", "/x/f"))) == \
        "cannot write /x/f: No space left on device"
    duck = RuntimeError('IO Error: Could not write file "/d/s.duckdb.wal": No space left on device')
    assert str(storage_error("/d/s.duckdb", duck)) == "cannot write /d/s.duckdb.wal: No space left on device"

    class ApiError(Exception):  # how google.api_core errors carry theirs
        message = "Access Denied: Table p:d.t: Permission bigquery.tables.updateData denied"

    assert str(storage_error("p.d.t", ApiError("403 POST https://x: " + ApiError.message))) == \
        "cannot write p.d.t: Access Denied: Table p:d.t: Permission bigquery.tables.updateData denied"
    assert str(storage_error("p.d", ValueError("bad: thing\nmore"))) == "cannot write p.d: bad: thing"


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


def test_nothing_outside_the_backends_imports_their_libraries():
    assert _importers("google.cloud.bigquery") == ["storage/bigquery.py"]
    assert _importers("duckdb") == ["storage/duckdb.py"]


def _importers(library: str) -> list[str]:
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names]  # `from google.cloud import bigquery`
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n == library or n.startswith(f"{library}.") for n in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    return sorted(set(importers))


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
