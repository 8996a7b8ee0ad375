"""deploy/prometheus/alerts.yml: valid rules (`promtool check rules`) that fire as alerts_test.yml says
(`promtool test rules`), over the metric names the processes export (tests/unit/process/test_health.py
scrapes them). promtool is the Debian package `prometheus`; .ci/run installs it and sets
SIGNALGEN_REQUIRE_PROMTOOL, so in CI this never skips."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.roots import REPO

RULES = REPO / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("SIGNALGEN_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here (SIGNALGEN_REQUIRE_PROMTOOL) and not on PATH")
        pytest.skip("promtool is not installed (apt-get install --no-install-recommends prometheus)")
    return path


def test_the_rules_are_valid(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True)
    assert proc.returncode == 0 and "SUCCESS: 6 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_each_alert_fires_on_its_series(promtool: str) -> None:
    proc = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    tested = {t["alertname"] for group in yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
              for t in group["alert_rule_test"] if t["exp_alerts"]}
    rules = {r["alert"] for g in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert tested == rules  # every alert is proven to fire


def test_the_rules_use_only_metrics_signalgen_exports() -> None:
    from signalgen.metrics import REGISTRY

    exported = {"signalgen_worker_state", "signalgen_heartbeat_age_seconds", "signalgen_paused_ordering_keys"}
    exported |= {s.name for m in REGISTRY.collect() for s in m.samples} | {m.name for m in REGISTRY.collect()}
    text = (RULES / "alerts.yml").read_text()
    used = set(re.findall(r"\bsignalgen_[a-z_]+\b", text))
    assert used <= exported | {n + "_bucket" for n in exported} | {n + "_total" for n in exported}, used - exported
