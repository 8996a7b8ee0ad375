"""`run` and the app as an operator meets them: log lines honour log_level, the project root is found
from a sub-folder (or named when missing), --version."""

from __future__ import annotations

import io
import logging
import re
import shutil
from pathlib import Path

import pytest

from signalgen import __version__
from signalgen.logs import KeyValueFormatter
from signalgen.storage.duckdb import DuckDBStore
from tests.unit.storage.reads_fixtures import RUN_ID, fill_store
from tests.roots import copy_config
from tests.unit.test_cli_signals import REPO, cli


@pytest.fixture
def root(tmp_path: Path) -> Path:
    copy_config(tmp_path)
    shutil.copytree(REPO / "registry", tmp_path / "registry")
    return tmp_path


def set_log_level(root: Path, level: str) -> None:
    path = root / "environments" / "local-dev.yaml"
    path.write_text(path.read_text().replace("log_level: INFO", f"log_level: {level}"))


def test_run_logs_start_and_finish_with_fields_at_info_and_nothing_at_warning(root: Path) -> None:
    args = ("run", "--root", str(root), "--client", "odum", "--start", "2025-02-01", "--end", "2025-02-02",
            "--no-progress")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    # run_mode logs both (once: the CLI does not log them again), with the run's id as a field
    [start] = [line for line in lines if "signalgen.modes: run started: historical mode" in line]
    assert " INFO " in start and "client=odum" in start and "mode=historical" in start
    [finish] = [line for line in lines if "signalgen.modes: run finished" in line]
    assert " INFO " in finish and "status=ok" in finish and "bars=576" in finish
    run_id = re.search(r" run_id=(\S+)", start)[1]
    assert f" run_id={run_id} " in finish
    set_log_level(root, "WARNING")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "run started" not in proc.stderr and "run finished" not in proc.stderr


def test_formatter_renders_fields_as_key_value_and_bounds_values() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test_logs")  # outside the signalgen tree: no handler is changed for others
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    logger.addHandler(handler)
    try:
        logger.warning("bad file", extra={"path": "var/data/a b.csv", "worker": "odum.m.BTC.5m",
                                          "run_id": "r1", "detail": "x" * 5000})
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().rstrip("\n")
    assert line.endswith('bad file run_id=r1 worker=odum.m.BTC.5m path="var/data/a b.csv" detail=' + "x" * 200
                         + "...")
    assert " WARNING test_logs: " in line and line[:20].endswith("Z")


def test_without_root_the_nearest_project_folder_is_used(root: Path) -> None:
    with DuckDBStore(root / "var" / "local-dev" / "signalgen.duckdb") as store:
        fill_store(store)
    below = root / "var" / "deeper"
    below.mkdir(parents=True)
    proc = cli("runs", "list", cwd=below)
    assert proc.returncode == 0, proc.stderr
    assert RUN_ID in proc.stdout


def test_without_root_and_no_project_it_says_pass_root(tmp_path: Path) -> None:
    proc = cli("runs", "list", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert " ".join(proc.stderr.split()) == f"error: no clients/ in {tmp_path.resolve()}; pass --root"
    proc = cli("run", cwd=tmp_path)
    assert proc.returncode == 2 and "no clients/ in" in proc.stderr


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"signalgen {__version__}"
