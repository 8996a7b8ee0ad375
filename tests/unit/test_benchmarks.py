"""Every script in bench/ runs on a tiny setup and prints its figures, leaving docs/benchmarks.md alone;
only `--write` puts them there.

The benchmarks prove the speed and memory targets, so a change that breaks one must fail here, not
at the next measurement (bench/writer_server.py was once broken for a whole session unnoticed).
These runs assert that each script completes and prints its measured figures — never the figures'
values: a tiny run on a shared CI machine says nothing about speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"

# script, tiny arguments, a pattern its output must contain (figures measured in the run)
RUNS = [
    ("simulation.py", ["--bars", "2000", "--repeat", "1"],
     rf"\(b\) replay of one worker.*\*\*{NUMBER} \({NUMBER}-{NUMBER}\) bars/s\*\*"),
    ("historical.py", ["--days", "2", "--symbols", "2", "--raw-rows", "20000", "--chunk-bars", "2000", "--repeat", "1"],
     rf"\*\*ratio \(b\) / \(a\)\*\* \| \*\*{NUMBER}\*\*"),
    ("historical_procs.py", ["--days", "2", "--symbols", "2", "--rows", "20000", "--chunk", "2000", "--repeat", "1"],
     rf"\*\*Ratio \(median\): {NUMBER}\*\*.*{NUMBER} µs of CPU per bar"),
    ("writer_server.py", ["--workers", "2", "--bars", "100", "--rate", "50"],
     rf"paced 2 workers x 100 one-bar batches.*: {NUMBER} decisions/s; ack p50 {NUMBER} ms"),
    ("store_write.py", ["20000", "5000"], rf"replayed +20,000 rows in {NUMBER} s .*{NUMBER} rows/s"),
    ("live_latency.py", ["--workers", "10", "--rates", "1", "--seconds", "2"],
     rf"p50 \*\*{NUMBER} ms\*\*[\s\S]*\| 1 \| 10 \({NUMBER}\) \| {NUMBER} \| {NUMBER} ms \| {NUMBER} ms"
     rf"[\s\S]*\| 1, together \| 10 \({NUMBER}\) \| {NUMBER} \| {NUMBER} ms \| {NUMBER} ms"),
    ("cloud.py", ["--messages", "20", "--rate", "50", "--days", "1", "--workers", "3", "--bars", "6", "--settle", "1",
                  "--train-days", "5"],
     rf"\(a\) worker: .*\| \*\*{NUMBER}\*\* / {NUMBER} \|[\s\S]*\*\*Ratio BigQuery / DuckDB, per wall second: {NUMBER}\*\*"
     rf"[\s\S]*\| {NUMBER} \({NUMBER}\) \| 3 \| [\s\S]*\*\*Ratio cloud-dev / Redis: {NUMBER}\*\*"),
]


def _cloud_emulators() -> None:
    """bench/cloud.py starts the Pub/Sub emulator and bqemulator itself: build bqemulator's venv if it is
    missing (as the BigQuery tests do); skip, saying why, only where one cannot exist here."""
    pytest.importorskip("google.cloud.pubsub_v1", reason="the gcp extra is not installed")
    from tests.integration.bigquery.servers import BQEMULATOR, VENV
    from tests.integration.pubsub.servers import EMULATOR

    if not EMULATOR.exists():
        pytest.skip(f"the Pub/Sub emulator is not installed ({EMULATOR}: package google-cloud-cli-pubsub-emulator)")
    if not BQEMULATOR.exists():
        built = subprocess.run([str(REPO / "scripts" / "bqemulator-venv")], capture_output=True, text=True,
                               env={**os.environ, "SIGNALGEN_BQEMULATOR_VENV": str(VENV)}, timeout=900)
        if built.returncode != 0 or not BQEMULATOR.exists():
            pytest.skip(f"no BigQuery emulator at {BQEMULATOR}, and scripts/bqemulator-venv could not build it: "
                        f"{(built.stderr or built.stdout)[-300:]}")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(script: str, args: list[str], root: Path = REPO) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"bench/{script} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize(("script", "args", "expected"), RUNS, ids=[r[0] for r in RUNS])
def test_a_benchmark_runs_and_reports_its_figures(script: str, args: list[str], expected: str) -> None:
    if script in ("live_latency.py", "cloud.py") and shutil.which("redis-server") is None:
        pytest.skip(f"bench/{script} starts its own redis-server, which is not installed here")
    if script == "cloud.py":
        _cloud_emulators()
    before = _digest(DOC)
    out = _run(script, args)
    assert re.search(expected, out), f"bench/{script} did not report its figures:\n{out[-3000:]}"
    assert _digest(DOC) == before, f"bench/{script} changed docs/benchmarks.md"


def test_the_fleet_benchmark_brings_a_small_fleet_up_and_down() -> None:
    before = _digest(DOC)
    out = _run("fleet.py", ["--workers", "4", "--window", "5", "--settle", "1", "--repeats", "1",
                            "--metrics-window", "2", "--metrics-pairs", "1"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["workers"] == 4 and result["all_running_s"] is not None
    metrics = result["metrics"]  # the manager's /metrics scraped: its time, size and CPU measured
    assert metrics["scrapes"] == 1 and metrics["samples"] > 4 * 5 and metrics["manager_cpu_pct_without"] > 0
    assert result["exit_code"] == 0 and result["bars_per_s"] > 0 and result["uss_mb"]["median"] > 0
    assert len(result["kill9_to_running_s"]) == 1 and result["command_to_effect_s"][0] is not None
    assert _digest(DOC) == before


def test_write_puts_the_figures_and_the_command_into_the_doc(tmp_path: Path) -> None:
    # a copy of bench/ writes the copy of the doc beside it (a script's doc is <its root>/docs/benchmarks.md)
    shutil.copytree(REPO / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "registry").symlink_to(REPO / "registry")
    (tmp_path / "docs").mkdir()
    shutil.copy(DOC, tmp_path / "docs" / "benchmarks.md")
    before = _digest(DOC)
    _run("simulation.py", ["--bars", "2000", "--repeat", "1", "--write"], root=tmp_path)
    written = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "Command: `python bench/simulation.py --bars 2000 --repeat 1 --write` — run on" in written
    assert written != DOC.read_text() and _digest(DOC) == before


def test_every_recorded_command_carries_write() -> None:
    """A section's command, run again, must rewrite that section: so it carries --write."""
    commands = re.findall(r"^Command: `(python bench/[^`]+)`", DOC.read_text(), flags=re.M)
    assert len(commands) >= 5 and [c for c in commands if not c.endswith(" --write")] == []
