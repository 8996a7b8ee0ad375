"""`strategy_runner.py config validate|show` as an operator runs it: real subprocess, exit codes, messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.roots import REPO, copy_config
from tests.unit.models.helpers import fresh_registry

MODELS = ("swing_high", "swing_low", "swing_high_short", "swing_low_short", "daily_high", "daily_low")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "strategy_runner.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the demo configs with the demo's trained registry, fresh by its cards' dates."""
    copy_config(tmp_path)
    fresh_registry(tmp_path / "registry")
    return tmp_path


def test_validate_ok(root: Path) -> None:
    proc = run_cli("config", "validate", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "4 clients, 12 workers" in proc.stdout
    assert "problem" not in proc.stdout


def test_validate_json(root: Path) -> None:
    proc = run_cli("config", "validate", "--root", str(root), "--output", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["problems"] == [] and len(out["config_hash"]) == 64
    assert out["clients"] == ["ada", "christian", "ikenna", "odum"] and len(out["workers"]) == 12
    assert out["workers"][3] == {"id": "christian.consensus_v1.ETHUSD.5m", "client": "christian",
                                 "strategy": "consensus_v1", "symbol": "ETHUSD", "timeframe": "5m",
                                 "routing": "both", "models": list(MODELS[:4])}


@pytest.mark.parametrize(("args", "words"), [
    # approved before (exit 0), then `run` refused them: exit 2 (environment) or 1 (mode)
    (("--mode", "live"), "live mode runs under the process manager, not `run`: `start --mode live --env "
                         "local-integration` (Redis)"),
])
def test_validate_finds_what_run_refuses(root: Path, args: tuple[str, ...], words: str) -> None:
    proc = run_cli("config", "validate", "--root", str(root), *args)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr and "workers" in proc.stdout  # the table, then the problems
    assert words in " ".join(proc.stdout.split())
    assert "problem(s)" in proc.stderr


def test_validate_accepts_cloud_dev(root: Path) -> None:
    """BigQuery storage and Pub/Sub messaging have backends (issue 17): nothing to refuse."""
    proc = run_cli("config", "validate", "--root", str(root), "--env", "cloud-dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: 4 clients, 12 workers" in proc.stdout and "problem" not in proc.stdout


def test_validate_accepts_redis_messaging_in_local_integration(root: Path) -> None:
    proc = run_cli("config", "validate", "--root", str(root), "--env", "local-integration")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: 4 clients, 12 workers" in proc.stdout and "problem" not in proc.stdout


def test_validate_json_on_a_load_error(root: Path) -> None:
    (root / "clients" / "odum.yaml").write_text("id: odum\nrouting: sideways\n")
    proc = run_cli("config", "validate", "--root", str(root), "-o", "json")
    assert proc.returncode == 2
    out = json.loads(proc.stdout)
    assert out["ok"] is False and out["workers"] == [] and len(out["problems"]) == 1
    assert "odum.yaml" in out["problems"][0] and "odum.yaml" in proc.stderr


def test_validate_broken_config_exits_2_with_a_clear_message(root: Path) -> None:
    path = root / "clients" / "christian.yaml"
    text = path.read_text().replace("model_id: swing_high_short\n        confidence_threshold: 0.45",
                                    "model_id: swing_high_short\n        confidence_threshold: 1.5", 1)
    path.write_text(text)
    line = text[: text.index("1.5")].count("\n") + 1
    proc = run_cli("config", "validate", "--root", str(root))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    stderr = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert f"christian.yaml:{line}: strategies.0.models.2.confidence_threshold:" in stderr
    assert "Input should be less than or equal to 1 (got 1.5)" in stderr


def test_validate_unknown_model_exits_2(root: Path) -> None:
    shutil.rmtree(root / "registry" / "swing_low_short")
    proc = run_cli("config", "validate", "--root", str(root), "--env", "cloud-dev", "--mode", "live")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    stderr = " ".join(proc.stderr.split())
    assert "model 'swing_low_short' is not in the model registry" in stderr
    assert "strategies.0.models.3.model_id" in stderr


def test_show_redacts_secrets(root: Path) -> None:
    proc = run_cli("config", "show", "--root", str(root), "--env", "local-integration", "--mode", "mock",
                   env={"IKENNA_QC_API_TOKEN": "tok-DO-NOT-PRINT-42"})
    assert proc.returncode == 0, proc.stderr
    assert "tok-DO-NOT-PRINT-42" not in proc.stdout + proc.stderr
    assert "IKENNA_QC_API_TOKEN (set)" in proc.stdout
    assert "config_hash:" in proc.stdout and "data_source: synthetic" in proc.stdout


def test_the_workers_table_fits_80_columns_and_wide_shows_the_rest(tmp_path: Path) -> None:
    import yaml

    for layer in ("environments", "modes"):
        shutil.copytree(REPO / layer, tmp_path / layer)
    fresh_registry(tmp_path / "registry")
    (tmp_path / "clients").mkdir()
    models = [{"model_id": m, "confidence_threshold": 0.55} for m in MODELS[:4]]
    (tmp_path / "clients" / "christian.yaml").write_text(yaml.safe_dump({
        "id": "christian", "routing": "both",
        "strategies": [{"id": "consensus_v1", "symbols": ["ETHUSD", "XRPUSD"], "timeframes": ["5m"],
                        "aggregation": "majority", "models": models}]}))
    proc = run_cli("config", "validate", "--root", str(tmp_path), env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), proc.stdout
    assert lines[1].split() == ["worker", "models", "routing"]
    # the worker id whole, the models wrapped in their column
    assert lines[3].split()[:2] == ["christian.consensus_v1.ETHUSD.5m", "swing_high>=0.55,"]
    assert lines[3].split()[-1] == "both" and "swing_low_short>=0.55" in proc.stdout
    wide = run_cli("config", "validate", "--root", str(tmp_path), "--wide", env={"COLUMNS": "80"}).stdout
    assert wide.splitlines()[1].split() == ["worker", "models", "routing", "aggregation", "exposure", "budget"]
    assert "majority" in wide and "0.500" in wide


def _blue(root: Path) -> Path:
    """An environment file outside environments/, with its own name and no control or output paths."""
    path = root / "elsewhere" / "blue.yaml"
    path.parent.mkdir()
    env = (root / "environments" / "local-dev.yaml").read_text()
    kept = [line for line in env.splitlines() if "control.sqlite" not in line and "output_dir" not in line]
    path.write_text("\n".join(kept).replace("name: local-dev", "name: blue").replace("var/local-dev", "var/blue"))
    return path


def test_every_command_that_takes_env_takes_a_path(root: Path) -> None:
    from signalgen.cli import app  # importing the package registers every command module
    from typer.main import get_command

    def commands(group, prefix=()):
        for name, command in getattr(group, "commands", {}).items():
            yield from commands(command, (*prefix, name)) if hasattr(command, "commands") else [((*prefix, name), command)]

    takes_env = {path: next((p for p in command.params if "--env" in p.opts), None)
                 for path, command in commands(get_command(app))}
    takes_env = {path: p for path, p in takes_env.items() if p is not None}
    assert len(takes_env) >= 25 and ("deploy", "supervisor") in takes_env and ("feed",) in takes_env
    assert [path for path, p in takes_env.items() if "PATH" not in (p.metavar or "")] == []

    blue = _blue(root)
    run = ("run", "--mode", "mock", "--client", "odum", "--start", "2025-01-01", "--end", "2025-01-01T06:00",
           "--no-progress")
    for args in (("config", "validate"), ("config", "show", "--mode", "mock"), run, ("runs", "list"),
                 ("signals", "list"), ("models", "list"), ("deploy", "supervisor", "--mode", "mock")):
        proc = run_cli(*args, "--root", str(root), "--env", str(blue))
        assert proc.returncode == 0, (args, proc.stdout + proc.stderr)
    assert "name: blue" in run_cli("config", "show", "--root", str(root), "--env", str(blue)).stdout
    assert (root / "var" / "blue" / "signalgen.duckdb").is_file()
    # `status` reads the control store of var/blue/ (exit 3: no manager runs), and supervisord's
    # programs load the same file
    status = run_cli("status", "--root", str(root), "--env", str(blue))
    assert status.returncode == 3 and "Traceback" not in status.stderr
    assert str(root / "var" / "blue" / "control.sqlite") in " ".join(status.stdout.split())
    conf = (root / "var" / "blue" / "supervisor" / "supervisord.conf").read_text()
    assert f" writer --env {blue} --mode mock" in conf


def test_env_shows_its_choices_and_refuses_anything_else(root: Path) -> None:
    help_text = " ".join(run_cli("status", "--help").stdout.split())
    assert "local-dev|local-integration|cloud-dev|PATH" in help_text.replace(" ", "").replace("││", "")
    proc = run_cli("status", "--root", str(root), "--env", "staging")
    assert proc.returncode == 2 and "not one of local-dev, local-integration, cloud-dev" in " ".join(proc.stderr.split())
    proc = run_cli("status", "--root", str(root), "--env", str(root / "nowhere.yaml"))
    assert proc.returncode == 2 and "file not found" in proc.stderr and "Traceback" not in proc.stderr
