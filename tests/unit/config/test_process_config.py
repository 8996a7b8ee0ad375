"""Supervision settings (`process:`), the control store (`control:`) and a strategy's `recovery` policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from signalgen.config.loader import load_config, load_environment
from signalgen.config.models import ControlStoreConfig, ProcessLimitsConfig
from signalgen.errors import ConfigError

from .helpers import edit, line_of

DEFAULTS = {"heartbeat_interval_s": 2.0, "heartbeat_threshold_s": 30.0, "max_errors_per_minute": 10,
            "max_recovery_attempts": 5, "backoff_initial_s": 1.0, "backoff_max_s": 60.0, "stop_timeout_s": 10.0,
            "resource_sample_s": 5.0, "mock_bar_interval_s": 1.0, "memory_mb": 1024, "cpu": 1.0, "nice": 0,
            "log_max_mb": 10.0, "log_backups": 5, "metrics_host": "127.0.0.1", "metrics_port": 9464}
# the one knob the shipped environments set apart from its default: a free port on a developer's machine,
# where several managers, writers and recorders run at once; the fixed one where a pod has it to itself
METRICS_PORT = {"local-dev": 0, "local-integration": 0, "cloud-dev": 9464}


def test_defaults_are_the_contract() -> None:
    assert ProcessLimitsConfig().model_dump() == DEFAULTS
    assert ControlStoreConfig().model_dump() == {"type": "sqlite", "path": "var/control.sqlite",
                                                 "dsn_env": "SIGNALGEN_CONTROL_DSN", "lease_ttl_s": 15.0,
                                                 "connect_timeout_s": 5.0}


@pytest.mark.parametrize("env", ["local-dev", "local-integration", "cloud-dev"])
def test_every_environment_names_its_own_control_file(demo_root: Path, env: str) -> None:
    loaded = load_environment(env, root=demo_root)
    # cloud-dev's managers share PostgreSQL (the file is each one's spool); the local ones need no server
    kind = "postgres" if env == "cloud-dev" else "sqlite"
    assert loaded.control == ControlStoreConfig(type=kind, path=f"var/{env}/control.sqlite")
    # the shipped files write every default out, so an operator sees each knob
    assert loaded.process.model_dump() == {**DEFAULTS, "metrics_port": METRICS_PORT[env]}
    assert "  metrics_port: " in (demo_root / "environments" / f"{env}.yaml").read_text()


@pytest.mark.parametrize(("field", "value"), [("metrics_port", 70000), ("metrics_port", -1),
                                              ("metrics_host", "a host"), ("metrics_host", "")])
def test_a_bad_metrics_address_is_refused_naming_the_field(field: str, value) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ProcessLimitsConfig(**{field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_recovery_defaults_to_restart_and_takes_the_policies(demo_root: Path) -> None:
    cfg = load_config("local-dev", "mock", root=demo_root)
    assert {s.recovery for c in cfg.clients for s in c.strategies} == {"restart"}
    path = demo_root / "clients" / "ikenna.yaml"
    edit(path, "    aggregation: weighted\n", "    aggregation: weighted\n    recovery: pause\n")
    cfg = load_config("local-dev", "mock", root=demo_root)
    assert cfg.client("ikenna").strategies[0].recovery == "pause"


def test_unknown_recovery_policy_names_file_line_and_field(demo_root: Path) -> None:
    path = demo_root / "clients" / "ikenna.yaml"
    text = edit(path, "    aggregation: weighted\n", "    aggregation: weighted\n    recovery: retry\n")
    with pytest.raises(ConfigError) as info:
        load_config("local-dev", "mock", root=demo_root)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "recovery: retry"), "strategies.0.recovery")
    assert "'restart', 'pause' or 'stop'" in str(err)


@pytest.mark.parametrize(("old", "new", "field", "words"), [
    ("  backoff_max_s: 60.0 ", "  backoff_max_s: 0.5 ", "process", "backoff_max_s (0.5) must be at least"),
    ("  heartbeat_threshold_s: 30.0 ", "  heartbeat_threshold_s: 2.0 ", "process",
     "heartbeat_threshold_s (2.0) must be above heartbeat_interval_s"),
    ("  stop_timeout_s: 10.0 ", "  stop_timeout_s: 0 ", "process.stop_timeout_s", "greater than 0"),
    ("  nice: 0 ", "  nice: 20 ", "process.nice", "less than or equal to 19"),
    ("  max_recovery_attempts: 5 ", "  max_recovery_attempts: -1 ", "process.max_recovery_attempts",
     "greater than or equal to 0"),
    ("  type: sqlite ", "  type: redis ", "control.type", "'sqlite'"),
    ("  path: var/local-dev/control.sqlite", "  pth: var/local-dev/control.sqlite", "control.pth", "unknown key"),
    ("  type: sqlite ", "  type: postgres\n  dsn_env: 'host=db password=x' ", "control.dsn_env", "never the secret itself"),
])
def test_bad_process_and_control_fields(demo_root: Path, old: str, new: str, field: str, words: str) -> None:
    path = demo_root / "environments" / "local-dev.yaml"
    edit(path, old, new)
    with pytest.raises(ConfigError) as info:
        load_environment("local-dev", root=demo_root)
    assert info.value.exit_code == 2
    assert (info.value.file, info.value.field) == (str(path), field)
    assert words in str(info.value)
