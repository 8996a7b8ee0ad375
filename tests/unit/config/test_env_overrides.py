"""SIGNALGEN_<SECTION>__<KEY> variables override environment values: YAML < variable < command line,
validated exactly as the YAML is, and every error names the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from signalgen.config.loader import Overrides, load_config, load_environment
from signalgen.errors import ConfigError
from signalgen.process.manager import default_loader

from .helpers import REPO, edit

URL = "redis://10.1.2.3:6380/2"


@pytest.fixture(autouse=True)
def no_signalgen_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the variables a test sets."""
    for var in list(os.environ):
        if var.upper().startswith("SIGNALGEN_"):
            monkeypatch.delenv(var)


def fails(root: Path, env: str = "local-integration") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(env, "mock", root=root)
    assert info.value.exit_code == 2
    return info.value


def test_a_variable_overrides_the_file_and_config_show_names_it(demo_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    plain = load_config("local-integration", "mock", root=demo_root)
    monkeypatch.setenv("SIGNALGEN_MESSAGING__URL", URL)
    monkeypatch.setenv("SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD_S", "45")
    cfg = load_config("local-integration", "mock", root=demo_root)
    assert cfg.environment.messaging.url == URL and cfg.environment.process.heartbeat_threshold_s == 45.0
    assert cfg.environment.messaging.stream_prefix == plain.environment.messaging.stream_prefix  # the rest stays
    assert cfg.overrides == {"messaging.url": "SIGNALGEN_MESSAGING__URL",
                             "process.heartbeat_threshold_s": "SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD_S"}
    # a value set by a variable is the same configuration as the file holding it
    edit(demo_root / "environments" / "local-integration.yaml", "url: redis://127.0.0.1:6379/0", f"url: {URL}")
    edit(demo_root / "environments" / "local-integration.yaml", "heartbeat_threshold_s: 30.0",
         "heartbeat_threshold_s: 45.0")
    monkeypatch.delenv("SIGNALGEN_MESSAGING__URL")
    monkeypatch.delenv("SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD_S")
    assert load_config("local-integration", "mock", root=demo_root).config_hash == cfg.config_hash


def test_precedence_is_yaml_then_variable_then_command_line(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_environment("local-dev", root=demo_root).dependencies.ml_inference == "local"  # the YAML
    monkeypatch.setenv("SIGNALGEN_DEPENDENCIES__ML_INFERENCE", "mock")
    assert load_config("local-dev", "mock", root=demo_root).inference == "mock"
    cli = load_config("local-dev", "mock", root=demo_root, overrides=Overrides(inference="local"))
    assert cli.inference == "local"


def test_names_are_case_insensitive_and_a_section_can_be_json(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("signalgen_log_level", "DEBUG")
    monkeypatch.setenv("SIGNALGEN_PROCESS", '{"nice": 5, "memory_mb": 512}')
    cfg = load_config("local-dev", "mock", root=demo_root)
    assert cfg.environment.log_level == "DEBUG"
    assert (cfg.environment.process.nice, cfg.environment.process.memory_mb) == (5, 512)
    assert cfg.overrides == {"log_level": "SIGNALGEN_LOG_LEVEL", "process.nice": "SIGNALGEN_PROCESS",
                             "process.memory_mb": "SIGNALGEN_PROCESS"}


@pytest.mark.parametrize(("var", "value", "field", "words"), [
    ("SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD_S", "soon", "process.heartbeat_threshold_s", "valid number"),
    ("SIGNALGEN_PROCESS__NICE", "20", "process.nice", "less than or equal to 19"),
    ("SIGNALGEN_LOG_LEVEL", "LOUD", "log_level", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    # a model rule across two keys names the variable that broke it
    ("SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD_S", "1", "process", "must be above heartbeat_interval_s"),
    # a misspelt key never falls back to the file's value
    ("SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD", "40", "process.heartbeat_threshold",
     "did you mean 'heartbeat_threshold_s'"),
    ("SIGNALGEN_MESSAGING__PATH", "x", "messaging.path", "unknown key 'path' (allowed: type, url"),
])
def test_a_bad_value_names_the_variable(demo_root: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                        field: str, words: str) -> None:
    monkeypatch.setenv(var, value)
    err = fails(demo_root)
    assert (err.file, err.line, err.field) == (var, None, field) and words in str(err)


def test_a_bad_value_is_judged_as_the_same_value_in_the_file(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALGEN_PROCESS__BACKOFF_MAX_S", "0.5")
    by_variable = str(fails(demo_root)).split(": ", 2)[-1]
    monkeypatch.delenv("SIGNALGEN_PROCESS__BACKOFF_MAX_S")
    edit(demo_root / "environments" / "local-integration.yaml", "backoff_max_s: 60.0", "backoff_max_s: 0.5")
    assert str(fails(demo_root)).split(": ", 2)[-1] == by_variable


@pytest.mark.parametrize(("var", "value", "words"), [
    ("SIGNALGEN_PROCES__NICE", "3", "no environment section 'proces' (did you mean SIGNALGEN_PROCESS__...?)"),
    ("SIGNALGEN_NAME", "other", "cannot be overridden"),
    ("SIGNALGEN_PROCESS", "{nice: 5", "not a JSON object"),
])
def test_what_cannot_be_a_value_is_refused_naming_the_variable(demo_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                               var: str, value: str, words: str) -> None:
    monkeypatch.setenv(var, value)
    err = fails(demo_root)
    assert err.file == var and words in str(err)


def test_other_variables_are_left_to_whoever_reads_them(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # client libraries' own variables (the Pub/Sub emulator's) and password variables named by *_env
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "localhost:8085")
    monkeypatch.setenv("SIGNALGEN_REDIS_PASSWORD", "hunter2")
    cfg = load_config("cloud-dev", "mock", root=demo_root)
    assert cfg.overrides == {} and cfg == load_config("cloud-dev", "mock", root=demo_root)


def test_reload_reads_the_same_variables(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALGEN_PROCESS__MAX_RECOVERY_ATTEMPTS", "9")
    cfg = load_config("local-dev", "mock", root=demo_root)
    new, _ = default_loader(cfg)()  # what the manager runs on `reload` (workers are forked with its config)
    assert new.environment.process.max_recovery_attempts == 9 and new == cfg


def test_the_command_line_exits_2_naming_the_variable_and_shows_where_a_value_came_from(demo_root: Path) -> None:
    def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args, "--root", str(demo_root),
                               "--env", "local-integration", "--mode", "mock", "--client", "odum"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), **env})

    bad = cli("config", "validate", SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD_S="soon")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "SIGNALGEN_PROCESS__HEARTBEAT_THRESHOLD_S: process.heartbeat_threshold_s:" in bad.stderr
    shown = cli("config", "show", SIGNALGEN_MESSAGING__URL=URL)
    assert shown.returncode == 0, shown.stderr
    assert f"url: {URL}" in shown.stdout and "messaging.url: SIGNALGEN_MESSAGING__URL" in shown.stdout
